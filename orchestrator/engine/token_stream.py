"""A request's live events: which expert writes its answer, then that expert's text as it is written.

The API makes a ``TokenStream`` for a request with ``stream: true``. The
scheduler says first where the text will come from (``plan``), and the
executor hands over each piece of that expert's row as the actor streams it
(``delta``). The API closes the stream when the request's answer is ready. A
client that goes away cancels the stream, and the cancel reaches the actor: the
row stops generating, the other rows of its batch do not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from workers.types import Piece

PLAN, DELTA, END = "plan", "delta", "end"


class TokenStream:
    def __init__(self) -> None:
        self._events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._hooks: list[Callable[[], None]] = []
        self.streamed = False
        """Whether any of the answer's text went out as tokens."""
        self.cancelled = False
        self._ended = False

    def plan(self, info: dict[str, object]) -> None:
        self._events.put_nowait((PLAN, info))

    def delta(self, piece: Piece) -> None:
        """A piece of the answer: text, or a piece of a tool call (``ToolCallDelta``)."""
        if piece and not self.cancelled:
            self.streamed = True
            self._events.put_nowait((DELTA, piece))

    def close(self) -> None:
        """The answer is ready (or the request failed): the events end here."""
        self._events.put_nowait((END, None))

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the client goes away (at once if it already has)."""
        if self.cancelled:
            hook()
        else:
            self._hooks.append(hook)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            for hook in self._hooks:
                hook()

    async def first(self) -> dict[str, object] | None:
        """The plan, which comes before any delta; None if the stream closed first (the request failed)."""
        kind, payload = await self._events.get()
        if kind == END:
            self._ended = True
            return None
        return payload  # type: ignore[return-value]

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        """(kind, payload) for each plan and delta, until the stream is closed."""
        while not self._ended:
            kind, payload = await self._events.get()
            if kind == END:
                self._ended = True
                return
            yield kind, payload
