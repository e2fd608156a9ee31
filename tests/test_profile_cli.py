"""`concilium profile`: imported from recorded outcomes, and live with the two real bundled experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_eval_cli import concilium, mmlu_slice  # noqa: F401  (fixture)


@pytest.mark.models
def test_imported_profiles_load_into_a_working_router(mmlu_slice, tmp_path):  # noqa: F811
    out = tmp_path / "prof"
    proc = concilium("profile", "--data", str(mmlu_slice), "--pool", "open-small", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    version = (out / "LATEST").read_text().strip()
    folder = out / version
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"]["kind"] == "imported" and summary["index"] == "flat"
    assert len(summary["experts"]) == 15 and summary["n_skills"] > 100
    best = summary["aggregator_ranking"][0]
    assert summary["experts"][best]["accuracy"] == max(e["accuracy"] for e in summary["experts"].values())

    from routers.base import RouteOptions
    from routers.embedding import Embedder
    from routers.symbolic import SkillRouter
    from workers.model_store import embedder_path

    router = SkillRouter.from_artifacts(folder, Embedder(embedder_path()))
    d = router.route(["What is the derivative of a polynomial?", "???"], RouteOptions(k=3))
    assert len(d[0].experts) == 3 and len(set(d[0].experts)) == 3 and d[0].skills
    assert d[0].trace["mapped"] and d[0].fallback is None
    assert d[1].skills == [] and d[1].fallback == "no skills found: overall accuracy"
    overall = dict(zip(router.profiles.experts, router.profiles.overall))
    assert d[1].experts == sorted(overall, key=lambda e: -overall[e])[:3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one source"),
        (("--tasks", "/no/such.json"), "cannot read task file /no/such.json"),
        (("--data", "/tmp", "--annotator", "smollm2"), "--annotator needs a live run"),
    ],
)
def test_profile_bad_input(args, message):
    proc = concilium("profile", *args)
    assert proc.returncode == 2
    assert message in " ".join(proc.stderr.split())


@pytest.mark.models
def test_live_profiles_from_the_bundled_experts(bench_data, store, tmp_path):
    out = tmp_path / "live"
    tasks = bench_data / "symbolic-moe-tasks" / "MMLU_Pro_train.json"
    proc = concilium("profile", "--tasks", str(tasks), "--limit", "4", "-n", "8", "--annotator", "smollm2",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    folder = out / (out / "LATEST").read_text().strip()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"] == {
        "kind": "live", "tasks": str(tasks), "limit": 4, "annotator": "smollm2", "n_questions": 4,
    }
    assert summary["aggregator_ranking_method"].startswith("synthesis test")
    assert sorted(summary["aggregator_ranking"]) == ["gemma3", "smollm2"]
    assert set(summary["experts"]) == {"smollm2", "gemma3"}
    from routers.profiles import Profiles

    p = Profiles.load(folder)
    # Every question's keywords were counted once per expert; accuracies are graded fractions of 4.
    assert np.allclose(p.overall * 4, np.round(p.overall * 4))
    assert (p.seen[:, 0] == p.seen[:, 1]).all() and p.seen.max() <= 4
