#!/usr/bin/env bash
# Create .venv and install rvr-serve with its test extras and the rvr-client package (idempotent). As
# root with apt-get, installs what is missing of redis-server (the Redis tests and the Redis queue
# backend) and, with the test extra, chromium + chromium-driver (the web page's browser tests; they skip
# where chromium cannot be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${RVR_EXTRAS:-test,triton,export}"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    browser=()
    if [[ ",$extras," == *,test,* ]]; then
        command -v chromium >/dev/null 2>&1 || browser+=(chromium fonts-liberation)
        command -v chromedriver >/dev/null 2>&1 || browser+=(chromium-driver)
    fi
    if ! command -v redis-server >/dev/null 2>&1 || [ ${#browser[@]} -gt 0 ]; then
        apt-get update -qq
    fi
    command -v redis-server >/dev/null 2>&1 || apt-get install -y -qq redis-server >/dev/null
    if [ ${#browser[@]} -gt 0 ]; then
        # Not every distribution packages chromium (Ubuntu ships a snap): the browser tests then skip.
        apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null \
            || echo "bootstrap: could not install ${browser[*]}; the browser tests will skip" >&2
    fi
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
pip install -q -e ".[$extras]"
pip install -q -e ./client  # rvr-client, the Python client (its own package; tested by tests/client)
