"""The continuous-batching GPU worker: the I/O loop around `server.batcher.Batcher`, and the only server
module that imports `engine` (lazily, when the engine loads).

One loop thread owns the engine. Each tick it (1) takes at most as many jobs as the batcher has free
slots, dropping expired, cancelled and already-finished ones before they touch the GPU, (2) scores judge
jobs in one forward, (3) prefills the held jobs the batcher admits (at the step boundary), (4) retires
cancelled jobs, (5) advances every running job one packed denoising step, (6) finishes done jobs (decode,
judge for `until_score`, next round or result). Encoding previews and results runs on a small pool, off
the loop; a job's result is written, then acknowledged, in one queue call.

Errors are classified by the engine's own types only: `InvalidRequestError` is the client's fault
(`invalid_input`); anything else is an internal error (`generation_failed`, "internal error (Type)"),
logged with its traceback and, on a GPU, fatal to the process (the device state is unknown).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.batcher import Batcher
from server.errors import FAILURE_STATUS
from server.queue.base import Delivery, WorkerQueue, WorkerStats, finished_fields
from server.schemas import SCHEMA_VERSION, TERMINAL, JobMessage

if TYPE_CHECKING:
    from PIL import Image

    from engine.core import Engine, RequestState
    from engine.types import FinishedRound, GenerationRequest
    from server.metrics import Metrics
    from server.settings import Settings

log = logging.getLogger("rvr.worker")
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """PIL image -> bytes; no metadata is carried over."""
    buf = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


@dataclass(eq=False)
class _Job:
    """One job on this worker: its delivery, the current round's engine request and state."""

    delivery: Delivery
    request: GenerationRequest | None  # None for judge jobs
    judge_item: tuple[Image.Image, str] | None = None  # (image, prompt) of a judge job
    kv_tokens: int = 0
    started: bool = False  # ran before: an earlier round here, or an earlier delivery elsewhere
    state: RequestState | None = None  # once prefilled
    started_at: float = 0.0
    first_preview_at: float | None = None
    previews: list[Future] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # judge p(yes) per round (until_score)

    @property
    def id(self) -> str:
        return self.delivery.msg.id

    @property
    def msg(self) -> JobMessage:
        return self.delivery.msg

    @property
    def deadline(self) -> float:
        return self.delivery.msg.deadline


def backend_options(settings: Settings) -> dict:
    """The engine backend's options that come from settings (only the exact backend has any)."""
    if settings.engine_backend != "exact":
        return {}
    return {
        "graph_buckets": tuple(settings.cuda_graph_buckets),
        "max_padding": settings.cuda_graph_max_padding,
    }


def load_engine_for(s: Settings) -> Engine:
    """The engine a worker with settings `s` serves (also `rvr info`)."""
    from engine import load_engine
    from engine.requests import RequestLimits

    return load_engine(
        s.model,
        device=s.device,
        dtype=s.dtype,
        weights=s.weights,
        attention=s.attention,
        backend=s.engine_backend,
        backend_options=backend_options(s),
        kv_capacity=s.kv_capacity_tokens,
        limits=RequestLimits(max_prompt_tokens=s.max_prompt_tokens, max_rounds=s.max_rounds),
    )


class _Ema:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value = alpha, 0.0

    def add(self, x: float) -> None:
        self.value = x if self.value == 0.0 else (1 - self.alpha) * self.value + self.alpha * x


class Worker:
    """Owns the engine, the loop, the drain. `engine` may be passed in (tests share one engine)."""

    def __init__(
        self,
        settings: Settings,
        queue: WorkerQueue,
        metrics: Metrics | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.engine = engine
        self.batcher: Batcher[_Job] = Batcher(
            settings.max_batch_jobs, settings.token_budget, settings.max_previews_per_round
        )
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop = threading.Event()  # drain requested
        self._finishing: list[tuple[Delivery, Future]] = []  # results being encoded and written
        self._pool = ThreadPoolExecutor(settings.preview_threads, thread_name_prefix="rvr-encode")
        self._step_s, self._job_s = _Ema(), _Ema()
        self._last_refresh = self._last_reap = 0.0
        self.last_tick = time.time()  # liveness: the loop is turning
        self.fatal: BaseException | None = None
        self.capabilities: dict | None = None  # published with every heartbeat once loaded

    # ---- lifecycle ----
    def load(self) -> None:
        """Load the engine (unless given) and warm it up; sets `ready`."""
        if self.engine is None:
            self.engine = load_engine_for(self.settings)
        caps = self.engine.capabilities()
        log.info("engine: %s", caps.summary())
        self.capabilities = caps.to_dict()
        self.queue.share_tokenizer(caps.tokenizer_hash, self.engine.tokenizer.to_json())
        if self.settings.warmup:
            self._warmup()
        self.ready.set()
        if self.metrics:
            self.metrics.worker_ready.set(1)

    def _warmup(self) -> None:
        from engine.types import GenerationRequest, SamplingParams

        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is not None:  # CUDA-graph captures of the declared buckets (exact backend)
            log.info("engine warm-up: %s", warm_up())

        params = SamplingParams.for_task("generate", steps=2)
        req = self.engine.validate(
            GenerationRequest(task="generate", prompt="warm-up", params=params, seed=0)
        )
        states = self.engine.prepare([req])
        while not states[0].done:
            self.engine.step(states)
        self.engine.finish(states[0])

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def idle(self) -> bool:
        """Nothing held, running or being written."""
        return self.batcher.idle and not self._finishing

    def stop(self) -> None:
        """Drain: take no more jobs; finish the batch within `drain_timeout_s`, hand back the rest."""
        self._stop.set()
        self.queue.wake()

    def run(self) -> None:
        """The loop; returns after a drain. Sets `fatal` and returns on an unexpected error."""
        try:
            if not self.ready.is_set():
                self.load()
            while not self._stop.is_set():
                self.tick()
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while not self.batcher.idle and time.monotonic() < deadline:
                self.tick(admit=False)
            self._hand_back_all()
            self._wait_finishing()
        except BaseException as exc:  # a fatal engine/runtime error: exit
            log.exception("worker loop died")
            self.fatal = exc
            if not self.queue.durable:
                # Nobody can reclaim them: end them now. (Durable: the reaper reclaims them, and the
                # delivery count still grows, so a job that kills workers ends up dead-lettered.)
                self._end_all("generation_failed", "the worker stopped on an internal error")
        finally:
            if self.metrics:
                self.metrics.worker_ready.set(0)
            self._pool.shutdown(wait=True)
            self.stopped.set()

    # ---- one loop iteration ----
    def tick(self, admit: bool = True) -> None:
        if admit:
            self._take()
        self._run_judges()
        self._admit()
        self._retire_cancelled()
        self._step()
        self._finish_done()
        self._reap_finishing()
        self._housekeeping()

    def _take(self) -> None:
        free = self.batcher.free_slots()
        if free <= 0:
            return
        block_s = self.settings.queue_poll_ms / 1000 if self.batcher.idle else 0.0
        for delivery in self.queue.take(free, block_s):
            self._intake(delivery)

    def _intake(self, delivery: Delivery) -> None:
        """Checks a job before it may use the GPU; converts it to an engine request."""
        msg = delivery.msg
        if msg.schema_version != SCHEMA_VERSION:
            return self._fail(delivery, "invalid_input", f"unknown job schema version {msg.schema_version}")
        record = self.queue.record(msg.id)
        if record is None or record.get("status") in TERMINAL:
            # Duplicate delivery of a finished job, or its record expired: ack without running.
            return self.queue.terminate(delivery, "cancelled", {}, {})
        if self.queue.cancelled([msg.id]):
            return self._cancel(delivery)
        started = "started_at" in record  # a reclaimed job that started elsewhere runs on past its deadline
        if time.time() > msg.deadline and not started:
            return self._expire(delivery)
        if self.metrics:
            self.metrics.queue_wait.observe(max(0.0, time.time() - msg.enqueued_at))
        try:
            job = self._to_job(delivery)
        except Exception as exc:
            return self._fail(delivery, *self._classify(exc, msg.id))
        job.started = started
        if job.judge_item is not None:
            return self.batcher.add_judge(job)
        if not self.batcher.fits_alone(job):
            return self._fail(delivery, "invalid_input", "request is larger than the worker's token budget")
        return self.batcher.hold(job)

    def _to_job(self, delivery: Delivery) -> _Job:
        """The job's engine request (or judge item), validated by the engine."""
        from PIL import Image

        from engine.errors import InvalidRequestError
        from engine.types import GenerationRequest, SamplingParams

        msg = delivery.msg
        p = msg.params
        image = None
        if msg.has_input:
            raw = self.queue.input_image(msg.id)
            if raw is None:
                raise InvalidRequestError("the job's input image expired")
            image = Image.open(io.BytesIO(raw), formats=["PNG"])
            image.load()
        if msg.kind == "judge":
            return _Job(delivery, None, judge_item=(image.convert("RGB"), p.prompt))
        params = SamplingParams.for_task(
            msg.kind,
            steps=p.steps,
            cfg_text=p.cfg_text,
            cfg_img=p.cfg_img,
            cfg_interval=tuple(p.cfg_interval) if p.cfg_interval else None,
            renorm=p.renorm,
            renorm_min=p.renorm_min,
            shift=p.shift,
        )
        request = GenerationRequest(
            task=msg.kind,
            prompt=p.prompt,
            image=image,
            params=params,
            seed=p.seed,
            height=p.height,
            width=p.width,
            rounds=p.rounds,
            until_score=p.until_score,
            request_id=msg.id,
        )
        request = self.engine.validate(request)
        return _Job(delivery, request, kv_tokens=self.engine.kv_tokens(request))

    def _run_judges(self) -> None:
        batch = self.batcher.take_judges()
        if not batch:
            return
        try:
            scores = self.engine.judge([job.judge_item for job in batch])
        except Exception as exc:
            for job in batch:
                self._fail(job.delivery, *self._classify(exc, job.id))
            self._maybe_fatal(exc)
            return
        for job, score in zip(batch, scores, strict=True):
            body = f'{{"score": {float(score)!r}}}'.encode()
            self._publish_started(job.delivery, 1)
            fields = finished_fields("succeeded", score=repr(float(score)))
            self.queue.complete(job.delivery, body, {"score": float(score)}, fields)
            self._observe_done(job.delivery)

    def _admit(self) -> None:
        admission = self.batcher.admit(time.time())
        for job in admission.expired:
            self._expire(job.delivery)
        if admission.admitted:
            self._start(admission.admitted)

    def _start(self, batch: list[_Job]) -> None:
        """One prefill for the whole batch; if it fails, prefill each alone to isolate the bad request."""
        try:
            t0 = time.perf_counter()
            states = self.engine.prepare([job.request for job in batch])
            if self.metrics:
                self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        except Exception as exc:
            if len(batch) > 1:
                for job in batch:
                    self._start([job])
                return
            self._drop(batch[0], *self._classify(exc, batch[0].id))
            self._maybe_fatal(exc)
            return
        for job, state in zip(batch, states, strict=True):
            job.state = state
            if job.started_at == 0.0:
                job.started_at = time.time()
                job.started = True
                self._publish_started(job.delivery, state.total_steps)

    def _publish_started(self, delivery: Delivery, total: int) -> None:
        name = self.settings.worker_name
        fields = {
            "status": "running",
            "started_at": repr(time.time()),
            "worker": name,
            "attempts": str(delivery.deliveries),
            "step": "0",
            "total": str(total),
            "round": "1",
        }
        self.queue.publish(delivery.msg.id, "started", {"worker": name, "total": total}, fields)

    def _retire_cancelled(self) -> None:
        jobs = [*self.batcher.active, *self.batcher.held]
        if not jobs:
            return
        cancelled = self.queue.cancelled([job.id for job in jobs])
        if not cancelled:
            return
        for job in self.batcher.retire(cancelled):
            self._release(job)
            self._cancel(job.delivery)

    def _step(self) -> None:
        jobs = [job for job in self.batcher.active if not job.state.done]
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            result = self.engine.step([job.state for job in jobs])
        except Exception as exc:
            for job in jobs:
                self._drop(job, *self._classify(exc, job.id))
            self._maybe_fatal(exc)
            return
        dt = time.perf_counter() - t0
        self._step_s.add(dt)
        if self.metrics:
            self.metrics.step_seconds.labels(sequences=str(result.stats.sequences)).observe(dt)
            self.metrics.step_rows.observe(result.stats.rows)
        progress, previews = [], []
        for job in jobs:
            step, total = job.state.step, job.state.total_steps
            rnd = job.request.round_index
            data = {"step": step, "total": total, "round": rnd, "rounds": job.request.rounds}
            fields = {"step": str(step), "total": str(total), "round": str(rnd)}
            progress.append((job.id, "progress", data, fields))
            if self.batcher.preview_due(step, total, job.msg.params.preview_every):
                previews.append((job, step, rnd))
        self.queue.publish_many(progress)  # one round trip for the whole batch
        for job, step, rnd in previews:
            self._preview(job, step, rnd)

    def _preview(self, job: _Job, step: int, rnd: int) -> None:
        try:
            image = self.engine.preview(
                job.state, max_side=self.settings.preview_max_side
            )  # GPU: on the loop
        except Exception:
            log.exception("preview failed for %s", job.id)
            return
        prev = job.previews[-1] if job.previews else None
        job.previews.append(self._pool.submit(self._encode_preview, job, image, step, rnd, prev))

    def _encode_preview(
        self, job: _Job, image: Image.Image, step: int, rnd: int, prev: Future | None
    ) -> None:
        """Off the loop. A preview is best effort: a failure is logged and the job goes on."""
        s = self.settings
        try:
            t0 = time.perf_counter()
            data = base64.b64encode(encode_image(image, s.preview_format, s.preview_quality)).decode()
            if self.metrics:
                self.metrics.preview_encode_seconds.observe(time.perf_counter() - t0)
            if prev is not None:
                # Publish in step order. No deadlock: the pool is FIFO, so `prev` has already started.
                prev.result()
            event = {"step": step, "round": rnd, "format": s.preview_format, "image": data}
            self.queue.publish(job.id, "preview", event)
        except Exception:
            log.exception("preview of %s at step %d failed", job.id, step)
            return
        if job.first_preview_at is None:
            job.first_preview_at = time.time()
            if self.metrics:
                self.metrics.first_preview.observe(job.first_preview_at - job.msg.enqueued_at)

    def _finish_done(self) -> None:
        """Decode finished rounds, judge those that stop on a score, then start the next round or write
        the result."""
        finished: list[tuple[_Job, FinishedRound]] = []
        for job in [job for job in self.batcher.active if job.state.done]:
            self.batcher.remove(job)
            t0 = time.perf_counter()
            try:
                out = self.engine.finish(job.state)
            except Exception as exc:
                self._fail(job.delivery, *self._classify(exc, job.id))
                self._maybe_fatal(exc)
                continue
            job.timings[f"round{out.round_index}_decode_s"] = time.perf_counter() - t0
            finished.append((job, out))
        scores = self._round_scores(finished)
        from engine.pipelines import next_round

        for job, out in finished:
            score = scores.get(job.id)
            if out.request.until_score is not None:
                if score is None:
                    continue  # its judge forward failed, and so did the job
                job.scores.append(score)
            following = next_round(out, score)
            if following is not None:
                # The next round is admitted like a new job, at the next step boundary, ahead of others.
                job.request, job.state = following, None
                job.kv_tokens = self.engine.kv_tokens(following)
                self.batcher.hold_next_round(job)
                continue
            self._finishing.append((job.delivery, self._pool.submit(self._complete, job, out)))

    def _round_scores(self, finished: list[tuple[_Job, FinishedRound]]) -> dict[str, float]:
        """Judge p(yes) of each finished round that has `until_score`, in one forward; when it fails, those
        jobs fail (and have no score)."""
        wanted = [(job, out) for job, out in finished if out.request.until_score is not None]
        if not wanted:
            return {}
        try:
            scores = self.engine.judge([(out.image, out.request.prompt) for _, out in wanted])
        except Exception as exc:
            for job, _ in wanted:
                self._fail(job.delivery, *self._classify(exc, job.id))
            self._maybe_fatal(exc)
            return {}
        return {job.id: float(score) for (job, _), score in zip(wanted, scores, strict=True)}

    def _complete(self, job: _Job, out: FinishedRound) -> None:
        """Off the loop: wait for the job's previews, encode the result, write it and ack."""
        for f in job.previews:
            f.result()  # wait: `completed` comes after every preview (previews never raise)
        body = encode_image(out.image, job.msg.params.output_format)
        now = time.time()
        timings = {
            "queue_s": job.started_at - job.msg.enqueued_at,
            "run_s": now - job.started_at,
            "total_s": now - job.msg.enqueued_at,
            **job.timings,
        }
        fields = finished_fields("succeeded", seed=str(out.seed), round=str(out.round_index))
        fields["timings"] = json.dumps(timings)
        data: dict = {"seed": out.seed, "rounds_run": out.round_index, "timings": timings}
        if job.scores:
            fields["score"] = repr(job.scores[-1])
            fields["scores"] = json.dumps(job.scores)
            data["score"], data["scores"] = job.scores[-1], list(job.scores)
        self.queue.complete(job.delivery, body, data, fields)
        self._job_s.add(now - job.started_at)
        self._observe_done(job.delivery)

    def _reap_finishing(self) -> None:
        still = []
        for delivery, f in self._finishing:
            if not f.done():
                still.append((delivery, f))
            elif f.exception() is not None:
                log.error("writing the result of %s failed: %r", delivery.msg.id, f.exception())
                self._fail(delivery, "generation_failed", "could not store the result")
        self._finishing = still

    def _wait_finishing(self) -> None:
        for _, f in self._finishing:
            f.exception()
        self._reap_finishing()

    def _housekeeping(self) -> None:
        self.last_tick = time.time()
        now = time.monotonic()
        s = self.settings
        if now - self._last_refresh >= s.heartbeat_interval_s:
            self._last_refresh = now
            deliveries = [job.delivery for job in self.batcher.jobs] + [d for d, _ in self._finishing]
            stats = WorkerStats(self._step_s.value, self._job_s.value, s.max_batch_jobs, self.capabilities)
            self.queue.refresh(deliveries, stats)
        if not self._stop.is_set() and now - self._last_reap >= s.reaper_interval_s:
            self._last_reap = now
            reclaimed, dead = self.queue.reap()
            if self.metrics:
                self.metrics.reclaimed.inc(reclaimed)
                self.metrics.dead_lettered.inc(dead)
        if self.metrics:
            self.metrics.heartbeat.set(time.time())
            self.metrics.running.set(len(self.batcher.active))
            self.metrics.update_gpu_memory(getattr(self.engine, "device", "cpu"))

    # ---- endings ----
    def _drop(self, job: _Job, code: str, message: str) -> None:
        """Fail a job that holds engine state: free its KV first."""
        self._release(job)
        self.batcher.remove(job)
        self._fail(job.delivery, code, message)

    def _fail(self, delivery: Delivery, code: str, message: str) -> None:
        assert code in FAILURE_STATUS, code
        fields = finished_fields("failed", error_code=code, error_message=message)
        self.queue.terminate(delivery, "failed", {"code": code, "message": message}, fields)
        if self.metrics:
            self.metrics.jobs_failed.labels(code=code).inc()

    def _expire(self, delivery: Delivery) -> None:
        self._fail(delivery, "queue_timeout", "the job's deadline passed before it started")

    def _cancel(self, delivery: Delivery) -> None:
        self.queue.terminate(delivery, "cancelled", {}, finished_fields("cancelled"))

    def _observe_done(self, delivery: Delivery) -> None:
        if self.metrics:
            self.metrics.e2e_seconds.observe(time.time() - delivery.msg.enqueued_at)

    def _hand_back_all(self) -> None:
        """Drain: a durable queue gets the unfinished jobs back; otherwise they fail as unavailable."""
        if not self.queue.durable:
            return self._end_all("unavailable", "the server shut down before the job finished")
        for job in self.batcher.clear():
            self._release(job)
            self.queue.hand_back(job.delivery)
        return None

    def _end_all(self, code: str, message: str) -> None:
        for job in self.batcher.clear():
            self._release(job)
            self._fail(job.delivery, code, message)

    def _release(self, job: _Job) -> None:
        if job.state is not None:
            try:
                self.engine.release(job.state)
            except Exception:  # after a fatal error the engine may be unusable; the job ends anyway
                log.exception("release failed for %s", job.id)

    def _classify(self, exc: BaseException, job_id: str) -> tuple[str, str]:
        """(failure code, message for the client): the client's fault only for the engine's input errors."""
        from engine.errors import InvalidRequestError

        if isinstance(exc, InvalidRequestError):
            return "invalid_input", str(exc)[:500]
        log.error("job %s failed on an internal error", job_id, exc_info=exc)
        return "generation_failed", f"internal error ({type(exc).__name__})"

    def _maybe_fatal(self, exc: BaseException) -> None:
        """Errors outside the engine's own set on a GPU are fatal (CUDA state is unknown): exit."""
        from engine.errors import EngineError

        if not isinstance(exc, EngineError) and str(getattr(self.engine, "device", "cpu")).startswith("cuda"):
            raise exc
