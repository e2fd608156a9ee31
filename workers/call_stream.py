"""A Ray streaming generator over a blocking, batched generation call, and per-row cancels for it.

The actor runs the call in a thread; the generator yields, as they come, the
lists of ``TokenDelta`` the call reports, then the call's ``GenerationResult``.
A caller that loses a row's client calls the actor's ``cancel(call, row)``:
the row's ``cancelled`` check turns true, and the backend ends that row at its
next step while the other rows go on. Both actors that generate (an expert, and
the latent group) stream through this one helper.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from workers.backends import OnDelta
from workers.types import GenerationResult, TokenDelta

Generate = Callable[[OnDelta, Callable[[int], bool]], GenerationResult]


class Cancels:
    """Rows cancelled per call: written by ``cancel`` calls, read by the running call's ``cancelled`` check."""

    def __init__(self) -> None:
        self._rows: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def cancel(self, call: str, row: int) -> None:
        with self._lock:
            self._rows.setdefault(call, set()).add(row)

    def check(self, call: str) -> Callable[[int], bool]:
        def cancelled(row: int) -> bool:
            with self._lock:
                return row in self._rows.get(call, ())
        return cancelled

    def forget(self, call: str) -> None:
        with self._lock:
            self._rows.pop(call, None)


def stream(generate: Generate, call: str, cancels: Cancels) -> Iterator[list[TokenDelta] | GenerationResult]:
    """Run ``generate`` in a thread; yield its deltas in batches as they arrive, then its result."""
    events: queue.Queue = queue.Queue()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = generate(lambda row, text: events.put(TokenDelta(row, text)), cancels.check(call))
        except BaseException as exc:  # raised again in the caller, after the deltas already sent
            outcome["error"] = exc
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True).start()
    try:
        done = False
        while not done:
            batch = [events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            done = batch[-1] is None
            deltas = [d for d in batch if d is not None]
            if deltas:
                yield deltas
    finally:
        cancels.forget(call)
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]
