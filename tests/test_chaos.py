"""Chaos under streaming load (docs/reliability.md, "Chaos"): ``concilium bench chaos``'s scenario, shortened, with
real processes: a redis-server with its append-only file, two ``concilium serve`` API processes sharing it (each
with its own local Ray and two simulated experts that stream a word per step), streaming clients on the official
``openai`` package, plain queries and jobs. During the load an expert actor is killed mid-stream, another is
stalled past the expert time limit, redis-server is killed and started again, and one API process is killed.

The experts are simulated because the faults, not the text, are under test; everything else is real.
"""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.bench.chaos import ChaosSettings, run_chaos

pytestmark = [pytest.mark.ray, pytest.mark.long]


def test_under_faults_no_client_hangs_no_job_is_lost_and_usage_equals_what_was_served():
    report = asyncio.run(run_chaos(ChaosSettings(duration_s=20, streams=8, queries=2, jobs=2, stall_s=4.5),
                                   lambda _: None))
    assert len(report.faults) == 6, report.faults  # every fault happened during the load
    counts = report.counts()
    assert counts[("stream", "complete")] > 0 and counts[("job", "accepted")] > 0
    assert report.hung == 0  # every client ended before its deadline
    assert report.stray_cuts == 0  # a connection dropped only where the API process was killed
    assert all(o.result in ("complete", "accepted", "sse_error", "http_error", "cut") for o in report.outcomes)
    assert report.jobs and report.lost_jobs == 0  # every accepted job ended, on the surviving process
    # Counted once each, none lost: equal, unless the kill landed between an answer's count and its last chunk
    # (then usage holds that cut answer too, and no more).
    assert report.usage_usd >= report.served_usd - 1e-9 and report.usage_matches
