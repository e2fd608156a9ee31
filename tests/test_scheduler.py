"""The batched-by-expert scheduler with the real pool on real Ray, under a budget that fits one expert.

The router here is a fixed table of assignments, a test double for routing
only. It makes the windows' contents exact, so the invariants can be checked
exactly. The pool and its actors are real. The experts are simulated copies of
the two bundled models (their names and their sizes, 0.5 and 1.0 GiB, so that
1.2 GiB holds one): these tests are about what runs when, not about the text,
and real generation through the scheduler is tested end to end by
``test_api.py``, ``test_cli.py`` and ``test_latent_mode.py``. A broken expert is
a real transformers expert whose model cannot load.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import numpy as np
import pytest

from orchestrator.engine.requests import AllExpertsFailed, QueryRequest, RequestError
from orchestrator.engine.scheduler import Scheduler
from orchestrator.engine.settings import SchedulerSettings
from routers.base import Decision, RouteOptions
from tests.conftest import STORE_ROOT, run
from workers.config import PoolConfig, SimulatedExpert, TransformersExpert
from workers.pool import ExpertPool
from workers.types import Price


class TableRouter:
    """Routes each query by a fixed table: query text → recruited experts (duplicates allowed)."""

    name = "table"

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.windows: list[list[str]] = []

    def fit(self, train) -> None:  # noqa: ANN001
        raise NotImplementedError

    def route(self, texts, options, vectors=None, categories=None):  # noqa: ANN001, ANN201
        self.windows.append(list(texts))
        return [
            Decision(experts=list(self.table[t]), scores={"smollm2": 0.9, "gemma3": 0.4}, aggregator="smollm2")
            for t in texts
        ]


EXPERTS = [
    SimulatedExpert(backend="simulated", name="smollm2", memory_gb=0.5, load_s=0.2, step_s=0.005),
    SimulatedExpert(backend="simulated", name="gemma3", memory_gb=1.0, load_s=0.4, step_s=0.01),
]


async def _scheduler(table, budget_gb=1.2, experts=EXPERTS, **settings):
    pool = await ExpertPool.start(experts, PoolConfig(memory_budget_gb={"cpu": budget_gb}), STORE_ROOT,
                                  namespace=f"t-{uuid.uuid4().hex[:8]}")
    router = TableRouter(table)
    sched = Scheduler({"table": router}, pool, SchedulerSettings(**settings), {"smollm2": Price(1e-4, 1e-4), "gemma3": Price(2e-4, 2e-4)})
    sched.start()
    return sched, router, pool


def test_one_load_per_expert_per_window_every_request_once_duplicates_in_one_call(ray_cluster):
    table = {
        "What is 2+2?": ["smollm2", "gemma3"],
        "Name a colour.": ["gemma3", "gemma3", "smollm2"],  # a duplicate: two samples, one call
        "What is the capital of Italy?": ["smollm2"],
        "Name a fruit.": ["gemma3"],
        "Say hello.": ["smollm2", "smollm2"],
        "Count to three.": ["gemma3", "smollm2"],
    }

    async def main():
        sched, router, pool = await _scheduler(table, max_batch=64, max_wait_ms=300)
        try:
            requests = [QueryRequest(q, aggregation="best", max_new_tokens=6) for q in table]
            answers = await asyncio.gather(*(sched.submit(r) for r in requests))
            return answers, sched.stats, router.windows, pool.stats
        finally:
            await sched.stop()
            pool.shutdown()

    answers, stats, windows, pool_stats = run(main())
    assert len(windows) == 1 and sorted(windows[0]) == sorted(table)  # one window, one routing call
    # Each request answered exactly once, by exactly the experts it was routed to (with multiplicity).
    assert len(answers) == len(table)
    for (query, experts), ans in zip(table.items(), answers):
        assert sorted(a.expert for a in ans.answers) == sorted(experts)
        assert ans.text and ans.aggregation_skipped in {"strategy best", "a single answer"}
    # One batched call per expert; the duplicates are rows of those calls.
    assert stats.expert_calls == 2
    rows = Counter(e for experts in table.values() for e in experts)  # smollm2: 6, gemma3: 5 (one duplicate)
    assert sorted(stats.batch_sizes) == sorted(rows.values()) == [5, 6]
    # The budget fits one model: each expert loaded exactly once in the window, never twice.
    assert stats.loads_per_window == [2] == stats.distinct_experts_per_window
    assert pool_stats.loads_by_expert == {"smollm2": 1, "gemma3": 1}
    assert all(a.cost_usd > 0 and a.timings["total_s"] >= a.timings["queue_s"] for a in answers)


def test_windows_close_at_max_batch(ray_cluster):
    table = {f"Say the number {i}.": ["smollm2"] for i in range(5)}

    async def main():
        sched, router, pool = await _scheduler(table, max_batch=2, max_wait_ms=200)
        try:
            await asyncio.gather(*(sched.submit(QueryRequest(q, aggregation="best", max_new_tokens=6)) for q in table))
            return router.windows, sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    windows, stats = run(main())
    assert [len(w) for w in windows] == [2, 2, 1]
    assert stats.requests == 5 and stats.windows == 3


def test_synthesis_batches_by_aggregator_and_consensus_skips(ray_cluster):
    table = {"What is the capital of France?": ["smollm2", "gemma3"], "Say yes.": ["smollm2", "smollm2"]}

    async def main():
        sched, _, pool = await _scheduler(table, budget_gb=4.0, max_wait_ms=200)
        try:
            return await asyncio.gather(
                *(sched.submit(QueryRequest(q, aggregation="synthesize", max_new_tokens=6)) for q in table)
            ), sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    (france, yes), stats = run(main())
    # Two identical greedy samples agree: no aggregator call, and the answer says why.
    assert yes.aggregator is None and yes.aggregation_skipped.startswith("consensus")
    if france.aggregation_skipped is None:  # the two models disagreed: smollm2 synthesised
        assert france.aggregator == "smollm2" and "smollm2" in france.usage
        assert stats.expert_calls == 3  # two solve calls + one aggregation call
    else:
        assert stats.expert_calls == 2


def test_bad_requests_are_rejected_before_queueing(ray_cluster):
    async def main():
        sched, router, pool = await _scheduler({})
        try:
            for req, msg in [
                (QueryRequest("hi", aggregation="median"), "unknown aggregation 'median'"),
                (QueryRequest("hi", experts=["gpt-9"]), "unknown expert(s) gpt-9"),
                (QueryRequest("   "), "the query is empty"),
                (QueryRequest("hi", experts=[]), "allow-list is empty"),
                (QueryRequest("hi", max_new_tokens=0), "max_new_tokens must be at least 1"),
                (QueryRequest("hi", temperature=-1.0), "temperature must be 0"),
            ]:
                with pytest.raises(RequestError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                    await sched.submit(req)
            return router.windows
        finally:
            await sched.stop()
            pool.shutdown()

    assert run(main()) == []  # nothing reached a window


def test_failed_expert_degrades_and_reroutes(ray_cluster, tmp_path):
    """A broken expert fails its rows; a request that lost every expert goes to the next-ranked one."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nope"}')
    experts = [EXPERTS[0], TransformersExpert(name="gemma3", source=str(broken), memory_gb=0.1)]
    table = {"Say hi.": ["smollm2", "gemma3"], "Say bye.": ["gemma3"]}

    async def main():
        sched, _, pool = await _scheduler(table, budget_gb=4.0, experts=experts, max_wait_ms=200)
        try:
            return await asyncio.gather(
                *(sched.submit(QueryRequest(q, aggregation="best", max_new_tokens=6)) for q in table)
            )
        finally:
            await sched.stop()
            pool.shutdown()

    hi, bye = run(main())
    assert [a.expert for a in hi.answers] == ["smollm2"] and any("gemma3 failed" in d for d in hi.degraded)
    assert [a.expert for a in bye.answers] == ["smollm2"]
    assert any("re-routed to smollm2" in d for d in bye.degraded)


def test_a_request_that_loses_every_expert_fails_clearly(ray_cluster, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nope"}')
    experts = [TransformersExpert(name="gemma3", source=str(broken), memory_gb=0.1)]

    async def main():
        sched, _, pool = await _scheduler({"Say hi.": ["gemma3"]}, experts=experts, max_wait_ms=50)
        try:
            with pytest.raises(AllExpertsFailed, match="every recruited expert failed: gemma3 failed"):
                await sched.submit(QueryRequest("Say hi.", aggregation="best", max_new_tokens=6))
        finally:
            await sched.stop()
            pool.shutdown()

    run(main())


def test_allow_list_restricts_recruitment(ray_cluster):
    async def main():
        sched, _, pool = await _scheduler({"Say hi.": ["smollm2", "gemma3"]}, budget_gb=4.0, max_wait_ms=50)
        try:
            return await sched.submit(QueryRequest("Say hi.", RouteOptions(k=1), "best", ["gemma3"], max_new_tokens=6))
        finally:
            await sched.stop()
            pool.shutdown()

    ans = run(main())
    assert [a.expert for a in ans.answers] == ["gemma3"] and ans.decision.trace["allow_list"] == ["gemma3"]
    assert np.isclose(ans.decision.scores["gemma3"], 0.4)


def test_moa_runs_proposer_layers_batched_by_expert(ray_cluster):
    """Two layers: both experts answer, then answer again with the first layer as references; one call per
    expert per layer; usage counts every layer."""
    table = {"What is the capital of Spain?": ["smollm2", "gemma3"], "Name a planet.": ["smollm2", "gemma3"]}

    async def main():
        sched, _, pool = await _scheduler(table, budget_gb=4.0, max_wait_ms=200, moa_layers=2)
        try:
            answers = await asyncio.gather(
                *(sched.submit(QueryRequest(q, aggregation="moa", max_new_tokens=6)) for q in table)
            )
            return answers, sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    answers, stats = run(main())
    for ans in answers:
        assert [sorted(layer) for layer in ans.decision.trace["moa_layers"]] == [["gemma3", "smollm2"]] * 2
        assert sorted(a.expert for a in ans.answers) == ["gemma3", "smollm2"]  # the last layer is aggregated
        layer_tokens = sum(a.completion_tokens for a in ans.answers)
        assert sum(u["completion_tokens"] for u in ans.usage.values()) > layer_tokens  # layer 1 is counted too
    # Two solve calls per layer, both requests in each; then at most one aggregation call per aggregator.
    assert stats.batch_sizes[:4] == [2, 2, 2, 2] and stats.expert_calls in (4, 5)


def test_self_moa_samples_the_best_expert_in_one_call(ray_cluster):
    table = {"Write one word about the sea.": ["gemma3", "smollm2"]}

    async def main():
        sched, _, pool = await _scheduler(table, budget_gb=4.0, max_wait_ms=50)
        try:
            ans = await sched.submit(
                QueryRequest("Write one word about the sea.", RouteOptions(k=3), "self-moa", max_new_tokens=6)
            )
            return ans, sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    ans, stats = run(main())
    # smollm2 has the top score (0.9): three samples from it, as three rows of one call.
    assert [a.expert for a in ans.answers] == ["smollm2"] * 3
    assert stats.batch_sizes[0] == 3
    assert ans.decision.aggregator == "smollm2" and ans.decision.trace["aggregator_choice"].startswith("self-moa")
    assert ans.aggregator in ("smollm2", None)


def test_configured_aggregator_preference(ray_cluster):
    table = {"Say a colour.": ["smollm2", "gemma3"]}

    async def main():
        sched, _, pool = await _scheduler(table, budget_gb=4.0, max_wait_ms=50, aggregators=("gemma3", "smollm2"),
                                          aggregator_source="the test's ranking")
        try:
            preferred = await sched.submit(QueryRequest("Say a colour.", aggregation="synthesize", max_new_tokens=6))
            restricted = await sched.submit(
                QueryRequest("Say a colour.", RouteOptions(k=1), "synthesize", ["smollm2"], max_new_tokens=6)
            )
            return preferred, restricted
        finally:
            await sched.stop()
            pool.shutdown()

    preferred, restricted = run(main())
    # The router named smollm2; the ranking's first allowed expert wins.
    assert preferred.decision.aggregator == "gemma3"
    assert preferred.decision.trace["aggregator_choice"] == "the test's ranking"
    assert preferred.aggregator in ("gemma3", None)
    assert restricted.decision.aggregator == "smollm2"  # gemma3 is not on the allow-list


def test_a_cascade_escalates_only_where_the_first_answers_disagree(ray_cluster, bench_data):
    """Replay experts answer with their recorded MMLU-Pro answers, so whether the first round agrees is known in
    advance: the second round runs for the disagreeing query alone, batched, and each trace shows its rounds."""
    from workers.config import ReplayExpert
    from workers.recorded import load_recorded

    folder = bench_data / "mmlu-pro-28llm"
    data = load_recorded(folder)
    a, b, c = (data.model_index(m) for m in ("gemini-1.5-pro-002", "Qwen1.5-72B-Chat", "Meta-Llama-3_1-70B-Instruct"))
    agreeing = next(r for r in data.records if r.pred[a] and r.pred[a] == r.pred[b])
    split = next(r for r in data.records if r.pred[a] and r.pred[b] and r.pred[a] != r.pred[b])
    names = {"gemini-1.5-pro-002": "pro", "Qwen1.5-72B-Chat": "qwen", "Meta-Llama-3_1-70B-Instruct": "llama"}
    experts = [ReplayExpert(backend="replay", name=n, path=folder, model=m) for m, n in names.items()]

    class CascadeRouter:
        def route(self, texts, options, vectors=None, categories=None):  # noqa: ANN001, ANN201
            return [Decision(experts=["pro", "qwen"], escalate=["llama"], scores={"pro": 0.9, "qwen": 0.6,
                                                                                  "llama": 0.7}) for _ in texts]

    async def main():
        pool = await ExpertPool.start(experts, PoolConfig(), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")
        sched = Scheduler({"cascade": CascadeRouter()}, pool, SchedulerSettings(max_wait_ms=200), {})
        sched.start()
        try:
            return await asyncio.gather(*(sched.submit(QueryRequest(r.text, aggregation="vote"))
                                          for r in (agreeing, split))), sched.stats
        finally:
            await sched.stop()
            pool.shutdown()

    (same, differ), stats = run(main())
    assert sorted(x.expert for x in same.answers) == ["pro", "qwen"]
    assert same.decision.trace["rounds"] == [["pro", "qwen"]] and "agree" in same.decision.trace["stopped"]
    assert sorted(x.expert for x in differ.answers) == ["llama", "pro", "qwen"]
    assert differ.decision.trace["rounds"] == [["pro", "qwen"], ["llama"]]
    # Round one: one call each for pro and qwen with both queries; round two: one call for llama, one row.
    assert stats.expert_calls == 3 and sorted(stats.batch_sizes) == [1, 2, 2]
    assert "llama" not in same.usage and "llama" in differ.usage
