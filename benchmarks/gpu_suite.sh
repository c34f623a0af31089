#!/usr/bin/env bash
# Every GPU measurement in one call of the device tool: see benchmarks/gpu_suite.py for what it runs,
# the time budget and the options. From the repository root, with the archives in .data/:
#   device run:  command "bash benchmarks/gpu_suite.sh --data .data"   carry [".data", ".whl"]   timeout_s 600
#   CPU dry run: bash benchmarks/gpu_suite.sh --smoke --data .data
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=python3
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && PY=.venv/bin/python  # here; on the device: its python3
exec "$PY" benchmarks/gpu_suite.py "$@"
