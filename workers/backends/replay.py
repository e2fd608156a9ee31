"""An expert that answers with a real model's recorded answers.

It lets routers, the scheduler and the API run on real recorded outcomes
without loading any model. A prompt that names a record (its ``ref``, or a text
``id:<record id>``) or matches a recorded query by its text gets that record's answer, with the record's cost; any other prompt gets a
record chosen by a stable hash of the prompt, so load tests see deterministic,
realistic answers, and ``meta['matched']`` says which case it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from workers.backends import OnDelta, deliver_whole
from workers.config import ReplayExpert
from workers.recorded import Record, RecordedOutcomes, load_recorded
from workers.types import Completion, Prompt, SamplingParams


def _key(text: str) -> str:
    return " ".join(text.split())


class ReplayBackend:
    device = "cpu"

    def __init__(self, config: ReplayExpert) -> None:
        self.config = config
        self.data: RecordedOutcomes | None = None
        self.by_text: dict[str, Record] = {}
        self.by_id: dict[str, Record] = {}
        self.column = -1

    def load(self) -> None:
        data = load_recorded(self.config.path)
        self.column = data.model_index(self.config.model)
        self.by_text = {_key(r.text): r for r in data.records}
        self.by_id = {r.id: r for r in data.records}
        self.data = data

    def unload(self) -> None:
        self.data = None
        self.by_text, self.by_id = {}, {}

    def estimate_memory_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def _lookup(self, prompt: Prompt) -> tuple[Record, bool]:
        if prompt.ref is not None and prompt.ref in self.by_id:
            return self.by_id[prompt.ref], True
        text = prompt.text if prompt.text is not None else prompt.messages[-1].content
        key = _key(text)
        if key.startswith("id:") and key[3:].strip() in self.by_id:
            return self.by_id[key[3:].strip()], True
        if key in self.by_text:
            return self.by_text[key], True
        assert self.data is not None
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        return self.data.records[digest % len(self.data.records)], False

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """The recorded answers; a stream gets each whole, at once."""
        return deliver_whole(self._recorded(prompts), on_delta)

    def _recorded(self, prompts: list[Prompt]) -> list[Completion]:
        if self.data is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        out = []
        for prompt in prompts:
            record, matched = self._lookup(prompt)
            c = self.column
            pred = record.pred[c] if record.pred else None
            text = f"The answer is ({pred})." if pred else f"[recorded outcome: score {record.outcome[c]:g}]"
            out.append(
                Completion(
                    text=text,
                    prompt_tokens=self.count_tokens([prompt])[0],
                    completion_tokens=len(text.split()),
                    finish_reason="stop",
                    meta={"record_id": record.id, "matched": matched, "score": record.outcome[c]},
                    cost_usd=record.cost[c] if record.cost else None,
                )
            )
        return out

    @staticmethod
    def count_tokens(prompts: list[Prompt]) -> list[int]:
        """A replayed call is charged its prompt's words: the records hold no tokenizer."""
        return [len(_key(p.as_plain_text()).split()) for p in prompts]

    def describe(self) -> dict[str, object]:
        return {"path": str(self.config.path), "model": self.config.model}
