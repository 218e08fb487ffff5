"""Kernel or SDPA per shape class (engine/attention_choice.py), with fake candidates and timings, and the
per-sequence SDPA attention against the reference on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.attention import reference_attention, sdpa_attention, select_attention
from engine.attention_choice import MeasuredAttention, ShapeClass, shape_class, wall_timer
from kernels import Segment, SequenceSpec, build_layout


def _denoise_layout(latents=(30, 30, 30), caches=((0, 50), (10, 40), (60, 8))):
    specs = [SequenceSpec((Segment(n + 2, False),), s, c) for n, (s, c) in zip(latents, caches, strict=True)]
    return build_layout(specs)


def _prefill_layout():
    return build_layout([SequenceSpec((Segment(7, True), Segment(12, False)))])


def _inputs(layout, hq=4, hkv=2, d=16, cache=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = layout.total_q
    return (
        torch.randn(t, hq, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
        torch.randn(cache, hkv, d, generator=g),
        torch.randn(cache, hkv, d, generator=g),
    )


def test_shape_classes():
    layout = _denoise_layout()
    assert shape_class(layout) == ShapeClass(3, 32, 128)  # 32 rows, longest 50 + 32 keys
    assert shape_class(_denoise_layout(latents=(29, 25, 20))) == ShapeClass(3, 32, 128)  # same class
    assert shape_class(_denoise_layout(latents=(40, 30, 30))) == ShapeClass(3, 64, 128)
    assert shape_class(_prefill_layout()) is None  # masked: not classed


NO_TENSORS = (torch.empty(0),) * 5  # the fake candidates ignore their inputs


class FakeTimer:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.calls = seconds, []

    def __call__(self, fn):
        name = fn()  # the fake candidates return their name
        self.calls.append(name)
        return self.seconds[name]


def _candidates(log):
    def make(name):
        def fn(*args):
            log.append(name)
            return name

        return fn

    return {"kernel": make("kernel"), "sdpa": make("sdpa")}


def test_faster_candidate_is_chosen_once_per_class_and_logged(caplog):
    calls: list[str] = []
    timer = FakeTimer({"kernel": 2.9e-3, "sdpa": 2.4e-3})
    att = MeasuredAttention(_candidates(calls), default="kernel", timer=timer)
    layout = _denoise_layout()
    with caplog.at_level(logging.INFO, logger="rvr.engine.attention"):
        assert att(*NO_TENSORS, layout) == "sdpa"
    assert sorted(timer.calls) == ["kernel", "sdpa"]
    assert "attention for seqs3_rows32_keys128: sdpa" in caplog.text and "kernel 2.900 ms" in caplog.text
    for _ in range(3):  # decided: no more timing for the class
        assert att(*NO_TENSORS, _denoise_layout(latents=(28, 28, 28))) == "sdpa"
    assert len(timer.calls) == 2
    assert att.report() == {"seqs3_rows32_keys128": {"choice": "sdpa", "seconds": timer.seconds}}
    # A masked layout goes to the default, untimed.
    assert att(*NO_TENSORS, _prefill_layout()) == "kernel"
    assert len(timer.calls) == 2
    # Another class is measured on its own; ties keep the default.
    timer.seconds = {"kernel": 1.0, "sdpa": 1.0}
    assert att(*NO_TENSORS, _denoise_layout(latents=(100, 100, 100))) == "kernel"
    assert len(timer.calls) == 4 and att.choice(_denoise_layout(latents=(100, 100, 100))) == "kernel"


def test_default_must_be_a_candidate():
    with pytest.raises(ValueError):
        MeasuredAttention({"sdpa": sdpa_attention}, default="kernel", timer=wall_timer())


def test_sdpa_per_sequence_matches_the_reference():
    layout = _denoise_layout()
    args = _inputs(layout)
    torch.testing.assert_close(
        sdpa_attention(*args, layout), reference_attention(*args, layout), rtol=1e-5, atol=1e-5
    )
    # A masked layout falls back to the reference on CPU (the kernel on CUDA).
    pre = _prefill_layout()
    args = _inputs(pre, cache=1)
    assert torch.equal(sdpa_attention(*args, pre), reference_attention(*args, pre))
    assert select_attention("sdpa", torch.device("cpu")) is sdpa_attention


def test_measured_attention_with_real_candidates_on_cpu():
    layout = _denoise_layout()
    args = _inputs(layout)
    att = MeasuredAttention(
        {"reference": reference_attention, "sdpa": sdpa_attention}, "reference", wall_timer(1)
    )
    torch.testing.assert_close(att(*args, layout), reference_attention(*args, layout), rtol=1e-5, atol=1e-5)
    assert set(att.report()["seqs3_rows32_keys128"]["seconds"]) == {"reference", "sdpa"}
