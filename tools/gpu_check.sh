#!/usr/bin/env bash
# One command that checks the whole GPU path and prints one table (see tools/gpu_check.py --help).
#   bash tools/gpu_check.sh [--cub-dir D] [--weights W] [--out DIR] [--only a,b] [--skip c]
# Needs a CUDA GPU; on a CPU-only machine it says so in one sentence and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
