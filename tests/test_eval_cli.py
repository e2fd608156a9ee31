"""`concilium eval` on slices of the real bench-data files, as other tools call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MMLU_SLICE = 400


def concilium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


def write_slice(src, folder, rows):
    """A bench-data folder holding the given rows (a slice object) of ``src``: real outcomes, fewer of them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.json").write_text((src / "models.json").read_text())
    with (src / "data.jsonl").open() as fh:
        (folder / "data.jsonl").write_text("".join(fh.readlines()[rows]))
    return folder


@pytest.fixture(scope="module")
def mmlu_slice(bench_data, tmp_path_factory):
    """The first 400 dev questions: small enough to embed in seconds."""
    return write_slice(bench_data / "mmlu-pro-28llm", tmp_path_factory.mktemp("mmlu-slice"), slice(MMLU_SLICE))


@pytest.mark.models
@pytest.mark.parametrize("router", ["skill", "knn", "cluster"])
def test_eval_writes_the_contract_json(mmlu_slice, tmp_path, router):
    out = tmp_path / "r.json"
    proc = concilium("eval", "--train", str(mmlu_slice), "--pool", "open-small", "--router", router,
                     "--k", "3", "--folds", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["n_queries"] == MMLU_SLICE and result["k"] == 3 and result["router"] == router
    assert result["mean_cost"] is None and len(result["experts"]) == 15
    b = result["baselines"]
    assert {"best_single", "per_category", "random", "oracle"} <= set(b)
    assert b["random"]["accuracy"] < result["accuracy"] <= b["oracle"]["accuracy"]
    assert b["best_single"]["name"] in result["experts"]
    assert f"{router} router" in proc.stdout
    assert result["mean_experts"] == 3.0 and 0 <= result["calibration_error"] < 0.2
    assert "calibration error (ECE, 10 bins)" in proc.stdout


@pytest.mark.models
def test_symbolic_policy_is_seeded(mmlu_slice, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"s{i}.json"
        proc = concilium("eval", "--train", str(mmlu_slice), "--models", "gemma-7b,Yi-6B,mathstral-7B",
                         "--router", "skill", "--policy", "symbolic", "--folds", "2", "--seed", "5", "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(out.read_text())["accuracy"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--pool", "huge"), "unknown pool 'huge'; named pools: open-small"),
        (("--models", "gemma-7b,gpt-9"), "the data has no model(s) gpt-9"),
        (("--k", "0"), "k must be at least 1"),
        (("--router", "magic"), "unknown router 'magic'"),
        (("--aggregation", "mean"), "unknown aggregation 'mean'"),
        # These two are checked once the questions are embedded, which needs MiniLM.
        pytest.param(("--folds", "1"), "at least 2 folds", marks=pytest.mark.models),
        pytest.param(("--budget-share", "0.5"), "a budget needs cost data", marks=pytest.mark.models),
    ],
)
def test_eval_bad_input(mmlu_slice, args, message):
    proc = concilium("eval", "--train", str(mmlu_slice), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


def test_eval_names_the_broken_line(tmp_path):
    (tmp_path / "models.json").write_text('["a", "b"]')
    (tmp_path / "data.jsonl").write_text('{"question_id": 1, "question": "q", "correct": [1]}\n')
    proc = concilium("eval", "--train", str(tmp_path))
    assert proc.returncode == 2
    assert "data.jsonl:1: 'correct' must be a list of 2 values" in " ".join(proc.stderr.split())


@pytest.fixture(scope="module")
def routerbench_slice(bench_data, tmp_path_factory):
    """Every 7th query: all three tasks, about 320 queries."""
    return write_slice(bench_data / "routerbench-arc-wino-mbpp", tmp_path_factory.mktemp("rb"), slice(None, None, 7))


@pytest.mark.models
def test_cost_frontier_aiq_and_plots(routerbench_slice, tmp_path):
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    proc = concilium("eval", "--train", str(routerbench_slice), "--router", "knn", "--k", "1",
                     "--aggregation", "best", "--budget-share", "0.5", "--folds", "3",
                     "--json", str(out), "--plots", str(plots))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["policy"] == "cost" and r["mean_cost"] is not None
    gpt4 = r["baselines"]["best_single"]
    assert gpt4["name"] == "gpt-4-1106-preview"
    assert 0 < r["aiq"]["router"] <= 1 and 0 < r["aiq"]["single_models"] <= 1
    lo, hi = r["aiq"]["cost_range"]
    costs = [c for c, _ in r["single_models"].values()]
    assert (lo, hi) == (min(costs), max(costs))
    assert len(r["frontier"]) == 11 and len(r["accuracy_by_k"]) == 5
    for name in ("accuracy_vs_k.png", "cost_frontier.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.models
def test_train_test_split_profiles_on_train_only(mmlu_slice, bench_data, tmp_path):
    test_dir = write_slice(bench_data / "mmlu-pro-28llm", tmp_path / "test", slice(MMLU_SLICE, MMLU_SLICE + 150))
    out = tmp_path / "r.json"
    proc = concilium("eval", "--train", str(mmlu_slice), "--test", str(test_dir), "--pool", "open-small",
                     "--router", "knn", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["n_queries"] == 150 and r["protocol"].startswith("profiles on")
    assert r["baselines"]["oracle"]["accuracy"] >= r["accuracy"]


def test_empty_validation_set_is_rejected(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = concilium("profile", "--tasks", str(empty))
    assert proc.returncode == 2
    assert "no questions" in proc.stderr
