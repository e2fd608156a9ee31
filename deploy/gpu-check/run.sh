#!/usr/bin/env bash
# The one prepared GPU check (issue 21): kernel, real-size experts, loads and swaps, the latent mode, and the
# cost model re-calibrated. Under 8 minutes on an H200; `--dry-run` runs the same code on a CPU at tiny shapes.
#   deploy/gpu-check/run.sh OUT_DIR [--dry-run]
# Needs PyTorch, Triton, transformers, safetensors, numpy and pyyaml, plus pydantic: where pydantic is missing
# (the GPU machine), wheels in .whl/ are installed first (deploy/gpu-check/README.md says how to fetch them).
set -euo pipefail
out=${1:?usage: deploy/gpu-check/run.sh OUT_DIR [--dry-run]}
shift
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
if ! "$python" -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "pydantic is missing and .whl/ holds no wheels: see deploy/gpu-check/README.md" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$python" -m orchestrator.bench.gpu "$out" "$@"
