#!/usr/bin/env bash
# README's test command: bootstrap, lint, then the whole suite (CPU; starts its own redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -n 2 --dist loadgroup "$@"
