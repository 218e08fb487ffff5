#!/usr/bin/env bash
# Create .venv and install rvr-serve with its test extras and the rvr-client package (idempotent). Installs
# redis-server when missing and we are root (the Redis tests and the Redis queue backend need it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install -q torch            # CUDA build (brings triton)
    else
        pip install -q torch==2.13.0    # CPU build; an unpinned torch would pull a multi-GB CUDA build
    fi
fi
pip install -q -e ".[${RVR_EXTRAS:-test,triton,export}]"
pip install -q -e ./client  # rvr-client, the Python client (its own package; tested by tests/client)
