#!/usr/bin/env bash
# Everything the first GPU must answer, in one run (scripts/gpu_check.py; at most 8
# minutes on one H100, no network). `scripts/gpu_check.sh --cpu --tiny` runs the same code
# on the CPU in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
