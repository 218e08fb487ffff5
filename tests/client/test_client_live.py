"""rvr_client.Client against a real `rvr serve` stack (uvicorn, real sockets, the tiny model): waiting
calls, jobs and typed events, errors, retries after real 503s and lost answers, SSE resume."""

from __future__ import annotations

import io
import threading
import time
import uuid

import httpx
import pytest
from PIL import Image
from rvr_client import (
    Client,
    CompletedEvent,
    ConnectionFailed,
    InvalidInput,
    JobCancelled,
    JobFailed,
    NotFound,
    Overloaded,
    PreviewEvent,
    ProgressEvent,
    QueuedEvent,
    RetryPolicy,
    StartedEvent,
    Unauthorized,
    WaitTimeout,
)

from tests.client.client_testutil import CuttingProxy
from tests.server.server_testutil import LONG, Stack, free_port, image_bytes, stack_settings, wait_until

pytestmark = pytest.mark.xdist_group("client-live")
FAST_RETRY = RetryPolicy(max_attempts=6, max_elapsed_s=60, backoff_initial_s=0.05, backoff_max_s=0.2)


@pytest.fixture(scope="module")
def stack(tiny_model, engine):
    s = Stack("memory", stack_settings("memory", tiny_model, None), engine).start()
    yield s
    s.stop()


@pytest.fixture
def rvr(stack):
    with Client(stack.url, retry=FAST_RETRY) as c:
        yield c


class Recorder:
    """httpx event hooks: every request sent and every answer's status, as the server saw them."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, str, str | None]] = []
        self.statuses: list[tuple[str, str, int]] = []
        self._clients: list[httpx.Client] = []

    def http_client(self) -> httpx.Client:
        """Owned by the caller's Client only in name: `close()` closes it (Client leaves given ones open)."""
        client = httpx.Client(
            timeout=30, event_hooks={"request": [self._request], "response": [self._response]}
        )
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def _request(self, req: httpx.Request) -> None:
        self.requests.append((time.monotonic(), req.method, req.url.path, req.headers.get("idempotency-key")))

    def _response(self, resp: httpx.Response) -> None:
        self.statuses.append((resp.request.method, resp.request.url.path, resp.status_code))

    def posts(self, path: str) -> list[tuple[float, str, str, str | None]]:
        return [r for r in self.requests if r[1] == "POST" and r[2] == path]


@pytest.fixture
def recorders():
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    yield make
    for r in made:
        r.close()


def _jobs_with_prompt(stack, prompt: str) -> int:
    return sum(1 for e in stack.rt.queue._jobs.values() if e.msg.params.prompt == prompt)


def test_refine_accepts_every_image_input_and_returns_image_seed_and_events(rvr, tmp_path):
    png = image_bytes((64, 48))
    path = tmp_path / "in.png"
    path.write_bytes(png)
    events = []
    out = rvr.refine(path, "a red apple", steps=6, seed=11, preview_every=2, on_progress=events.append)
    assert out.seed == 11 and out.content_type == "image/png" and out.content.startswith(b"\x89PNG")
    assert out.image.size == (64, 48) and out.scores == [] and out.view["status"] == "succeeded"
    types = [type(e) for e in events]
    assert types[:2] == [QueuedEvent, StartedEvent] and CompletedEvent not in types
    assert [e.step for e in events if isinstance(e, ProgressEvent)] == [1, 2, 3, 4, 5]
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [p.step for p in previews] == [2, 4] and max(previews[0].image.size) <= 256
    # The same seed from bytes, a file object and a PIL image gives the same image.
    with open(path, "rb") as f:
        same = [rvr.refine(src, "a red apple", steps=6, seed=11) for src in (png, f)]
    same.append(rvr.refine(Image.open(io.BytesIO(png)), "a red apple", steps=6, seed=11))
    assert all(s.content == out.content for s in same)


def test_generate_judge_and_per_round_scores(rvr):
    g = rvr.generate("a blue cup", steps=3, height=64, width=96, output_format="jpeg")
    assert g.content_type == "image/jpeg" and g.image.size == (96, 64)
    j = rvr.judge(g.content, "a blue cup")
    assert 0.0 <= j.score <= 1.0 and j.view["kind"] == "judge"
    r = rvr.refine(g.content, "a blue cup", steps=3, rounds=3, until_score=0.0)
    assert len(r.scores) == 1 and r.score == pytest.approx(r.view["score"]) and r.rounds == 1
    never = rvr.refine(g.content, "a blue cup", steps=3, rounds=3, until_score=1.0)  # p(yes) < 1: every round
    assert len(never.scores) == 3 and never.score == never.scores[-1] and never.rounds == 3
    assert all(0.0 <= x < 1.0 for x in never.scores)


def test_submit_status_events_result(rvr):
    job = rvr.submit_generate("a red ball", steps=4, seed=2)
    assert job.submitted.status in ("queued", "running") and job.kind == "generate"
    events = list(job.events())
    assert isinstance(events[-1], CompletedEvent) and events[-1].seed == 2
    assert len({e.id for e in events}) == len(events)
    assert job.status().status == "succeeded"
    result = job.result()
    assert result.seed == 2 and result.image.size == (128, 128)
    again = rvr.job(job.id).result()  # a handle from the id alone
    assert again.content == result.content


def test_cancel_and_errors(rvr, stack):
    job = rvr.submit_refine(image_bytes(), "slow", steps=LONG, rounds=8)
    wait_until(lambda: (job.status().step or 0) >= 1, 30, what="running")
    assert job.cancel().id == job.id
    with pytest.raises(JobCancelled) as exc:
        job.result()
    assert exc.value.code == "cancelled" and exc.value.job_id == job.id
    with pytest.raises(InvalidInput) as exc:
        rvr.refine(image_bytes(), "a", steps=1)
    assert exc.value.status == 422 and exc.value.code == "invalid_input" and "steps" in exc.value.message
    with pytest.raises(InvalidInput) as exc:
        rvr.refine(b"GIF89a not an image", "a")
    assert exc.value.status == 415
    with pytest.raises(NotFound) as exc:
        rvr.job("doesnotexist").status()
    assert exc.value.status == 404 and exc.value.code == "not_found"


def test_a_waiting_call_past_its_timeout_cancels_its_job_but_job_result_does_not(rvr):
    with pytest.raises(WaitTimeout) as exc:
        rvr.generate("too slow", steps=LONG, timeout=0.5)
    assert exc.value.job_id and exc.value.code == "timeout"
    wait_until(lambda: rvr.job(exc.value.job_id).status().status == "cancelled", 30, what="cancelled")
    job = rvr.submit_generate("too slow", steps=LONG)
    with pytest.raises(WaitTimeout):
        job.result(timeout=0.5)
    assert job.status().status in ("queued", "running")  # the caller still holds the job
    job.cancel()


def test_a_queue_timeout_is_a_job_failure(make_stack):
    stack = make_stack("memory", max_batch_jobs=1)
    with Client(stack.url, retry=FAST_RETRY) as rvr:
        blocker = rvr.submit_refine(image_bytes(), "block", steps=LONG, rounds=8)
        wait_until(lambda: (blocker.status().step or 0) >= 1, 60, what="blocker running")
        late = rvr.submit_generate("late", steps=3, deadline_s=0.3)
        time.sleep(0.6)
        blocker.cancel()
        with pytest.raises(JobFailed) as exc:
            late.result(timeout=60)
        assert exc.value.code == "queue_timeout" and exc.value.job_id == late.id


def test_unauthorized(make_stack):
    stack = make_stack("memory", api_keys=["a-long-api-key"])
    with Client(stack.url, retry=FAST_RETRY) as anon, pytest.raises(Unauthorized) as exc:
        anon.generate("x", steps=2)
    assert exc.value.status == 401
    with Client(stack.url, api_key="a-long-api-key") as authed:
        assert authed.generate("x", steps=2).image.size == (128, 128)


def _fill(stack, rvr: Client):
    """One running job (the only slot) and one queued (the whole queue): the next submit gets 503."""
    blocker = rvr.submit_refine(image_bytes(), "block", steps=LONG, rounds=8)
    wait_until(lambda: (blocker.status().step or 0) >= 1, 60, what="blocker running")
    filler = rvr.submit_generate("filler", steps=2)
    assert filler.status().status == "queued"
    return blocker, filler


def test_retry_after_a_real_503_honours_retry_after_with_one_key(make_stack, recorders):
    stack = make_stack("memory", max_batch_jobs=1, max_queue_depth=1)
    rec = recorders()
    with Client(stack.url, retry=FAST_RETRY) as rvr, Client(stack.url, http_client=rec.http_client()) as c:
        blocker, filler = _fill(stack, rvr)

        def free_the_queue():
            wait_until(lambda: ("POST", "/v1/generate", 503) in rec.statuses, 30, what="a 503")
            filler.cancel()

        helper = threading.Thread(target=free_the_queue)
        helper.start()
        job = c.submit_generate("after the 503", steps=2)
        helper.join()
        posts = rec.posts("/v1/generate")
        assert [s for m, p, s in rec.statuses if p == "/v1/generate"] == [503, 202]
        assert len({key for *_, key in posts}) == 1  # one Idempotency-Key for both tries
        assert posts[1][0] - posts[0][0] >= 1.0  # waited the Retry-After (>= 1 s), not the backoff
        blocker.cancel()
        assert job.result(timeout=60).image.size == (128, 128)
        assert _jobs_with_prompt(stack, "after the 503") == 1


def test_retries_are_bounded_in_attempts_and_time(make_stack, recorders):
    stack = make_stack("memory", max_batch_jobs=1, max_queue_depth=1)
    with Client(stack.url, retry=FAST_RETRY) as rvr:
        blocker, filler = _fill(stack, rvr)
        rec = recorders()
        policy = RetryPolicy(max_attempts=2, max_elapsed_s=60)
        with (
            Client(stack.url, retry=policy, http_client=rec.http_client()) as c,
            pytest.raises(Overloaded) as exc,
        ):
            c.submit_generate("never", steps=2)
        assert len(rec.posts("/v1/generate")) == 2
        assert exc.value.status == 503 and exc.value.code == "overloaded" and exc.value.retry_after >= 1
        rec = recorders()
        policy = RetryPolicy(max_attempts=10, max_elapsed_s=0.5)  # less than any Retry-After
        t0 = time.monotonic()
        with Client(stack.url, retry=policy, http_client=rec.http_client()) as c, pytest.raises(Overloaded):
            c.submit_generate("never", steps=2)
        assert len(rec.posts("/v1/generate")) == 1 and time.monotonic() - t0 < 0.5
        filler.cancel()
        blocker.cancel()
    with Client(
        f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=3, backoff_initial_s=0.01)
    ) as c:
        with pytest.raises(ConnectionFailed) as exc:
            c.generate("nobody listens")
        assert exc.value.status is None and exc.value.code == "connection_error"


def test_a_lost_answer_is_retried_into_the_same_job(stack, recorders):
    proxy = CuttingProxy(stack.live.port)
    rec = recorders()
    prompt = f"lost answer {uuid.uuid4().hex}"
    try:
        with Client(proxy.url, retry=FAST_RETRY, http_client=rec.http_client()) as c:
            proxy.drop_next_response()  # the server creates the job; its 202 never arrives
            job = c.submit_generate(prompt, steps=2)
            assert proxy.dropped == 1
            posts = rec.posts("/v1/generate")
            assert len(posts) == 2 and posts[0][3] == posts[1][3]
            assert _jobs_with_prompt(stack, prompt) == 1  # the retry got the first try's job
            assert job.result(timeout=60).image.size == (128, 128)
    finally:
        proxy.close()


def test_events_resume_after_the_connection_drops_mid_stream(stack):
    proxy = CuttingProxy(stack.live.port)
    try:
        with Client(proxy.url, retry=FAST_RETRY) as c, Client(stack.url) as direct:
            job = c.submit_refine(image_bytes(), "a red apple", steps=200, preview_every=50)
            seen, cut_at = [], None
            for event in job.events():
                seen.append(event)
                if len(seen) == 3:
                    connections = proxy.connections
                    proxy.cut()
                    cut_at = len(seen)
            assert cut_at == 3 and proxy.connections > connections  # it reconnected
            full = list(direct.job(job.id).events())
            assert [e.id for e in seen] == [e.id for e in full]  # nothing lost, nothing twice
            assert isinstance(seen[-1], CompletedEvent) and len(seen) > cut_at + 100
    finally:
        proxy.close()


@pytest.mark.redis
def test_events_resume_on_the_redis_backend(make_stack):
    stack = make_stack("redis")
    proxy = CuttingProxy(stack.live.port)
    try:
        with Client(proxy.url, retry=FAST_RETRY) as c:
            out_events = []
            job = c.submit_refine(image_bytes(), "a red apple", steps=100)
            for event in job.events():
                out_events.append(event)
                if len(out_events) == 3:
                    proxy.cut()
            full = list(c.job(job.id).events())
            assert [e.id for e in out_events] == [e.id for e in full]
            assert job.result().image.size == (64, 48)
    finally:
        proxy.close()
