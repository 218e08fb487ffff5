"""The web page's files and headers, and the offline API docs, over real HTTP (no browser needed).

The browser half is tests/server/test_web_page.py; this half runs everywhere.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from server.web import STATIC_DIR
from tests.server.server_testutil import REPO, Stack, stack_settings

pytestmark = pytest.mark.xdist_group("server-web")


@pytest.fixture(scope="module")
def url(tiny_model, engine) -> Iterator[str]:
    stack = Stack("memory", stack_settings("memory", tiny_model, None), engine).start()
    yield stack.url
    stack.stop()


class _Refs(HTMLParser):
    """Every tag's attributes, the text of inline <script> elements, and the ids in the document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_scripts: list[str] = []
        self.ids: set[str] = set()
        self._in_inline_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"])
        self._in_inline_script = tag == "script" and "src" not in a

    def handle_endtag(self, tag):
        self._in_inline_script = False

    def handle_data(self, data):
        if self._in_inline_script:
            self.inline_scripts.append(data)

    def urls(self) -> list[str]:
        return [a[k] for _, a in self.tags for k in ("src", "href") if a.get(k)]


def _parse(html: str) -> _Refs:
    refs = _Refs()
    refs.feed(html)
    return refs


def _csp(header: str) -> dict[str, list[str]]:
    out = {}
    for part in header.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def test_page_is_served_with_a_strict_policy(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = _csp(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert set(csp["img-src"]) == {"'self'", "data:", "blob:"}  # previews, results
    assert csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"
    assert httpx.head(url + "/").status_code == 200


def test_page_has_no_inline_code_and_only_local_references(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200
    refs = _parse(r.text)
    assert not refs.inline_scripts, "inline script: the CSP would block it"
    assert [a.get("src") for t, a in refs.tags if t == "script"] == ["/static/app.js"]
    for tag, attrs in refs.tags:
        assert "style" not in attrs, f"inline style on <{tag}>"
        assert not [k for k in attrs if k.startswith("on")], f"inline handler on <{tag}>"
    local = [u for u in refs.urls() if u.startswith("/")]
    assert set(refs.urls()) == set(local), refs.urls()
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for ref in local:
        if not ref.startswith("/static/"):
            continue
        r = httpx.get(url + ref)
        assert r.status_code == 200, ref
        assert r.headers["content-type"].startswith(types[Path(ref).suffix]), (ref, r.headers["content-type"])
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-cache"
    # The module graph: app.js imports the rest; every import resolves.
    for js in STATIC_DIR.glob("*.js"):
        for name in re.findall(r'from "\./([\w.-]+)"', js.read_text()):
            assert httpx.get(f"{url}/static/{name}").status_code == 200, (js.name, name)


def test_static_files_load_nothing_from_outside():
    """No CDN, no web font, no external script anywhere in the page's files (offline hosts)."""
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)) - {
            "http://www.w3.org/2000/svg"
        }
        assert not urls, (f.name, urls)
        assert "@import" not in text and "url(http" not in text, f.name


def test_every_accessibility_reference_resolves():
    """label for=, aria-controls, aria-labelledby, aria-describedby all name elements of the page, and the
    names the tests (and screen readers) rely on are there."""
    refs = _parse((STATIC_DIR / "index.html").read_text())
    for tag, attrs in refs.tags:
        for key in ("for", "aria-controls", "aria-labelledby", "aria-describedby"):
            for target in (attrs.get(key) or "").split():
                assert target in refs.ids, f"<{tag} {key}={target!r}> names no element"
    controls = {a["id"]: (t, a) for t, a in refs.tags if a.get("id")}
    assert controls["refine-image"][1]["type"] == "file" and controls["refine-prompt"][0] == "textarea"
    assert controls["refine-submit"][0] == "button"
    assert any(a.get("alt") == "Refined image" for t, a in refs.tags if t == "img")
    assert sum(a.get("role") == "progressbar" for _, a in refs.tags) == 2  # refine and generate


def test_api_answers_carry_the_lock_down_headers(url):
    for r in (httpx.get(url + "/v1/jobs/nope"), httpx.get(url + "/livez"), httpx.post(url + "/v1/refine")):
        assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert (
            r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        )


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_load_their_assets_from_this_server(url, path):
    """Swagger UI / ReDoc bundles come from the installed fastapi-offline package, not a CDN."""
    r = httpx.get(url + path)
    assert r.status_code == 200
    refs = _parse(r.text)
    assert refs.urls() and all(u.startswith("/") and not u.startswith("//") for u in refs.urls()), refs.urls()
    assert not re.search(r"https?://", r.text), "an external URL in the docs page"
    for ref in refs.urls():
        asset = httpx.get(url + ref)
        assert asset.status_code == 200 and len(asset.content) > 1000, ref
    scripts = [u for t, a in refs.tags if t == "script" and (u := a.get("src"))]
    assert scripts and all(
        httpx.get(url + s).headers["content-type"].startswith("text/javascript") for s in scripts
    )
    # The one inline initializer (Swagger UI) is allowed by its hash; no 'unsafe-inline' script.
    csp = _csp(r.headers["content-security-policy"])
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    for inline in refs.inline_scripts:
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["script-src"]
    assert csp["frame-ancestors"] == ["'none'"]
    openapi = httpx.get(url + "/openapi.json").json()
    assert "/v1/refine" in openapi["paths"] and "/" not in openapi["paths"]


def test_web_ui_off_leaves_the_docs(tiny_model, engine):
    stack = Stack("memory", stack_settings("memory", tiny_model, None, web_ui=False), engine).start()
    try:
        assert httpx.get(stack.url + "/").status_code == 404
        assert httpx.get(stack.url + "/static/app.js").status_code == 404
        assert httpx.get(stack.url + "/docs").status_code == 200
    finally:
        stack.stop()


def test_package_data_ships_the_page():
    """A wheel install has the static files: pyproject's package-data covers each of them."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["server"]
    files = [p.relative_to(REPO / "server").as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert "static/index.html" in files
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f


def test_readme_shows_the_screenshot():
    readme = (REPO / "README.md").read_text()
    assert "bench/figures/web_page.png" in readme
    png = (REPO / "bench/figures/web_page.png").read_bytes()
    assert png.startswith(b"\x89PNG")
