"""Offline = live: the served pipeline, over replay experts that answer with the recorded MMLU-Pro answers, picks
question by question what offline evaluation picks on the same folds: the same experts asked, the same answer
counted, the same grade. Any difference is a bug in one of the two paths (the scheduler, the planner, the vote,
a cascade's agreement, a cost target's λ, the replay backend, or the offline scorer).

A slice runs here (6 models of a wide price range, 200 dev questions); `docs/benchmarks.md` has the full run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config, parse_config
from orchestrator.embedders import encoder
from orchestrator.engine.pipeline import Pipeline
from orchestrator.evals.runs import Flow, LiveSettings, evaluate, labelled, parity_candidates
from tests.conftest import STORE_ROOT, run

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct", "Qwen1.5-72B-Chat",
          "Meta-Llama-3_1-8B-Instruct", "Mistral-7B-Instruct-v0.2"]
"""Prices from 0.18 to 5 USD per 1M output tokens, so a budget of 0.4x the best expert's cost can be met."""
CANDIDATES = parity_candidates()


@pytest.fixture(scope="module")
def result(ray_cluster, store, bench_data):
    folder = bench_data / "mmlu-pro-28llm"
    config = parse_config({"routing": {"max_batch": 64}, "experts": [
        {"name": m, "backend": "replay", "path": str(folder), "model": m} for m in MODELS]})
    settings = LiveSettings(folder, CANDIDATES, folds=5, limit=200, concurrency=64)
    data, rows = labelled(settings)

    async def main() -> dict:
        pipeline = await Pipeline.start(config)
        try:
            flow = Flow(pipeline, data, settings, encoder("static", STORE_ROOT), lambda: None)
            return await evaluate(flow, config, rows)
        finally:
            await pipeline.close()

    return run(main())


def test_every_live_pick_is_the_offline_pick(result):
    checks = {c["configuration"]: c for c in result["parity"]}
    assert list(checks) == [c.name for c in CANDIDATES]
    for name, check in checks.items():
        assert check["questions"] == 200, name
        assert check["differences"] == 0, check["examples"]
        assert check["live_accuracy"] == check["offline_accuracy"], name


def test_the_table_has_each_expert_alone_first_with_the_recorded_costs(result):
    rows = result["rows"]
    assert [r["name"] for r in rows[: len(MODELS)]] == [f"{m} alone" for m in MODELS]
    assert all(r["n"] == 200 and r["errors"] == 0 for r in rows)
    assert all(r["cost_per_query_usd"] > 0 for r in rows)  # the replayed records' own costs, not token guesses
    cascade, budgeted = rows[-2], rows[-1]
    assert cascade["calls_per_query"] <= 2.0 * 1.1  # held to two calls a query on average (what the folds solved for)
    best = max(rows[: len(MODELS)], key=lambda r: r["accuracy"])
    assert budgeted["cost_per_query_usd"] < best["cost_per_query_usd"]  # held to 0.4x the best expert's cost
    assert len(budgeted["lambdas"]) == 5  # a λ solved on each fold's training part


def test_the_shipped_replay_fleet_is_the_28_recorded_models(bench_data):
    """``deploy/concilium.replay-mmlu.yaml`` (the full run's fleet) validates and names every recorded model."""
    config = load_config(ROOT / "deploy" / "concilium.replay-mmlu.yaml")
    models = json.loads((bench_data / "mmlu-pro-28llm" / "models.json").read_text())
    assert [e.name for e in config.experts] == [e.model for e in config.experts] == models
    assert {e.backend for e in config.experts} == {"replay"}
