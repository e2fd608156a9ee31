"""Token streaming for batched transformers ``generate``: each row's text as it is written, and per-row stops.

transformers' own ``TextStreamer`` takes one row; a batched call here serves
several requests, so ``RowStreamer`` keeps a text per row and reports each
row's new text as it grows. It holds back the last few characters while they
could still become a stop string, so a stop string never leaks into the stream
(OpenAI's ``stop`` does not return it), and trailing whitespace and a character
whose bytes are still arriving until text follows them, so that the pieces add
up to exactly the completion's text. ``RowStops`` is a stopping criterion
that ends single rows: one whose client went away, or whose text reached a stop
string. The other rows of the batch keep generating.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from workers.backends import OnDelta


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class RowStreamer(BaseStreamer):
    def __init__(self, tokenizer: object, rows: int, eos: list[int], stops: tuple[str, ...],
                 on_delta: OnDelta | None) -> None:
        self.tokenizer, self.eos, self.stops, self.on_delta = tokenizer, set(eos), stops, on_delta
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows
        self.done = [False] * rows
        self.stopped = [False] * rows
        """Rows that reached a stop string: ``RowStops`` ends them at the next step."""
        self.cancelled = [False] * rows
        """Rows ``RowStops`` ended because their client went away: what they still receive is padding."""
        self.hold = max((len(s) for s in stops), default=1) - 1
        self._prompt_seen = False

    def text(self, row: int) -> str:
        """The row's text so far: decoded, without leading space, cut at a stop string."""
        decoded = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True).lstrip()
        text, hit = cut_at_stop(decoded, self.stops)
        self.stopped[row] = self.stopped[row] or hit
        return text

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands the prompt over first
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
            self._emit(row, final=self.done[row])

    def _emit(self, row: int, final: bool) -> None:
        text = self.text(row).rstrip()
        if self.stopped[row]:
            self.done[row], final = True, True
        if not final:
            text = text.rstrip("\ufffd")
        end = len(text) if final else max(self.sent[row], len(text) - self.hold)
        if end > self.sent[row] and self.on_delta is not None:
            self.on_delta(row, text[self.sent[row]:end])
        self.sent[row] = max(self.sent[row], end)

    def end(self) -> None:
        """Whatever each row still holds back."""
        for row in range(len(self.tokens)):
            self._emit(row, final=True)


class RowStops(StoppingCriteria):
    """Ends the rows whose client went away (``cancelled(row)``) and the rows that reached a stop string."""

    def __init__(self, cancelled: Callable[[int], bool], streamer: RowStreamer) -> None:
        self.cancelled, self.streamer = cancelled, streamer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
                 ) -> torch.BoolTensor:
        ended = []
        for row in range(input_ids.shape[0]):
            if self.cancelled(row) and not self.streamer.done[row]:
                self.streamer.cancelled[row] = self.streamer.done[row] = True
            ended.append(self.streamer.cancelled[row] or self.streamer.stopped[row])
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)
