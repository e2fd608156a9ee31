"""`concilium profile`: imported from recorded outcomes, and live with the two real bundled experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_eval_cli import concilium, mmlu_slice  # noqa: F401  (fixture)

pytestmark = pytest.mark.long


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

    from orchestrator.embedders import encoder
    from orchestrator.env import model_store_root
    from routers.base import RouteOptions
    from routers.symbolic import SkillRouter

    router = SkillRouter.from_artifacts(folder, encoder(summary["encoder"], model_store_root()))
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
        (("--tasks", "/no/such.json"), "cannot read /no/such.json"),
        (("--data", "/tmp", "--annotator", "smollm2"), "--annotator needs a live run"),
    ],
)
def test_profile_bad_input(args, message):
    proc = concilium("profile", *args)
    assert proc.returncode == 2
    assert message in " ".join(proc.stderr.split())


@pytest.mark.models
def test_live_profiles_from_the_bundled_experts(store, tmp_path):
    """What `make serve` does once, on fewer questions: the bundled experts answer starter questions through the
    served pipeline, an expert names the skills, the synthesis test ranks aggregators, and the served configuration
    is chosen; the service then routes with `auto` from this profile, and says so."""
    from orchestrator.cli.live import STARTER

    out = tmp_path / "live"
    proc = concilium("profile", "--starter", "--limit", "8", "-n", "8", "--folds", "2", "--annotator", "smollm2",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    folder = out / (out / "LATEST").read_text().strip()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["source"] == {
        "kind": "live", "tasks": str(STARTER), "half": "profile", "limit": 8, "annotator": "smollm2",
        "n_questions": 8,
    }
    assert summary["aggregator_ranking_method"].startswith("synthesis test")
    assert sorted(summary["aggregator_ranking"]) == ["gemma3", "smollm2"]
    assert set(summary["experts"]) == {"smollm2", "gemma3"}
    served = summary["served"]
    # 8 questions decide nothing beyond chance: the best single expert alone is served.
    assert served["name"] == f"{served['best_single']['expert']} alone" and served["router"] == "best_single"
    assert summary["selection"]["chosen"] == "best_single"
    from routers.profiles import Profiles

    p = Profiles.load(folder)
    # Accuracies are graded fractions of 8; every keyword the annotator agreed on (sampled, so how many differs
    # from run to run and from CPU to CPU) was counted once per expert.
    assert np.allclose(p.overall * 8, np.round(p.overall * 8))
    assert p.seen.size == 0 or ((p.seen[:, 0] == p.seen[:, 1]).all() and p.seen.max() <= 8)

    from orchestrator.config import ConciliumConfig
    from orchestrator.engine.pipeline import load_routers
    from routers.base import RouteOptions

    routers, _, _ = load_routers(ConciliumConfig(routing={"profiles": out}), ["smollm2", "gemma3"])
    assert next(iter(routers)) == "auto"
    decision = routers["auto"].route(["What is the capital of Peru?"], RouteOptions(k=2))[0]
    assert decision.trace["selected"] == {"router": "best_single", "profile": folder.name, "served": {
        key: served[key] for key in ("name", "cv_accuracy", "best_single", "n_questions")}}
