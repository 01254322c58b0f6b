#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the CUDA path end to end on one GPU, in about 5 minutes.
#   scripts/gpu_check.sh                      on GPU 0 (GPU_CHECK_DEVICE=cuda)
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh the dry mode, on the CPU
# The report goes to $OUT, else bench/results/. PYTHON picks the interpreter: by default this
# checkout's .venv, else python3 (one with the project and PyPI's CUDA torch installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m bench.gpu_check "$@"
