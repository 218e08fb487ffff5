"""Headless Chromium (Debian's chromium + chromedriver, driven by Selenium) for the web page tests.

The browser resolves no host but 127.0.0.1, so a page that needs anything from the internet (a CDN
script, a web font) fails here as it would on an offline host.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_NETWORK_FAILURE = re.compile(
    r"^(\S+) - Failed to load resource: the server responded with a status of (\d+)"
)


def chromium_or_skip() -> tuple[str, str]:
    """(browser, chromedriver) paths, or a skip saying how to get them."""
    browser = next((p for p in map(shutil.which, _BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "headless Chromium is not installed (as root, scripts/bootstrap.sh installs Debian's "
            "chromium and chromium-driver with apt-get)"
        )
    return browser, driver


def start_chromium(user_data_dir: Path, width: int = 1280, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        f"--user-data-dir={user_data_dir}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        # Offline: every host but the test servers' fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: Selenium Manager downloads nothing.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # an element not there yet
            last_exc = exc
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" ({last_exc!r})" if last_exc else "")
    )


def console_problems(driver: Any, allowed: set[tuple[str, int]]) -> list[str]:
    """Browser log entries at WARNING or above (script errors, CSP violations, failed loads), less the
    failed requests a test caused on purpose: `allowed` holds (path, status)."""
    problems = []
    for entry in driver.get_log("browser"):
        if entry["level"] not in ("SEVERE", "WARNING"):
            continue
        m = _NETWORK_FAILURE.match(entry["message"])
        if m and (urlsplit(m.group(1)).path, int(m.group(2))) in allowed:
            continue
        problems.append(f"{entry['level']} {entry['source']}: {entry['message']}")
    return problems
