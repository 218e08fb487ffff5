"""Container HEALTHCHECK for both roles (stdlib only): GET <path> on 127.0.0.1 at the API port
(RVR_PORT), then at the worker's probe port (RVR_WORKER_PORT). Exit 0 on the first 200, else 1.

`rvr serve` answers on RVR_PORT; `rvr worker` answers on RVR_WORKER_PORT. Usage:
    python3 healthcheck.py [/livez]
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str = "/livez", timeout_s: float = 3.0) -> bool:
    ports = [os.environ.get("RVR_PORT", "8000"), os.environ.get("RVR_WORKER_PORT", "9100")]
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return False


if __name__ == "__main__":
    sys.exit(0 if check(sys.argv[1] if len(sys.argv) > 1 else "/livez") else 1)
