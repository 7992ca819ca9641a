#!/usr/bin/env bash
# Clone -> running job: set up, then fine-tune SmolLM2-135M with LOMO on the built-in
# date task, printing held-out exact match before and after. A few minutes on 2 cores.
# Each run writes a new folder under runs/, so nothing earlier is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
lomotune train quickstart "training.output_dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
