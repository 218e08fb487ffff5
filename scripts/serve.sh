#!/usr/bin/env bash
# README's quickstart: bootstrap, then `rvr serve` with its embedded defaults (in-process queue, bundled
# model, CUDA if available else CPU) on http://127.0.0.1:8000. Extra arguments go to `rvr serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
RVR_EXTRAS="${RVR_EXTRAS:-triton}" bash scripts/bootstrap.sh
. .venv/bin/activate
exec rvr serve "$@"
