"""Prometheus metrics (prefix `rvr_`), one registry per app or worker so tests can build many."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # API side.
        self.requests = Counter("rvr_requests", "HTTP requests", ["route", "code"], registry=r)
        self.failures = Counter("rvr_request_failures", "Error answers by error code", ["code"], registry=r)
        self.request_seconds = Histogram(
            "rvr_request_seconds",
            "HTTP handling time (submit, status, ...)",
            ["route"],
            buckets=_FAST,
            registry=r,
        )
        self.queue_depth = Gauge("rvr_queue_depth", "Jobs waiting for a worker", registry=r)
        self.queue_oldest = Gauge(
            "rvr_queue_oldest_wait_seconds", "Wait of the oldest queued job", registry=r
        )
        self.queue_running = Gauge(
            "rvr_queue_running_jobs", "Jobs taken by workers, not finished", registry=r
        )
        # Worker side.
        self.e2e_seconds = Histogram("rvr_e2e_seconds", "Submit to result", buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("rvr_queue_wait_seconds", "Submit to taken", buckets=_LATENCY, registry=r)
        self.first_preview = Histogram(
            "rvr_time_to_first_preview_seconds", "Submit to first preview", buckets=_LATENCY, registry=r
        )
        self.running = Gauge("rvr_inflight_jobs", "Jobs in this worker's running batch", registry=r)
        # Labelled by packed sequences (CFG branches of all jobs): bounded by 3 x max_batch_jobs.
        self.step_seconds = Histogram(
            "rvr_step_seconds",
            "One packed denoising step, by packed sequences",
            ["sequences"],
            buckets=(*_FAST, 10, 30),
            registry=r,
        )
        self.step_rows = Histogram(
            "rvr_step_batch_rows",
            "Query rows (latent and marker tokens of every branch) packed per step",
            buckets=(16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072),
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "rvr_prefill_seconds", "Prefill of admitted jobs", buckets=_FAST, registry=r
        )
        self.preview_encode_seconds = Histogram(
            "rvr_preview_encode_seconds", "Encoding one preview", buckets=_FAST, registry=r
        )
        self.reclaimed = Counter("rvr_jobs_reclaimed", "Jobs reclaimed from dead workers", registry=r)
        self.jobs_failed = Counter("rvr_jobs_failed", "Jobs that ended failed", ["code"], registry=r)
        self.dead_lettered = Counter(
            "rvr_jobs_dead_lettered", "Jobs moved to the dead-letter stream", registry=r
        )
        self.heartbeat = Gauge(
            "rvr_worker_heartbeat_timestamp_seconds", "Last worker loop iteration", registry=r
        )
        self.worker_ready = Gauge("rvr_worker_ready", "1 once the model is loaded and warm", registry=r)
        self.gpu_memory = Gauge("rvr_gpu_memory_bytes", "GPU memory allocated by the worker", registry=r)

    def update_gpu_memory(self, device: str) -> None:
        if str(device).startswith("cuda"):
            import torch  # only reached in a worker that already runs torch

            self.gpu_memory.set(torch.cuda.memory_allocated())

    def render(self) -> bytes:
        return generate_latest(self.registry)
