"""The prepared GPU check's dry run: the same script and code path at tiny shapes on the CPU, so it cannot rot
before a GPU is lent. Ray and FAISS are made unimportable, as they are on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_measures_every_phase_without_ray_or_faiss(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules.update(ray=None, faiss=None)\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocker), "GPU_CHECK_WORK": str(tmp_path)}
    proc = subprocess.run([str(ROOT / "deploy" / "gpu-check" / "run.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "gpu-check.json").read_text())
    assert result["dry_run"] and result["device"] == "CPU (dry run)"
    kernel = result["kernel"]
    assert len(kernel) == 4 and all(k["numbers_ok"] for k in kernel)  # checked in Triton's interpreter
    assert all(k["triton_ms"] is None for k in kernel)  # never timed off a GPU
    expert = result["expert"]
    assert expert["parameters"] > 0 and expert["load_s"] > 0 and set(expert["tokens_per_s"]) == {"1", "2"}
    assert expert["step_s"] > 0 and expert["swapped_s"] > 0 and expert["resident_s"] > 0
    assert [r["prompt_tokens"] for r in result["latent"]] == [8, 16] and all(r["ratio"] > 0 for r in result["latent"])
    projection = load_config(Path(result["projection"]))  # a valid simulated-expert config
    assert len(projection.experts) == 16 and all(e.backend == "simulated" for e in projection.experts)
    table = (out / "gpu-check.md").read_text()
    assert "## Kernel" in table and "## Latent mode" in table and "projection-measured.yaml" in table
