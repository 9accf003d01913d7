#!/usr/bin/env bash
# One command that checks the whole GPU path and prints one table (see tools/gpu_check.py --help).
#   bash tools/gpu_check.sh --quick            # about 3 minutes: run it first whenever a GPU is at hand
#   bash tools/gpu_check.sh [--cub-dir D] [--weights W] [--out DIR] [--only a,b] [--skip c] [--list]
# Needs a CUDA GPU; on a CPU-only machine it says so in one sentence and exits 1 (--list works anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
