"""Kernel or SDPA, per shape class, by measurement: attention never makes a step slower than stock.

The fused kernel runs every branch of a step in one launch, but on Hopper the denoise shapes measured
0.83x of SDPA called once per branch (bench/RESULTS.md). `MeasuredAttention` times each candidate on the
first call of a shape class (the class's warm-up), keeps the faster one for that class and logs the
choice; layouts with masks (prefill, judge) are not classed and go to the default candidate. It never
measures while a CUDA graph is being captured (that would synchronise the capture).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from kernels import AttentionLayout

log = logging.getLogger("rvr.engine.attention")

# fn -> seconds per call
Timer = Callable[[Callable[[], object]], float]


@dataclass(frozen=True)
class ShapeClass:
    """Layouts whose timings are interchangeable: the sequence count, and the longest sequence's query rows
    and key count (cache range + own rows), each rounded up to a power of two."""

    sequences: int
    rows: int
    keys: int

    @property
    def label(self) -> str:
        return f"seqs{self.sequences}_rows{self.rows}_keys{self.keys}"


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def shape_class(layout: AttentionLayout) -> ShapeClass | None:
    """The class of an unmasked layout (every sequence one bidirectional block), else None."""
    if not layout.full_blocks or layout.num_seqs == 0:
        return None
    cu, _, cache_len = layout.host
    keys = max(cache_len[i] + cu[i + 1] - cu[i] for i in range(layout.num_seqs))
    return ShapeClass(layout.num_seqs, _pow2(layout.max_seqlen_q), _pow2(keys))


def cuda_timer(repeats: int = 3) -> Timer:
    """Median of `repeats` CUDA-event timings after one untimed call (which also autotunes)."""

    def timer(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return timer


def wall_timer(repeats: int = 3) -> Timer:
    def timer(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timer


class MeasuredAttention:
    """An attention function that dispatches each shape class to its measured-fastest candidate."""

    def __init__(
        self, candidates: Mapping[str, Callable[..., torch.Tensor]], default: str, timer: Timer
    ) -> None:
        if default not in candidates:
            raise ValueError(f"default {default!r} is not a candidate ({sorted(candidates)})")
        self.candidates = dict(candidates)
        self.default = default
        self.timer = timer
        self.choices: dict[ShapeClass, str] = {}
        self.timings: dict[ShapeClass, dict[str, float]] = {}

    def choice(self, layout: AttentionLayout) -> str:
        cls = shape_class(layout)
        if cls is None:
            return self.default
        return self.choices.get(cls, self.default)

    def __call__(self, q, k, v, k_cache, v_cache, layout: AttentionLayout) -> torch.Tensor:
        cls = shape_class(layout)
        if cls is None:
            return self.candidates[self.default](q, k, v, k_cache, v_cache, layout)
        name = self.choices.get(cls)
        if name is None:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                name = (
                    self.default
                )  # no timing inside a capture; the class is measured on its next eager call
            else:
                name = self._measure(cls, q, k, v, k_cache, v_cache, layout)
        return self.candidates[name](q, k, v, k_cache, v_cache, layout)

    def _measure(self, cls: ShapeClass, *args) -> str:
        timings = {name: self.timer(lambda fn=fn: fn(*args)) for name, fn in self.candidates.items()}
        best = min(timings, key=lambda n: (timings[n], n != self.default))
        self.choices[cls], self.timings[cls] = best, timings
        shown = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(timings.items()))
        log.info("attention for %s: %s (%s)", cls.label, best, shown)
        return best

    def report(self) -> dict[str, dict]:
        """Every measured class: its choice and the candidates' times in seconds."""
        return {c.label: {"choice": self.choices[c], "seconds": self.timings[c]} for c in self.choices}
