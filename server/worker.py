"""The continuous-batching GPU worker: the only server module that imports `engine` (lazily).

One loop thread owns the engine. Each tick it (1) takes at most as many jobs as it has free slots,
dropping expired, cancelled and already-finished ones before they touch the GPU, (2) admits held jobs
while the token budget allows (their prefill runs now, at the step boundary), (3) retires cancelled
jobs, (4) advances every running job one packed denoising step, (5) finishes done jobs (decode, next
round or result). Encoding previews and results runs on a small pool, off the loop; a job's result is
written, then acknowledged, in one queue call.
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
from typing import TYPE_CHECKING, Any

from server.errors import FAILURE_STATUS
from server.queue.base import Delivery, WorkerQueue, WorkerStats, finished_fields
from server.schemas import SCHEMA_VERSION, TERMINAL

if TYPE_CHECKING:
    from server.metrics import Metrics
    from server.settings import Settings

log = logging.getLogger("rvr.worker")
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Any, fmt: str, quality: int = 90) -> bytes:
    """PIL image -> bytes; no metadata is carried over."""
    buf = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


@dataclass
class _Job:
    d: Delivery
    req: Any  # engine GenerationRequest of the current round
    kv: int
    state: Any = None  # engine RequestState once prepared
    started_at: float = 0.0
    first_preview_at: float | None = None
    previews: list[Future] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.d.msg.id


class _Ema:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value = alpha, 0.0

    def add(self, x: float) -> None:
        self.value = x if self.value == 0.0 else (1 - self.alpha) * self.value + self.alpha * x


class Worker:
    """Owns the engine, the loop, the drain. `engine` may be passed in (tests share one engine)."""

    def __init__(
        self, settings: Settings, queue: WorkerQueue, metrics: Metrics | None = None, engine: Any = None
    ) -> None:
        self.s = settings
        self.q = queue
        self.m = metrics
        self.eng = engine
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop = threading.Event()  # drain requested
        self._held: list[_Job] = []  # taken, waiting for token budget (front: oldest)
        self._active: list[_Job] = []  # prepared, in the running batch
        self._judges: list[tuple[Delivery, Any]] = []
        self._finishing: list[tuple[Delivery, Future]] = []
        self._pool = ThreadPoolExecutor(settings.preview_threads, thread_name_prefix="rvr-encode")
        self._step_s, self._job_s = _Ema(), _Ema()
        self._last_refresh = self._last_reap = 0.0
        self.last_tick = time.time()  # liveness: the loop is turning
        self.fatal: BaseException | None = None

    # ---- lifecycle ----
    def load(self) -> None:
        """Load the engine (unless given) and warm it up; sets `ready`."""
        if self.eng is None:
            from engine import load_engine
            from engine.requests import RequestLimits

            s = self.s
            self.eng = load_engine(
                s.model,
                device=s.device,
                dtype=s.dtype,
                weights=s.weights,
                attention=s.attention,
                backend=s.engine_backend,
                kv_capacity=s.kv_capacity_tokens,
                limits=RequestLimits(max_prompt_tokens=s.max_prompt_tokens, max_rounds=s.max_rounds),
            )
        if self.s.warmup:
            self._warmup()
        self.ready.set()

    def _warmup(self) -> None:
        from engine.types import GenerationRequest, SamplingParams

        req = self.eng.validate(
            GenerationRequest(
                task="generate", prompt="warm-up", params=SamplingParams.for_task("generate", steps=2), seed=0
            )
        )
        states = self.eng.prepare([req])
        while not states[0].done:
            self.eng.step(states)
        self.eng.finish(states[0])

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Drain: take no more jobs; finish the batch within `drain_timeout_s`, hand back the rest."""
        self._stop.set()
        wake = getattr(self.q, "wake", None)
        if wake is not None:
            wake()

    def run(self) -> None:
        """The loop; returns after a drain. Sets `fatal` and returns on an unexpected error."""
        try:
            if not self.ready.is_set():
                self.load()
            while not self._stop.is_set():
                self.tick()
            deadline = time.monotonic() + self.s.drain_timeout_s
            while (self._active or self._held or self._judges) and time.monotonic() < deadline:
                self.tick(admit=False)
            self._hand_back_all()
            self._wait_finishing()
        except BaseException as exc:  # a fatal engine/runtime error: exit
            log.exception("worker loop died")
            self.fatal = exc
            if not self.q.durable:
                # Nobody can reclaim them: end them now. (Durable: the reaper reclaims them, and the
                # delivery count still grows, so a job that kills workers ends up dead-lettered.)
                self._end_all("generation_failed", "the worker stopped on an internal error")
        finally:
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
        free = self.s.max_batch_jobs - len(self._active) - len(self._held) - len(self._judges)
        if free <= 0:
            return
        idle = not (self._active or self._held or self._judges)
        for d in self.q.take(free, self.s.queue_poll_ms / 1000 if idle else 0.0):
            self._intake(d)

    def _intake(self, d: Delivery) -> None:
        """Checks a job before it may use the GPU; converts it to an engine request."""
        msg = d.msg
        if msg.schema_version != SCHEMA_VERSION:
            return self._fail(d, "invalid_input", f"unknown job schema version {msg.schema_version}")
        rec = self.q.record(msg.id)
        if rec is None or rec.get("status") in TERMINAL:
            # Duplicate delivery of a finished job, or its record expired: ack without running.
            return self.q.terminate(d, "cancelled", {}, {})
        if self.q.cancelled([msg.id]):
            return self._cancel(d)
        if time.time() > msg.deadline and "started_at" not in rec:  # a reclaimed job that started runs on
            return self._expire(d)
        if self.m:
            self.m.queue_wait.observe(max(0.0, time.time() - msg.enqueued_at))
        try:
            req = self._to_request(msg)
        except Exception as exc:
            return self._fail(d, "invalid_input", _user_message(exc))
        if msg.kind == "judge":
            self._judges.append((d, req))
            return None
        kv = self.eng.kv_tokens(req)
        if kv > self.s.token_budget:
            return self._fail(d, "invalid_input", "request is larger than the worker's token budget")
        self._held.append(_Job(d=d, req=req, kv=kv))
        return None

    def _to_request(self, msg: Any) -> Any:
        from PIL import Image

        from engine.types import GenerationRequest, SamplingParams

        p = msg.params
        image = None
        if msg.has_input:
            raw = self.q.input_image(msg.id)
            if raw is None:
                raise ValueError("the job's input image expired")
            image = Image.open(io.BytesIO(raw), formats=["PNG"])
            image.load()
        if msg.kind == "judge":
            return (image.convert("RGB"), p.prompt)
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
        params.validate()
        req = GenerationRequest(
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
        return self.eng.validate(req)

    def _run_judges(self) -> None:
        if not self._judges:
            return
        batch, self._judges = self._judges, []
        try:
            scores = self.eng.judge([item for _, item in batch])
        except Exception as exc:
            for d, _ in batch:
                self._fail(d, "generation_failed", _user_message(exc))
            self._maybe_fatal(exc)
            return
        for (d, _), score in zip(batch, scores, strict=True):
            body = f'{{"score": {float(score)!r}}}'.encode()
            self._publish_started(d, 1)
            fields = finished_fields("succeeded", score=repr(float(score)))
            self.q.complete(d, body, {"score": float(score)}, fields)
            self._observe_done(d)

    def _admit(self) -> None:
        """Prefill held jobs (FIFO) while slots and token budget allow; a lone job always fits."""
        used = sum(j.kv for j in self._active)
        batch: list[_Job] = []
        while self._held and len(self._active) + len(batch) < self.s.max_batch_jobs:
            job = self._held[0]
            if (self._active or batch) and used + job.kv > self.s.token_budget:
                break
            self._held.pop(0)
            if time.time() > job.d.msg.deadline and job.started_at == 0.0:
                self._expire(job.d)
                continue
            batch.append(job)
            used += job.kv
        if batch:
            self._start(batch)

    def _start(self, batch: list[_Job]) -> None:
        """One prefill for the whole batch; if it fails, prefill each alone to isolate the bad request."""
        try:
            states = self._prepare([j.req for j in batch])
        except Exception as exc:
            if len(batch) > 1:
                for job in batch:
                    self._start([job])
                return
            self._fail(
                batch[0].d, "invalid_input" if _is_invalid(exc) else "generation_failed", _user_message(exc)
            )
            self._maybe_fatal(exc)
            return
        self._activate(batch, states)

    def _prepare(self, reqs: list[Any]) -> list[Any]:
        t0 = time.perf_counter()
        states = self.eng.prepare(reqs)
        if self.m:
            self.m.prefill_seconds.observe(time.perf_counter() - t0)
        return states

    def _activate(self, batch: list[_Job], states: list[Any]) -> None:
        for job, state in zip(batch, states, strict=True):
            job.state = state
            if job.started_at == 0.0:
                job.started_at = time.time()
                self._publish_started(job.d, state.total_steps)
            self._active.append(job)

    def _publish_started(self, d: Delivery, total: int) -> None:
        fields = {
            "status": "running",
            "started_at": repr(time.time()),
            "worker": self.s.worker_name,
            "attempts": str(d.deliveries),
            "step": "0",
            "total": str(total),
            "round": "1",
        }
        self.q.publish(d.msg.id, "started", {"worker": self.s.worker_name, "total": total}, fields)

    def _retire_cancelled(self) -> None:
        jobs = self._active + self._held
        if not jobs:
            return
        gone = self.q.cancelled([j.id for j in jobs])
        if not gone:
            return
        for job in [j for j in jobs if j.id in gone]:
            self._release(job)
            self._active = [j for j in self._active if j is not job]
            self._held = [j for j in self._held if j is not job]
            self._cancel(job.d)

    def _step(self) -> None:
        jobs = [j for j in self._active if not j.state.done]
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            events = self.eng.step([j.state for j in jobs])
        except Exception as exc:
            for job in jobs:
                self._drop(job, "generation_failed", _user_message(exc))
            self._maybe_fatal(exc)
            return
        dt = time.perf_counter() - t0
        self._step_s.add(dt)
        if self.m:
            packed = self.eng.last_step  # CFG-branch sequences and query rows of this forward
            self.m.step_seconds.labels(sequences=str(packed.sequences)).observe(dt)
            self.m.step_rows.observe(packed.rows)
        by_id = {e.request_id: e for e in events}
        progress, previews = [], []
        for job in jobs:
            ev = by_id.get(job.id)
            step = ev.step if ev else job.state.step
            total = ev.total if ev else job.state.total_steps
            rnd = job.req.round_index
            data = {"step": step, "total": total, "round": rnd, "rounds": job.req.rounds}
            progress.append(
                (job.id, "progress", data, {"step": str(step), "total": str(total), "round": str(rnd)})
            )
            every = job.d.msg.params.preview_every
            if every:  # bounded: previews are the bulk of an event stream's bytes
                every = max(every, -(-total // self.s.max_previews_per_round))
            if every and step % every == 0 and not job.state.done:
                previews.append((job, step, rnd))
        self.q.publish_many(progress)  # one round trip for the whole batch
        for job, step, rnd in previews:
            self._preview(job, step, rnd)

    def _preview(self, job: _Job, step: int, rnd: int) -> None:
        try:
            image = self.eng.preview(job.state, max_side=self.s.preview_max_side)  # GPU work: on the loop
        except Exception:
            log.exception("preview failed for %s", job.id)
            return
        prev = job.previews[-1] if job.previews else None
        job.previews.append(self._pool.submit(self._encode_preview, job, image, step, rnd, prev))

    def _encode_preview(self, job: _Job, image: Any, step: int, rnd: int, prev: Future | None) -> None:
        """Off the loop. A preview is best effort: a failure is logged and the job goes on."""
        try:
            t0 = time.perf_counter()
            fmt = self.s.preview_format
            data = base64.b64encode(encode_image(image, fmt, self.s.preview_quality)).decode()
            if self.m:
                self.m.preview_encode_seconds.observe(time.perf_counter() - t0)
            if prev is not None:
                # Publish in step order. No deadlock: the pool is FIFO, so `prev` has already started.
                prev.result()
            self.q.publish(job.id, "preview", {"step": step, "round": rnd, "format": fmt, "image": data})
        except Exception:
            log.exception("preview of %s at step %d failed", job.id, step)
            return
        if job.first_preview_at is None:
            job.first_preview_at = time.time()
            if self.m:
                self.m.first_preview.observe(job.first_preview_at - job.d.msg.enqueued_at)

    def _finish_done(self) -> None:
        for job in [j for j in self._active if j.state.done]:
            self._active.remove(job)
            t0 = time.perf_counter()
            try:
                out = self.eng.finish(job.state)
            except Exception as exc:
                self._drop(job, "generation_failed", _user_message(exc), release=False)
                self._maybe_fatal(exc)
                continue
            job.timings[f"round{out.round_index}_decode_s"] = time.perf_counter() - t0
            if out.next_request is not None:
                # The next round is admitted like a new job, at the next step boundary, ahead of others.
                job.req, job.state = out.next_request, None
                job.kv = self.eng.kv_tokens(job.req)
                self._held.insert(0, job)
                continue
            self._finishing.append((job.d, self._pool.submit(self._complete, job, out)))

    def _complete(self, job: _Job, out: Any) -> None:
        """Off the loop: wait for the job's previews, encode the result, write it and ack."""
        for f in job.previews:
            f.result()  # wait: `completed` comes after every preview (previews never raise)
        fmt = job.d.msg.params.output_format
        body = encode_image(out.image, fmt)
        now = time.time()
        timings = {
            "queue_s": job.started_at - job.d.msg.enqueued_at,
            "run_s": now - job.started_at,
            "total_s": now - job.d.msg.enqueued_at,
            **job.timings,
        }
        fields = finished_fields("succeeded", seed=str(out.seed), round=str(out.round_index))
        fields["timings"] = json.dumps(timings)
        data: dict[str, Any] = {"seed": out.seed, "rounds_run": out.round_index, "timings": timings}
        if out.score is not None:
            fields["score"] = repr(float(out.score))
            data["score"] = float(out.score)
        self.q.complete(job.d, body, data, fields)
        self._job_s.add(now - job.started_at)
        self._observe_done(job.d)

    def _reap_finishing(self) -> None:
        still = []
        for d, f in self._finishing:
            if not f.done():
                still.append((d, f))
            elif f.exception() is not None:
                log.error("writing the result of %s failed: %r", d.msg.id, f.exception())
                self._fail(d, "generation_failed", "could not store the result")
        self._finishing = still

    def _wait_finishing(self) -> None:
        for _, f in self._finishing:
            f.exception()
        self._reap_finishing()

    def _housekeeping(self) -> None:
        self.last_tick = time.time()
        now = time.monotonic()
        if now - self._last_refresh >= self.s.heartbeat_interval_s:
            self._last_refresh = now
            deliveries = [j.d for j in self._active + self._held] + [
                d for d, _ in self._finishing + self._judges
            ]
            stats = WorkerStats(
                step_s=self._step_s.value, job_s=self._job_s.value, slots=self.s.max_batch_jobs
            )
            self.q.refresh(deliveries, stats)
        if not self._stop.is_set() and now - self._last_reap >= self.s.reaper_interval_s:
            self._last_reap = now
            reclaimed, dead = self.q.reap()
            if self.m:
                self.m.reclaimed.inc(reclaimed)
                self.m.dead_lettered.inc(dead)
        if self.m:
            self.m.heartbeat.set(time.time())
            self.m.running.set(len(self._active))
            self.m.update_gpu_memory(getattr(self.eng, "device", "cpu"))

    # ---- endings ----
    def _drop(self, job: _Job, code: str, message: str, release: bool = True) -> None:
        if release:
            self._release(job)
        self._active = [j for j in self._active if j is not job]
        self._fail(job.d, code, message)

    def _fail(self, d: Delivery, code: str, message: str) -> None:
        assert code in FAILURE_STATUS, code
        fields = finished_fields("failed", error_code=code, error_message=message)
        self.q.terminate(d, "failed", {"code": code, "message": message}, fields)
        if self.m:
            self.m.jobs_failed.labels(code=code).inc()

    def _expire(self, d: Delivery) -> None:
        self._fail(d, "queue_timeout", "the job's deadline passed before it started")

    def _cancel(self, d: Delivery) -> None:
        self.q.terminate(d, "cancelled", {}, finished_fields("cancelled"))

    def _observe_done(self, d: Delivery) -> None:
        if self.m:
            self.m.e2e_seconds.observe(time.time() - d.msg.enqueued_at)

    def _hand_back_all(self) -> None:
        """Drain: a durable queue gets the unfinished jobs back; otherwise they fail as unavailable."""
        if not self.q.durable:
            return self._end_all("unavailable", "the server shut down before the job finished")
        for job in self._active + self._held:
            self._release(job)
            self.q.hand_back(job.d)
        for d, _ in self._judges:
            self.q.hand_back(d)
        self._active, self._held, self._judges = [], [], []
        return None

    def _end_all(self, code: str, message: str) -> None:
        for job in self._active + self._held:
            self._release(job)
            self._fail(job.d, code, message)
        for d, _ in self._judges:
            self._fail(d, code, message)
        self._active, self._held, self._judges = [], [], []

    def _release(self, job: _Job) -> None:
        if job.state is not None:
            try:
                self.eng.release(job.state)
            except Exception:  # after a fatal error the engine may be unusable; the job ends anyway
                log.exception("release failed for %s", job.id)

    def _maybe_fatal(self, exc: BaseException) -> None:
        """Errors outside the engine's own set on a GPU are fatal (CUDA state is unknown): exit."""
        if not _is_engine_error(exc) and str(getattr(self.eng, "device", "cpu")).startswith("cuda"):
            raise exc


def _is_engine_error(exc: BaseException) -> bool:
    from engine.errors import EngineError

    return isinstance(exc, EngineError)


def _is_invalid(exc: BaseException) -> bool:
    from engine.errors import InvalidRequestError

    return isinstance(exc, (InvalidRequestError, ValueError))


def _user_message(exc: BaseException) -> str:
    """Engine input errors are written to be shown; anything else is summarised, never a traceback."""
    from engine.errors import EngineError

    if isinstance(exc, (EngineError, ValueError)):
        return str(exc)[:500]
    return f"internal error ({type(exc).__name__})"
