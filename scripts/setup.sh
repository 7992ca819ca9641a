#!/usr/bin/env bash
# Set up lomotune in ./.venv: torch first (a bare `torch` requirement would pull several
# GB of CUDA packages on a CPU machine), then the package with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
echo "lomotune is set up in $(pwd)/.venv (activate with: . .venv/bin/activate)"
