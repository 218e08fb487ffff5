"""The web page at `/` and the docs at `/docs`, `/redoc`, in a real headless Chromium against a real
`rvr serve` (bundled demo model, CPU): what a person gets after `bash scripts/serve.sh`.

Set RVR_SCREENSHOT=bench/figures/web_page.png to keep the finished page's screenshot (the README's).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.server.browser_testutil import chromium_or_skip, console_problems, start_chromium, wait_for
from tests.server.server_testutil import (
    LONG,
    REPO,
    Stack,
    free_port,
    poll,
    refine_multipart,
    rvr_env,
    rvr_process,
    stack_settings,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("browser")]

KEY = "browser-test-key-5e1f"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> Iterator:
    chromium_or_skip()
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """`rvr serve` in a subprocess: in-process queue, bundled model. One job at a time, so a second job
    queues (position and cancel of a queued job); heartbeats often, so ETAs appear quickly."""
    chromium_or_skip()  # no server without a browser to drive it
    port = free_port()
    args = ["serve", "--port", str(port), "--device", "cpu", "--no-warmup", "--max-steps", str(LONG)]
    args += ["--max-batch-jobs", "1", "--heartbeat-interval-s", "0.2", "--queue-poll-ms", "20"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with rvr_process(args, rvr_env(RVR_API_KEYS=""), log) as proc:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 120, "rvr serve ready")
        yield url


class Page:
    """The driver at a page of one server, with the failed requests the test expects."""

    def __init__(self, driver, url: str) -> None:
        self.d, self.url = driver, url
        self.allowed: set[tuple[str, int]] = {("/v1/info", 404)}  # a server without GET /v1/info yet

    def open(self, path: str = "/") -> Page:
        self.d.get(self.url + path)
        if path == "/":
            self.d.execute_script("sessionStorage.clear()")
            self.d.refresh()
            wait_for(lambda: self.js("return document.body.dataset.ready") == "true", 20, "page ready")
        return self

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def q(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def by_label(self, text: str, panel: str = "#panel-refine"):
        """The control whose <label> reads `text`, inside `panel`."""
        from selenium.webdriver.common.by import By

        label = self.d.find_element(By.XPATH, f"//*[@id='{panel[1:]}']//label[normalize-space()='{text}']")
        control = self.d.find_element(By.ID, label.get_attribute("for"))
        assert control.accessible_name == text
        return control

    def button(self, name: str, panel: str = "#panel-refine"):
        from selenium.webdriver.common.by import By

        el = self.d.find_element(By.XPATH, f"//*[@id='{panel[1:]}']//button[normalize-space()='{name}']")
        assert el.aria_role == "button" and el.accessible_name == name
        return el

    def fill(self, control, value: str) -> None:
        control.clear()
        control.send_keys(value)

    def advanced(self, panel: str = "#panel-refine", **fields: object) -> None:
        details = self.q(f"{panel} details.advanced")
        if not details.get_attribute("open"):
            self.q(f"{panel} details.advanced summary").click()
        for name, value in fields.items():
            self.fill(self.q(f"{panel} [name={name}]"), str(value))

    def image_loaded(self, css: str) -> bool:
        return bool(
            self.js(
                "const i = document.querySelector(arguments[0]); return i.complete && i.naturalWidth > 0", css
            )
        )

    def text(self, css: str) -> str:
        return self.q(css).text

    def check_console(self) -> None:
        problems = console_problems(self.d, self.allowed)
        assert not problems, "\n".join(problems)


@pytest.fixture
def page(chromium, served) -> Iterator[Page]:
    chromium.get_log("browser")  # drop what earlier tests left
    p = Page(chromium, served)
    yield p
    p.check_console()


def _input_png(path: Path) -> Path:
    """A red circle on a light background: what the demo model draws, in the wrong colour."""
    im = Image.new("RGB", (64, 64), (236, 232, 220))
    ImageDraw.Draw(im).ellipse((14, 14, 50, 50), fill=(200, 30, 30))
    im.save(path)
    return path


def _start_refine(page: Page, image: Path, prompt: str, **advanced: object) -> None:
    page.by_label("Image").send_keys(str(image))
    wait_for(lambda: page.image_loaded("#refine-input-preview"), 10, "input thumbnail")
    page.fill(page.by_label("Prompt"), prompt)
    if advanced:
        page.advanced(**advanced)
    page.button("Refine").click()


def test_refine_shows_previews_result_score_and_download(page, tmp_path):
    page.open()
    _start_refine(
        page, _input_png(tmp_path / "in.png"), "a green circle", steps=16, seed=5, rounds=2, until_score=0.999
    )
    out = "#refine-output"
    wait_for(
        lambda: int(page.q(f"{out} .live").get_attribute("data-loaded") or 0) >= 1, 60, "a decoded preview"
    )
    wait_for(lambda: page.image_loaded(f"{out} img[alt='Refined image']"), 60, "the refined image")
    job_id = page.q(out).get_attribute("data-job")
    view = httpx.get(f"{page.url}/v1/jobs/{job_id}").json()
    assert view["status"] == "succeeded" and view.get("score") is not None, view

    facts = page.text(f"{out} .facts")
    if view.get("scores"):
        assert "Judge score per round" in facts
        assert all(f"{s:.3f}" in facts for s in view["scores"])
    else:
        assert re.search(rf"Judge score\s+{view['score']:.3f}", facts), facts
    assert re.search(r"Seed\s+5\b", facts) and "steps 16" in facts and "Rounds run" in facts, facts
    bar = page.q(f"{out} [role=progressbar]")
    assert bar.aria_role == "progressbar" and bar.get_attribute("aria-valuenow") == "100"
    assert page.text(f"{out} .status") == "Done"

    # Before and after side by side; the shown and downloadable image is the API's result, pixel for pixel.
    assert page.image_loaded(f"{out} img[alt='Original image']")
    link = page.q(f"{out} a.download")
    shown = page.q(f"{out} img[alt='Refined image']").get_attribute("src")
    assert link.get_attribute("href") == shown and shown.startswith("blob:")
    assert link.get_attribute("download") == f"refine-{job_id}.png"
    pixels = page.js(
        "const i = document.querySelector(arguments[0]); const c = document.createElement('canvas');"
        "c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d');"
        "g.drawImage(i, 0, 0); return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)];",
        f"{out} img[alt='Refined image']",
    )
    with Image.open(io.BytesIO(httpx.get(f"{page.url}/v1/jobs/{job_id}/result").content)) as im:
        api_image = im.convert("RGBA")
    assert (pixels[0], pixels[1]) == api_image.size
    assert np.array_equal(np.array(pixels[2], dtype=np.uint8), np.asarray(api_image).reshape(-1))

    # The slider view stacks both and reveals the original up to the handle (keyboard works).
    page.q(f"{out} input[value=slider]").click()
    slider = page.q(f"{out} .slider")
    assert slider.is_displayed() and "stacked" in page.q(f"{out} .compare").get_attribute("class")
    from selenium.webdriver.common.keys import Keys

    slider.send_keys(Keys.ARROW_RIGHT * 5)
    reveal = page.js(
        "return document.querySelector('#refine-output .compare').style.getPropertyValue('--reveal')"
    )
    assert reveal == "55%"
    page.q(f"{out} input[value=side]").click()

    _screenshot(page, tmp_path)


def _screenshot(page: Page, tmp_path: Path) -> None:
    """The finished page, whole, at a desktop width; kept where RVR_SCREENSHOT says."""
    page.js("window.scrollTo(0, 0); document.activeElement.blur()")
    for _ in range(2):  # the window's height less its viewport's is the browser's own chrome
        extra = page.js("return document.documentElement.scrollHeight - window.innerHeight")
        page.d.set_window_size(1280, min(page.d.get_window_size()["height"] + extra, 1800))
    try:
        shot = tmp_path / "web_page.png"
        page.d.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.size[0] >= 1000
        if os.environ.get("RVR_SCREENSHOT"):
            dest = REPO / os.environ["RVR_SCREENSHOT"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, dest)
    finally:
        page.d.set_window_size(1280, 1000)


def test_queue_position_eta_and_cancel(page, tmp_path):
    """A running job holds the only batch slot: the page's job queues (position shown) and is cancelled
    there; then a long job of the page runs (steps and ETA shown) and is cancelled while running."""
    img = _input_png(tmp_path / "in.png")
    with httpx.Client(base_url=page.url, timeout=30) as api:
        blocker = refine_multipart(api, steps=LONG, rounds=8).json()["id"]
        poll(api, blocker, {"running"})
        page.open()
        out = "#refine-output"
        _start_refine(page, img, "a green circle", steps=8)
        wait_for(lambda: "next in line" in page.text(f"{out} .detail"), 20, "the queue position")
        assert page.text(f"{out} .status") == "Queued"
        queued = page.q(out).get_attribute("data-job")
        page.button("Cancel").click()
        wait_for(lambda: page.text(f"{out} .status") == "Cancelled", 20, "cancelled while queued")
        assert api.get(f"/v1/jobs/{queued}").json()["status"] == "cancelled"
        assert api.delete(f"/v1/jobs/{blocker}").status_code == 200

        page.fill(page.by_label("Prompt"), "a blue square")
        page.advanced(steps=LONG, rounds=8)
        refine = page.button("Refine")
        refine.click()
        wait_for(
            lambda: re.search(r"Round 1 of 8, step \d+ of \d+", page.text(f"{out} .detail")), 30, "steps"
        )
        wait_for(lambda: re.search(r"about .+ left", page.text(f"{out} .detail")), 30, "an ETA")
        assert not refine.is_enabled()
        running = page.q(out).get_attribute("data-job")
        assert api.get(f"/v1/jobs/{running}").json()["status"] == "running"
        cancel = page.button("Cancel")
        cancel.send_keys(" ")  # keyboard: Space presses a focused button
        wait_for(lambda: page.text(f"{out} .status") == "Cancelled", 30, "cancelled while running")
        assert api.get(f"/v1/jobs/{running}").json()["status"] == "cancelled"
        assert refine.is_enabled() and not cancel.is_displayed()
        assert int(page.q(f"{out} [role=progressbar]").get_attribute("aria-valuenow")) < 100


def test_invalid_field_shows_the_servers_422_next_to_it(page, tmp_path):
    page.open()
    page.button("Refine").click()  # no image yet: said next to the field, nothing sent
    error = page.q("#refine-image-error")
    assert error.is_displayed() and "image" in error.text.lower()

    page.allowed.add(("/v1/refine", 422))
    _start_refine(page, _input_png(tmp_path / "in.png"), "a green circle", steps=5000)
    steps = page.by_label("Steps")
    wait_for(lambda: steps.get_attribute("aria-invalid") == "true", 20, "the steps field marked invalid")
    message = page.text("#refine-steps-error")
    assert "1000" in message, message  # the server's words: the schema allows at most 1000
    assert "correct the highlighted field" in page.text("#refine-form .form-error")
    assert not page.q("#refine-output").is_displayed()  # no job was made
    assert page.button("Refine").is_enabled()


def test_generate_then_auto_refine(page):
    """Generate tab (reached by keyboard), then straight into refine with the same prompt."""
    from selenium.webdriver.common.keys import Keys

    page.open()
    page.advanced(steps=12, seed=4)  # the refine that follows uses these
    tab = page.q("#tab-refine")
    tab.send_keys(Keys.ARROW_RIGHT)
    gen_tab = page.q("#tab-generate")
    assert gen_tab.get_attribute("aria-selected") == "true" and page.q("#panel-generate").is_displayed()
    assert page.d.switch_to.active_element == gen_tab
    page.fill(page.by_label("Prompt", "#panel-generate"), "a red circle")
    page.advanced("#panel-generate", steps=12, seed=3)
    page.q("#generate-auto-refine").click()
    page.button("Generate", "#panel-generate").click()
    wait_for(
        lambda: page.image_loaded("#generate-output img[alt='Generated image']"), 60, "the generated image"
    )
    wait_for(lambda: page.q("#tab-refine").get_attribute("aria-selected") == "true", 20, "the refine tab")
    assert page.by_label("Prompt").get_attribute("value") == "a red circle"
    wait_for(lambda: page.image_loaded("#refine-output img[alt='Refined image']"), 60, "the refined image")
    generated = page.q("#generate-output").get_attribute("data-job")
    refined = page.q("#refine-output").get_attribute("data-job")
    assert generated != refined
    assert httpx.get(f"{page.url}/v1/jobs/{refined}").json()["kind"] == "refine"


def test_drop_and_paste_set_the_image(page):
    page.open()
    make_file = """
        const c = document.createElement('canvas'); c.width = 32; c.height = 32;
        c.getContext('2d').fillRect(0, 0, 16, 16);
        const blob = await new Promise(r => c.toBlob(r, 'image/png'));
        const dt = new DataTransfer(); dt.items.add(new File([blob], arguments[0], {type: 'image/png'}));
        return dt;
    """
    page.d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async () => {{ {make_file} }})().then(dt => {{"
        " document.getElementById('refine-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt,"
        " bubbles: true, cancelable: true})); done(); });",
        "dropped.png",
    )
    wait_for(lambda: page.image_loaded("#refine-input-preview"), 10, "the dropped image")
    assert page.js("return document.getElementById('refine-image').files[0].name") == "dropped.png"
    page.q("#tab-generate").click()  # a paste anywhere brings the refine tab back with the image
    page.d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async () => {{ {make_file} }})().then(dt => {{"
        " document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true,"
        " cancelable: true})); done(); });",
        "pasted.png",
    )
    wait_for(lambda: page.js("return document.getElementById('refine-image').files[0].name") == "pasted.png")
    assert page.q("#tab-refine").get_attribute("aria-selected") == "true"


def test_narrow_screen_has_no_sideways_scroll(page):
    page.d.set_window_size(390, 844)
    try:
        page.open()
        assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
        form = page.q("#refine-form").rect
        assert form["width"] <= 390 and page.button("Refine").is_displayed()
    finally:
        page.d.set_window_size(1280, 1000)


# ReDoc's sidebar always renders a "Redocly" badge image from their CDN; the docs CSP blocks it (and the
# badge hides itself on the error), so it is the one foreign URL the browser even tries.
REDOC_BADGE = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize(
    ("path", "ready_js", "blocked"),
    [
        (
            "/docs",
            "return [...document.querySelectorAll('.opblock-summary-path')].some(e => e.textContent"
            " .includes('/v1/refine')) && document.querySelector('.info .title').textContent.includes('rvr-serve')",
            set(),
        ),
        (
            "/redoc",
            "return document.body.innerText.includes('Refine an image towards its prompt')"
            " && [...document.querySelectorAll('h1')].some(e => e.textContent.includes('rvr-serve'))",
            {REDOC_BADGE},
        ),
    ],
)
def test_docs_render_offline(page, path, ready_js, blocked):
    """Swagger UI and ReDoc render from this server alone (the browser resolves no other host)."""
    page.d.get(page.url + "/")
    page.q("a[href='/docs']")  # the page links to the docs
    page.d.get(page.url + path)
    wait_for(lambda: page.js(ready_js), 30, f"{path} rendered")
    urls = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and {u for u in urls if not u.startswith(page.url + "/")} <= blocked, urls
    problems = console_problems(page.d, page.allowed)
    assert all("Content Security Policy" in p and any(b in p for b in blocked) for p in problems), problems


# ---- errors a person meets on a locked-down or full server: 401, 413, 503 with Retry-After ----


@pytest.fixture(scope="module")
def strict(tiny_model, engine) -> Iterator[str]:
    """Auth on, a 4 KiB body cap, and a queue that takes nothing (every submit gets 503)."""
    chromium_or_skip()
    settings = stack_settings(
        "memory",
        tiny_model,
        None,
        api_keys=[KEY],
        max_upload_bytes=4096,
        max_queue_depth=0,
        retry_after_min_s=7,
        retry_after_max_s=9,
    )
    stack = Stack("memory", settings, engine).start()
    yield stack.url
    stack.stop()


def test_errors_401_413_503_are_readable(chromium, strict, tmp_path):
    chromium.get_log("browser")
    page = Page(chromium, strict)
    page.allowed |= {("/v1/info", 401), ("/v1/refine", 401), ("/v1/refine", 413), ("/v1/refine", 503)}
    page.open()
    key = page.q("#api-key")
    wait_for(key.is_displayed, 10, "the API key field (the server answered 401)")
    assert key.accessible_name == "API key"

    small = _input_png(tmp_path / "small.png")
    _start_refine(page, small, "a green circle")
    wait_for(lambda: "needs an API key" in page.text("#refine-form .form-error"), 20, "the 401 message")
    assert key.get_attribute("aria-invalid") == "true" and page.d.switch_to.active_element == key
    assert page.q("#api-key-error").is_displayed()

    page.fill(key, KEY)
    page.button("Use key", "#auth").click()
    assert page.js("return sessionStorage.getItem('rvr.apiKey')") == KEY
    assert KEY not in page.d.current_url

    noise = tmp_path / "noise.png"  # incompressible: well over the 4 KiB cap
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 8192
    page.by_label("Image").send_keys(str(noise))
    page.button("Refine").click()
    wait_for(lambda: page.q("#refine-image-error").is_displayed(), 20, "the 413 message")
    assert "too large" in page.text("#refine-image-error")

    page.by_label("Image").send_keys(str(small))
    page.button("Refine").click()
    msg = wait_for(
        lambda: re.search(r"busy.*Try again in [789] s", page.text("#refine-form .form-error")), 20
    )
    assert msg, "the 503 message with Retry-After"
    page.check_console()


def test_api_key_goes_in_a_header_never_a_url(chromium, strict, tmp_path):
    """A stored key is sent as the bearer header (the submit passes auth and meets the full queue),
    and no URL the browser requested carries it."""
    chromium.get_log("browser")
    page = Page(chromium, strict)
    page.allowed |= {("/v1/info", 401), ("/v1/refine", 503)}
    page.open()
    page.js("sessionStorage.setItem('rvr.apiKey', arguments[0])", KEY)
    page.d.refresh()
    wait_for(lambda: page.js("return document.body.dataset.ready") == "true", 20, "page ready")
    _start_refine(page, _input_png(tmp_path / "in.png"), "a green circle")
    wait_for(lambda: "busy" in page.text("#refine-form .form-error"), 20, "the 503 message")
    urls = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/v1/refine" in u for u in urls) and not any(KEY in u for u in urls), urls
    page.check_console()
