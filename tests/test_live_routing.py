"""Learned routing live: a profile built by `concilium profile` is served by the API, `auto` (the router its
selection chose) routes by default, and the other candidates and the planned policies are there by name.

The experts replay recorded MMLU-Pro answers (three real models), so the profile's experts are the served ones.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.live import ThreadServer
from tests.test_eval_cli import concilium, write_slice

pytestmark = [pytest.mark.models, pytest.mark.ray]

MODELS = ("gemini-1.5-pro-002", "Qwen1.5-72B-Chat", "Meta-Llama-3_1-70B-Instruct")


@pytest.fixture(scope="module")
def profiled(bench_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live-routing")
    source = bench_data / "mmlu-pro-28llm"
    data = write_slice(source, tmp / "data", slice(600))
    (data / "prices.json").write_text((source / "prices.json").read_text())
    proc = concilium("profile", "--data", str(data), "--models", ",".join(MODELS), "--out", str(tmp / "profiles"))
    assert proc.returncode == 0, proc.stderr
    assert "served:" in proc.stdout
    folder = tmp / "profiles" / (tmp / "profiles" / "LATEST").read_text().strip()
    return tmp / "profiles", folder, json.loads((folder / "summary.json").read_text()), source


@pytest.fixture(scope="module")
def server(ray_cluster, profiled):
    profiles, _, _, source = profiled
    s = ThreadServer({
        "ray": {"namespace": f"live-{uuid.uuid4().hex[:6]}"},
        "routing": {"profiles": str(profiles), "aggregation": "vote", "max_wait_ms": 5},
        "experts": [{"name": m, "backend": "replay", "path": str(source), "model": m} for m in MODELS],
    })
    yield s
    s.stop()


def test_the_profile_records_every_candidate_and_the_choice(profiled):
    """Recorded outcomes have no synthesis to score: every other configuration of the grid is, by cross-validation,
    against the best single expert alone, and `auto` serves the choice's router."""
    _, folder, summary, _ = profiled
    served, selection = summary["served"], summary["selection"]
    assert summary["encoder"] == "static" and set(summary["candidates"]) >= {
        "cluster", "logistic", "irt", "skill", "knn", "per_category", "best_single"}
    scored = {c["name"]: c["cv_accuracy"] for c in served["candidates"]}
    assert scored == selection["scores"] and f"{served['best_single']['expert']} alone" in scored
    assert {"cluster k=1 best", "cluster k=3 vote", "cluster k=3 vote cascade", "knn k=2 vote"} <= set(scored)
    assert not any("synthesize" in name for name in scored)
    assert served["cv_accuracy"] >= served["best_single"]["cv_accuracy"] and selection["chosen"] == served["router"]
    for name in summary["candidates"]:
        assert (folder / ("profiles.json" if name == "skill" else f"{name}.npz")).exists()


def test_auto_routes_by_default_and_says_which_profile_and_router(server, profiled):
    _, folder, summary, _ = profiled
    r = httpx.post(f"{server.url}/v1/route", json={"query": "What is the derivative of x squared?", "k": 2}).json()
    routing = r["routing"]
    chosen = summary["selection"]["chosen"]
    assert routing["router"] == "auto" and len(routing["experts"]) == (1 if chosen == "best_single" else 2)
    assert routing["trace"]["selected"]["router"] == chosen
    assert routing["trace"]["selected"]["profile"] == folder.name
    assert routing["trace"]["selected"]["served"]["name"] == summary["served"]["name"]
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert {"concilium/auto", "concilium/cluster", "concilium/per_category", "concilium/knn"} <= models


def test_a_cascade_and_an_adaptive_query_through_the_api(server):
    question = "Which of the following best describes the role of a central bank in monetary policy?"
    cascade = httpx.post(f"{server.url}/v1/query", json={"query": question, "router": "cluster",
                                                         "policy": "cascade", "k": 2}, timeout=120)
    assert cascade.status_code == 200, cascade.text
    trace = cascade.json()["routing"]["trace"]
    assert trace["plan"]["ask"] >= 1 and "rounds" in trace or trace["plan"]["ask"] == trace["plan"]["up_to"]
    assert set(trace["estimated_cost_usd"]) == set(MODELS)  # a per-query cost estimate for every expert
    adaptive = httpx.post(f"{server.url}/v1/route", json={"query": question, "router": "logistic",
                                                          "policy": "adaptive"}).json()["routing"]
    assert len(adaptive["experts"]) == adaptive["trace"]["plan"]["ask"]
    refused = httpx.post(f"{server.url}/v1/route", json={"query": question, "router": "knn", "policy": "cascade"})
    assert refused.status_code == 422 and "quality estimate" in refused.json()["error"]["message"]
