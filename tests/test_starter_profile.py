"""The calibration path of the README, for real, with the two bundled experts, on a slice of the starter
questions written as one's own labelled JSONL (8 a category, 56 in all, 28 a half): `concilium profile --tasks`
chooses the served configuration on the profile half by cross-validation on served answers, `concilium eval
--live --served` measures it on the report half beside each expert alone, and `concilium serve` serves it, naming
it in each answer's trace beside the best single expert's score. (`make serve` profiles on the whole profile half;
its figures, and those of the whole report half, are in docs/benchmarks.md.)

Greedy text of tiny models differs between CPUs in a few answers, so the assertions are what holds everywhere:
the structure of the choice and of the table, the README question's answer, and that the served default is not
worse than the best single expert alone by more than chance allows (an exact sign test on the report half).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from orchestrator.evals.choose import SIGNIFICANCE, sign_test
from tests.live import ProcessServer, write_config

pytestmark = [pytest.mark.models, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]
FAST = ["-n", "24", "--concurrency", "32"]
"""Short answers, many in flight: the starter questions want a word or a line."""
PER_CATEGORY = 8


def concilium(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=1500, cwd=ROOT, env={**os.environ, **env})


@pytest.fixture(scope="module")
def mine(tmp_path_factory) -> Path:
    """The first questions of each starter category, as a user's own labelled file."""
    from orchestrator.cli.live import STARTER

    rows, seen = [], {}
    for line in STARTER.read_text().splitlines():
        row = json.loads(line)
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        if seen[row["category"]] <= PER_CATEGORY:
            rows.append(line)
    path = tmp_path_factory.mktemp("mine") / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def profile(store, mine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("starter-profile")
    proc = concilium("profile", "--tasks", str(mine), "--half", "profile", *FAST, "--no-select-aggregator",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join(proc.stdout.split())
    assert "served:" in said and "best single expert alone" in said
    return out


def test_the_profile_chooses_a_whole_configuration_against_the_best_single_expert(profile):
    summary = json.loads((profile / (profile / "LATEST").read_text().strip() / "summary.json").read_text())
    assert summary["source"]["half"] == "profile" and summary["source"]["n_questions"] == 7 * PER_CATEGORY // 2
    served, names = summary["served"], {c["name"] for c in summary["served"]["candidates"]}
    best = served["best_single"]
    assert best["expert"] in {"smollm2", "gemma3"} and f"{best['expert']} alone" in names
    assert {"cluster k=1 best", "per_category k=1 best", "cluster k=2 vote", "cluster k=2 vote adaptive",
            "cluster k=2 vote cascade", "cluster k=2 synthesize"} <= names  # a synthesis is scored live
    assert served["cv_accuracy"] >= best["cv_accuracy"]  # the incumbent stays unless beaten beyond chance
    assert summary["selection"]["chosen"] == served["router"]


def test_the_served_default_on_the_report_half_beside_each_expert_alone(profile, mine, tmp_path):
    report = tmp_path / "report.json"
    proc = concilium("eval", "--live", "--train", str(mine), "--half", "report", "--served", "--candidates", "none",
                     *FAST,
                     "--json", str(report),
                     "--plots", str(tmp_path), CONCILIUM_PROFILES=str(profile))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"] for r in rows[:2]] == ["smollm2 alone", "gemma3 alone"] and rows[2]["name"].startswith("auto")
    assert all(r["n"] == 7 * PER_CATEGORY // 2 and r["errors"] == 0 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
               for r in rows)
    best = max(rows[:2], key=lambda r: r["accuracy"])
    default = rows[2]["questions"]["correct"]
    assert sign_test(best["questions"]["correct"], default) >= SIGNIFICANCE, (best["accuracy"], rows[2]["accuracy"])
    assert (tmp_path / "live.png").stat().st_size > 10_000


def test_the_service_serves_the_choice_and_says_so(profile, tmp_path):
    config = write_config(tmp_path / "c.yaml", {"routing": {"profiles": str(profile)}})
    server = ProcessServer(config, {}, tmp_path / "serve.log")
    try:
        r = httpx.post(f"{server.url}/v1/query", json={"query": "What is the capital of France?",
                                                        "max_tokens": 32}, timeout=300)
    finally:
        server.kill()
    assert r.status_code == 200, r.text
    body = r.json()
    assert "paris" in body["answer"].lower()
    served = body["routing"]["trace"]["selected"]["served"]
    assert served["name"] and 0 <= served["cv_accuracy"] <= 1 and served["best_single"]["expert"]
