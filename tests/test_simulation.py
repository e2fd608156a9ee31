"""Simulation mode: the cost-model expert, calibration against the real models, and the scheduler benchmark on it.

The simulated expert is a product feature (projections onto hardware this
machine lacks), not a test double; the calibration test runs the real model.
"""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.bench.costmodel import fit_steps
from orchestrator.config import load_config
from tests.test_cli import concilium
from workers.backends.simulated import SimulatedBackend
from workers.config import SimulatedExpert
from workers.types import Prompt, SamplingParams


def _sim(**kw) -> SimulatedExpert:
    return SimulatedExpert(backend="simulated", **{"name": "s", "memory_gb": 1.0, "load_s": 0.0, "step_s": 0.01, **kw})


def test_fit_steps_recovers_a_line():
    assert fit_steps({1: 0.010, 4: 0.013, 16: 0.025}) == pytest.approx((0.010, 0.001))
    assert fit_steps({1: 0.02}) == (0.02, 0.0)


def test_call_time_follows_the_cost_model_and_chunks_like_the_real_backend():
    b = SimulatedBackend(_sim(step_s=0.01, step_s_per_row=0.001, prefill_s_per_token=0.0001, max_batch_size=4))
    assert b.call_seconds(prompt_tokens=100, rows=4, new_tokens=10) == pytest.approx(0.01 + 10 * 0.013)
    # 6 rows at max_batch_size 4: a full chunk of 4, then one of 2.
    assert b.call_seconds(0, 6, 10) == pytest.approx(10 * 0.013 + 10 * 0.011)


def test_answers_are_deterministic_when_greedy_and_vary_when_sampled():
    b = SimulatedBackend(_sim(step_s=1e-6))
    with pytest.raises(RuntimeError, match="not loaded"):
        b.generate([Prompt("q")], SamplingParams(max_new_tokens=1))
    b.load()
    greedy = b.generate([Prompt("q")] * 4, SamplingParams(max_new_tokens=3))
    assert len({c.text for c in greedy}) == 1 and greedy[0].completion_tokens == 3
    sampled = b.generate([Prompt(f"q{i}") for i in range(32)], SamplingParams(max_new_tokens=1, temperature=1.0))
    assert len({c.text for c in sampled}) > 1
    assert b.memory_bytes() == 2**30


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("device", "gpu", "String should match pattern"), ("step_s", 0, "greater than 0"),
     ("time_scale", 2, "less than or equal to 1")],
)
def test_bad_simulated_expert_is_rejected(tmp_path, field, value, message):
    expert = {"name": "s", "backend": "simulated", "memory_gb": 1, "load_s": 1, "step_s": 0.01, field: value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"experts": [expert]}))
    proc = concilium("check-config", str(path))
    assert proc.returncode == 2 and f"experts[0].{field}" in proc.stderr and message in proc.stderr


def test_projection_config_is_the_papers_setting():
    cfg = load_config("deploy/projection-16x8b.yaml")
    assert len(cfg.experts) == 16 and {e.backend for e in cfg.experts} == {"simulated"}
    assert all(e.device == "cuda:0" and 14 <= e.memory_gb <= 21 for e in cfg.experts)
    assert sum(e.memory_gb for e in cfg.experts) > 80 * 3  # at most a few fit on one 80 GB GPU at once


@pytest.mark.ray
def test_bench_scheduler_on_simulated_experts(tmp_path):
    """The benchmark's invariants on a cost model: batched loads each expert once, naive once per use."""
    experts = [
        {"name": n, "backend": "simulated", "memory_gb": 1.0, "load_s": 2.0, "step_s": 0.02, "step_s_per_row": 0.001,
         "time_scale": 0.01}
        for n in ("a", "b", "c")
    ]
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(yaml.safe_dump({"ray": {"num_cpus": 2}, "experts": experts}))
    out = tmp_path / "figures.json"
    proc = concilium("bench", "scheduler", "--config", str(cfg), "--n", "12,24", "--budget-gb", "1",
                     "--new-tokens", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    figures = {(f["n"], f["budget"], f["variant"]): f for f in json.loads(out.read_text())}
    assert "SIMULATED" in proc.stdout
    for n in (12, 24):
        batched, naive = figures[(n, "1 GB", "batched")], figures[(n, "1 GB", "naive")]
        # One window (max_batch 64): the two experts not preloaded each load once.
        assert batched["loads"] == 2
        assert naive["loads"] >= n - 1  # every query loads its experts, but the first may find one preloaded
        assert batched["queries_per_s"] > naive["queries_per_s"]
        assert figures[(n, "unlimited", "batched")]["loads"] == 0
        # Modelled seconds: naive pays a 2 s load for (nearly) every query.
        assert naive["wall_s"] >= 2.0 * (n - 1)


@pytest.mark.models
def test_calibrate_writes_a_valid_simulated_config(store, tmp_path):
    cfg = tmp_path / "one.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [{"name": "smollm2", "source": "smollm2-135m-instruct", "threads": 1}]}))
    out = tmp_path / "sim.yaml"
    proc = concilium("bench", "calibrate", "--config", str(cfg), "--out", str(out), "--batch-sizes", "1,4",
                     "--new-tokens", "4", "--repeats", "1", "--time-scale", "0.5")
    assert proc.returncode == 0, proc.stderr
    sim = load_config(out).experts[0]
    assert sim.backend == "simulated" and sim.name == "smollm2" and sim.time_scale == 0.5
    # A 135M float32 model: about half a GB, loads in under a minute, decodes a step in well under a second.
    assert 0.2 < sim.memory_gb < 1.5 and 0 < sim.load_s < 60 and 0 < sim.step_s < 1
