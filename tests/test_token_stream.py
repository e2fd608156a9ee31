"""Admission without idle waiting, and token streams through the scheduler, on the real pool and real Ray.

The experts are simulated (real actors that write a word per decode step, with
the bundled models' names and sizes): these tests are about when rows start,
stream and stop, which the simulated cost model makes exact. Streaming real
text end to end is tested against live servers in ``test_streaming.py``.
"""

from __future__ import annotations

import asyncio

from orchestrator.engine.requests import QueryRequest
from orchestrator.engine.token_stream import DELTA, PLAN, TokenStream
from tests.conftest import run
from tests.test_scheduler import _scheduler
from workers.config import SimulatedExpert

SLOW = [SimulatedExpert(backend="simulated", name="smollm2", memory_gb=0.5, load_s=0.0, step_s=0.05),
        SimulatedExpert(backend="simulated", name="gemma3", memory_gb=1.0, load_s=0.0, step_s=0.05)]


def test_an_idle_scheduler_starts_at_once_and_batches_what_arrives_while_busy(ray_cluster):
    """No ``max_wait_ms``: the first request runs alone at once, and the three that arrive while it runs form
    the next window together, as continuous batching admits new work at the next step."""
    table = {q: ["smollm2"] for q in ("first", "second", "third", "fourth")}

    async def main():
        sched, router, pool = await _scheduler(table, experts=SLOW, max_batch=64)
        try:
            first = asyncio.ensure_future(sched.submit(QueryRequest("first", aggregation="best", max_new_tokens=10)))
            await asyncio.sleep(0.2)  # the first window is running (10 steps of 0.05 s)
            rest = [asyncio.ensure_future(sched.submit(QueryRequest(q, aggregation="best", max_new_tokens=10)))
                    for q in list(table)[1:]]
            return await first, await asyncio.gather(*rest), router.windows, sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    first, rest, windows, stats = run(main())
    assert windows == [["first"], ["second", "third", "fourth"]]
    assert stats.batch_sizes == [1, 3]
    # The lone request waited for no company: it was queued only while the scheduler picked it up.
    assert first.timings["queue_s"] < 0.1 < min(a.timings["queue_s"] for a in rest)


def _collect(stream: TokenStream, seen: list[tuple[str, object]], stop_after: int | None = None):
    async def reader() -> None:
        deltas = 0
        async for kind, payload in stream.events():
            seen.append((kind, payload))
            deltas += kind == DELTA
            if stop_after is not None and deltas == stop_after:
                stream.cancel()
                return
    return asyncio.ensure_future(reader())


def test_a_stream_gets_its_row_as_written_and_a_cancel_stops_only_that_row(ray_cluster):
    """Two streaming requests share one batched call of smollm2. Each gets a plan, then its own row's words; the
    one whose client leaves after one word stops generating there, while the other row runs to the end."""
    table = {"kept": ["smollm2"], "dropped": ["smollm2"], "voted": ["smollm2", "gemma3"]}

    async def main():
        sched, _router, pool = await _scheduler(table, experts=SLOW, max_batch=64, max_wait_ms=200)
        streams = {q: TokenStream() for q in table}
        seen: dict[str, list] = {q: [] for q in table}
        readers = [_collect(streams[q], seen[q], 1 if q == "dropped" else None) for q in table]
        try:
            asks = {q: asyncio.ensure_future(sched.submit(QueryRequest(
                q, aggregation="best" if q != "voted" else "vote", max_new_tokens=20, stream=streams[q])))
                for q in table}
            kept = await asks["kept"]
            voted = await asks["voted"]
            for stream in streams.values():
                stream.close()
            await asyncio.gather(*readers)
            return kept, voted, seen, sched.stats, asks["dropped"]
        finally:
            await sched.stop()
            pool.shutdown()

    kept, voted, seen, stats, _dropped = run(main())
    assert seen["kept"][0] == (PLAN, {"streams": "smollm2", "why": "the top-scored expert's answer is the answer",
                                      "router": "table", "experts": ["smollm2"]})
    kept_text = "".join(str(p) for k, p in seen["kept"] if k == DELTA)
    assert kept_text == kept.text and len([k for k, _ in seen["kept"] if k == DELTA]) == len(kept.text.split())
    # A vote cannot stream: its plan says so, and no delta came before the answer.
    assert seen["voted"][0][1]["streams"] is None and "vote" in seen["voted"][0][1]["why"]
    assert [k for k, _ in seen["voted"]] == [PLAN]
    # The dropped row stopped after its first word; the kept one generated all 20 steps in the same call.
    assert [k for k, _ in seen["dropped"]] == [PLAN, DELTA]
    kept_tokens = kept.usage["smollm2"]["completion_tokens"]
    assert kept_tokens == 20
    assert stats.batch_sizes.count(3) == 1  # kept, dropped and voted's smollm2 row: one call
    dropped_tokens = stats.generated_tokens - kept_tokens - sum(u["completion_tokens"] for u in voted.usage.values())
    assert 1 <= dropped_tokens < 20
