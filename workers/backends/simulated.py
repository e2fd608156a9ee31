"""An expert whose generation is replaced by a calibrated cost model.

It lets the scheduler be measured, and projected onto hardware this machine
does not have, without running any model: loading sleeps ``load_s``, and a
batched call sleeps for prefill plus ``max_new_tokens`` decode steps, a step
costing ``step_s`` at batch 1 and ``step_s_per_row`` more per extra row.
``time_scale`` shrinks every sleep, so a projection of hours runs in minutes;
a benchmark divides its clock by the same factor.

Answers are short, deterministic option letters (per expert, prompt and
sample), so voting and consensus behave as they would on real answers.
"""

from __future__ import annotations

import hashlib
import time

from workers.config import SimulatedExpert
from workers.types import Completion, Prompt, SamplingParams

_LETTERS = "ABCD"


class SimulatedBackend:
    def __init__(self, config: SimulatedExpert) -> None:
        self.config = config
        self.device = config.device
        self.loaded = False

    def load(self) -> None:
        time.sleep(self.config.load_s * self.config.time_scale)
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def estimate_memory_bytes(self) -> int:
        return int(self.config.memory_gb * 2**30)

    def memory_bytes(self) -> int:
        return self.estimate_memory_bytes() if self.loaded else 0

    def call_seconds(self, prompt_tokens: int, rows: int, new_tokens: int) -> float:
        """The modelled wall time of one call, before time scaling; rows past max_batch_size run as further chunks,
        as the transformers backend runs them."""
        c = self.config
        full, rest = divmod(rows, c.max_batch_size)
        chunks = [c.max_batch_size] * full + ([rest] if rest else [])
        decode = sum(new_tokens * (c.step_s + c.step_s_per_row * (b - 1)) for b in chunks)
        return c.prefill_s_per_token * prompt_tokens + decode

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        if not self.loaded:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        counts = [len(p.as_plain_text().split()) for p in prompts]
        time.sleep(self.call_seconds(sum(counts), len(prompts), params.max_new_tokens) * self.config.time_scale)
        out = []
        for row, (prompt, count) in enumerate(zip(prompts, counts)):
            # Greedy rows with one prompt give one answer; sampled rows may differ.
            salt = f"{row}:{params.seed}" if not params.greedy else ""
            key = f"{self.config.name}\n{prompt.as_plain_text()}\n{salt}".encode()
            letter = _LETTERS[hashlib.sha256(key).digest()[0] % len(_LETTERS)]
            out.append(Completion(f"The answer is ({letter}).", count, params.max_new_tokens, "length",
                                  meta={"simulated": True}))
        return out

    def describe(self) -> dict[str, object]:
        c = self.config
        return {"load_s": c.load_s, "step_s": c.step_s, "step_s_per_row": c.step_s_per_row,
                "prefill_s_per_token": c.prefill_s_per_token, "time_scale": c.time_scale}
