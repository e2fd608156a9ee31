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
from collections.abc import Callable

from workers.backends import OnDelta
from workers.config import SimulatedExpert
from workers.types import Completion, Prompt, SamplingParams

_LETTERS = "ABCD"


class SimulatedBackend:
    def __init__(self, config: SimulatedExpert) -> None:
        self.config = config
        self.device = config.device
        self.loaded = False
        self.sleeps = config.sleep_mode
        """With ``sleep_mode`` it declares sleep support, so the pool's sleep path runs without a GPU."""

    def load(self) -> None:
        time.sleep(self.config.load_s * self.config.time_scale)
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def sleep(self) -> None:
        self.loaded = False

    def wake(self) -> None:
        time.sleep(self.config.wake_s * self.config.time_scale)
        self.loaded = True

    def estimate_memory_bytes(self) -> int:
        return int(self.config.memory_gb * 2**30)

    def memory_bytes(self) -> int:
        return self.estimate_memory_bytes() if self.loaded else 0

    @staticmethod
    def count_tokens(prompts: list[Prompt]) -> list[int]:
        """A simulated prompt token is a word."""
        return [len(p.as_plain_text().split()) for p in prompts]

    def call_seconds(self, prompt_tokens: int, rows: int, new_tokens: int) -> float:
        """The modelled wall time of one call, before time scaling; rows past max_batch_size run as further chunks,
        as the transformers backend runs them."""
        c = self.config
        full, rest = divmod(rows, c.max_batch_size)
        chunks = [c.max_batch_size] * full + ([rest] if rest else [])
        decode = sum(new_tokens * (c.step_s + c.step_s_per_row * (b - 1)) for b in chunks)
        return c.prefill_s_per_token * prompt_tokens + decode

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """The modelled time, spent step by step when streaming: each row's answer comes a word per decode step
        (the first after the prefill), and a cancelled row stops there."""
        if not self.loaded:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        counts = self.count_tokens(prompts)
        texts = [self._answer(p, row, params) for row, p in enumerate(prompts)]
        total = self.call_seconds(sum(counts), len(prompts), params.max_new_tokens) * self.config.time_scale
        if on_delta is None and cancelled is None:
            time.sleep(total)
            return [Completion(t, n, params.max_new_tokens, "length", meta={"simulated": True})
                    for t, n in zip(texts, counts)]
        prefill = self.config.prefill_s_per_token * sum(counts) * self.config.time_scale
        time.sleep(prefill)
        words = [t.split(" ") for t in texts]
        stopped = [None] * len(prompts)
        for step in range(params.max_new_tokens):
            time.sleep((total - prefill) / params.max_new_tokens)
            for row, row_words in enumerate(words):
                if stopped[row] is None and cancelled is not None and cancelled(row):
                    stopped[row] = step
                if stopped[row] is None and step < len(row_words) and on_delta is not None:
                    on_delta(row, row_words[step] + (" " if step + 1 < len(row_words) else ""))
        return [Completion(t if s is None else " ".join(w[:s]), n, params.max_new_tokens if s is None else s,
                           "length" if s is None else "cancelled", meta={"simulated": True})
                for t, w, n, s in zip(texts, words, counts, stopped)]

    def _answer(self, prompt: Prompt, row: int, params: SamplingParams) -> str:
        """A short, deterministic option letter: greedy rows with one prompt agree; sampled rows may differ."""
        salt = f"{row}:{params.seed}" if not params.greedy else ""
        key = f"{self.config.name}\n{prompt.as_plain_text()}\n{salt}".encode()
        return f"The answer is ({_LETTERS[hashlib.sha256(key).digest()[0] % len(_LETTERS)]})."

    def describe(self) -> dict[str, object]:
        c = self.config
        return {"load_s": c.load_s, "step_s": c.step_s, "step_s_per_row": c.step_s_per_row,
                "prefill_s_per_token": c.prefill_s_per_token, "time_scale": c.time_scale}
