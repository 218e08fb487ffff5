"""rvr_client.AsyncClient against a real `rvr serve` stack: the same behaviour as the blocking client,
including a retry after a real 503 and an SSE resume after a dropped connection."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from rvr_client import (
    AsyncClient,
    CompletedEvent,
    InvalidInput,
    JobCancelled,
    Overloaded,
    ProgressEvent,
    RetryPolicy,
)

from tests.client.client_testutil import CuttingProxy
from tests.server.server_testutil import LONG, Stack, image_bytes, stack_settings

pytestmark = pytest.mark.xdist_group("client-live")
FAST_RETRY = RetryPolicy(max_attempts=6, max_elapsed_s=60, backoff_initial_s=0.05, backoff_max_s=0.2)


@pytest.fixture(scope="module")
def stack(tiny_model, engine):
    s = Stack("memory", stack_settings("memory", tiny_model, None), engine).start()
    yield s
    s.stop()


async def _until(predicate, timeout: float = 30.0):
    for _ in range(int(timeout / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def test_waiting_calls_with_an_async_progress_callback(stack):
    async def main():
        steps = []

        async def on_progress(event):
            await asyncio.sleep(0)
            if isinstance(event, ProgressEvent):
                steps.append(event.step)

        async with AsyncClient(stack.url, retry=FAST_RETRY) as rvr:
            out, gen, judged = await asyncio.gather(
                rvr.refine(image_bytes((64, 48)), "a red apple", steps=5, seed=4, on_progress=on_progress),
                rvr.generate("a blue cup", steps=3, height=64, width=96, output_format="webp"),
                rvr.judge(image_bytes(), "a red apple"),
            )
            assert out.seed == 4 and out.image.size == (64, 48) and steps == [1, 2, 3, 4]
            assert gen.content_type == "image/webp" and gen.image.size == (96, 64)
            assert 0.0 <= judged.score <= 1.0
            with pytest.raises(InvalidInput) as exc:
                await rvr.generate("x", steps=1)
            assert exc.value.status == 422

    asyncio.run(main())


def test_jobs_events_cancel(stack):
    async def main():
        async with AsyncClient(stack.url, retry=FAST_RETRY) as rvr:
            job = await rvr.submit_generate("a red ball", steps=4, seed=9)
            events = [e async for e in job.events()]
            assert isinstance(events[-1], CompletedEvent) and events[-1].seed == 9
            assert (await job.status()).status == "succeeded"
            assert (await job.result()).seed == 9
            slow = await rvr.submit_refine(image_bytes(), "slow", steps=LONG, rounds=8)
            await _until(lambda: _running(slow))
            await slow.cancel()
            with pytest.raises(JobCancelled):
                await slow.result()

    async def _running(job):
        return ((await job.status()).step or 0) >= 1

    asyncio.run(main())


def test_a_waiting_call_whose_caller_leaves_cancels_its_job(stack):
    async def main():
        async with AsyncClient(stack.url, retry=FAST_RETRY) as rvr:
            prompt = f"abandoned {uuid.uuid4().hex}"
            task = asyncio.ensure_future(rvr.generate(prompt, steps=LONG))
            await asyncio.sleep(0.5)
            task.cancel()  # the caller leaves (asyncio cancellation)
            with pytest.raises(asyncio.CancelledError):
                await task
        [entry] = [e for e in stack.rt.queue._jobs.values() if e.msg.params.prompt == prompt]
        async with httpx.AsyncClient(base_url=stack.url) as http:
            for _ in range(500):
                if (await http.get(f"/v1/jobs/{entry.msg.id}")).json()["status"] == "cancelled":
                    return
                await asyncio.sleep(0.02)
        raise AssertionError("the abandoned job was not cancelled")

    asyncio.run(main())


def test_async_retry_after_a_real_503(make_stack):
    stack = make_stack("memory", max_batch_jobs=1, max_queue_depth=1)
    statuses: list[int] = []

    async def record(resp: httpx.Response) -> None:
        if resp.request.url.path == "/v1/generate":
            statuses.append(resp.status_code)

    async def main():
        async with (
            AsyncClient(stack.url, retry=FAST_RETRY) as rvr,
            httpx.AsyncClient(timeout=30, event_hooks={"response": [record]}) as http,
        ):
            blocker = await rvr.submit_refine(image_bytes(), "block", steps=LONG, rounds=8)
            await _until(lambda: _running(blocker))
            filler = await rvr.submit_generate("filler", steps=2)
            c = AsyncClient(stack.url, retry=FAST_RETRY, http_client=http)
            submit = asyncio.ensure_future(c.submit_generate("after the 503", steps=2))
            await _until(lambda: _seen_503())
            await filler.cancel()
            job = await submit
            assert statuses[-1] == 202 and set(statuses[:-1]) == {503}  # retried until admitted
            await blocker.cancel()
            assert (await job.result(timeout=60)).image.size == (128, 128)
            # Bounded: a queue that stays full ends in Overloaded.
            blocker = await rvr.submit_refine(image_bytes(), "block", steps=LONG, rounds=8)
            await _until(lambda: _running(blocker))
            filler = await rvr.submit_generate("filler", steps=2)
            short = AsyncClient(stack.url, retry=RetryPolicy(max_attempts=2))
            with pytest.raises(Overloaded) as exc:
                await short.submit_generate("never", steps=2)
            assert exc.value.status == 503
            await short.close()
            await filler.cancel()
            await blocker.cancel()

    async def _running(job):
        return ((await job.status()).step or 0) >= 1

    async def _seen_503():
        return 503 in statuses

    asyncio.run(main())


def test_async_events_resume_after_the_connection_drops(stack):
    proxy = CuttingProxy(stack.live.port)

    async def main():
        async with AsyncClient(proxy.url, retry=FAST_RETRY) as c, AsyncClient(stack.url) as direct:
            job = await c.submit_refine(image_bytes(), "a red apple", steps=200, preview_every=50)
            seen = []
            async for event in job.events():
                seen.append(event)
                if len(seen) == 3:
                    before = proxy.connections
                    proxy.cut()
            assert proxy.connections > before
            full = [e async for e in direct.job(job.id).events()]
            assert [e.id for e in seen] == [e.id for e in full]
            assert len(seen) > 100 and isinstance(seen[-1], CompletedEvent)

    try:
        asyncio.run(main())
    finally:
        proxy.close()
