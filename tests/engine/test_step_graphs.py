"""The replayable denoising step on CPU: bucket choice, padding, index routing and fallback.

`EagerReplay` runs the same pieces through the same static buffers that CUDA graphs replay, so every
step that replays here computes exactly what the packed eager step does; CUDA graph capture itself is
checked on a GPU (test_step_graphs_gpu.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerationRequest, SamplingParams, load_engine
from engine.denoise import PackedDenoiser
from engine.model.packing import IndexRouting, Routing
from engine.step import EagerReplay, GraphBucket, GraphDenoiser, StepShape, choose_bucket, parse_buckets
from engine.step.padded import BranchRows, pad_step


def test_bucket_specs():
    assert GraphBucket.parse("3x4096") == GraphBucket(3, 4096)
    assert GraphBucket.parse(" 12 x 1024 ").label == "12x1024"
    assert parse_buckets(["3x1024", "3x4096", "3x1024"]) == (GraphBucket(3, 1024), GraphBucket(3, 4096))
    for bad in ("3", "3x", "x4", "0x16", "3x0", "ax4", 3):
        with pytest.raises(ValueError):
            GraphBucket.parse(bad)
    b = GraphBucket(3, 4096)
    assert (b.gen_rows, b.und_rows, b.rows) == (12288, 6, 12294)


def test_choose_bucket():
    buckets = parse_buckets(["3x4096", "3x1024", "6x4096"])
    one_1024 = StepShape.of([4096] * 3)
    assert choose_bucket(buckets, one_1024, 0.25) == GraphBucket(3, 4096)
    assert choose_bucket(buckets, StepShape.of([1024] * 3), 0.25) == GraphBucket(3, 1024)
    # The CFG window closed on two branches: 1 branch of 4096 would pad 200 % in 3x4096; eager instead.
    assert choose_bucket(buckets, StepShape.of([4096]), 0.25) is None
    assert choose_bucket(buckets, StepShape.of([4096]), 2.0) == GraphBucket(3, 4096)
    # Two 1024^2 refines and one 512^2: 15360 latent rows in 6x4096 pad 60 %.
    assert choose_bucket(buckets, StepShape.of([4096] * 6), 0.25) == GraphBucket(6, 4096)
    assert choose_bucket(buckets, StepShape.of([4096] * 3 + [1024] * 3), 0.25) is None
    assert choose_bucket(buckets, StepShape.of([4096] * 7), 10.0) is None  # more branches than any bucket
    assert choose_bucket(buckets, StepShape.of([5000, 10, 10]), 10.0) == GraphBucket(3, 4096)  # total counts
    assert choose_bucket((), one_1024, 1.0) is None


def test_padded_step_layout():
    branches = [BranchRows(3, 10, 7, 5), BranchRows(2, 0, 4, 9)]
    step = pad_step(branches, GraphBucket(3, 4), torch.device("cpu"))
    # rows: [m 3l m][m 2l m] (real, 9) | pad branch [m m] | 7 spare latents: 18 = 3 x 4 latents + 6 markers
    assert step.layout.total_q == 9 and step.layout.num_seqs == 2
    assert step.layout.host == ((0, 5, 9), (10, 0), (7, 4)) and step.layout.full_blocks
    assert step.und_rows.tolist() == [0, 4, 5, 8, 9, 10]
    assert step.gen_rows.tolist() == [1, 2, 3, 6, 7, *range(11, 18)]
    assert step.positions.tolist() == [5] * 5 + [9] * 4 + [0] * 9
    assert step.gen_offsets == (0, 3, 5) and step.real_gen_rows == 5
    routing = IndexRouting(step.und_rows, step.gen_rows)
    x = torch.arange(18.0)[:, None]
    und, gen = routing.split(x)
    assert torch.equal(routing.merge(und, gen), x)
    with pytest.raises(ValueError):
        pad_step([BranchRows(5, 0, 1, 0)], GraphBucket(1, 4), torch.device("cpu"))


def test_index_routing_matches_slice_routing():
    runs = [(False, 1), (True, 4), (False, 2), (True, 3), (False, 1)]
    routing = Routing.from_runs(runs)
    flags = [g for g, n in runs for _ in range(n)]
    index = IndexRouting(
        torch.tensor([i for i, g in enumerate(flags) if not g]),
        torch.tensor([i for i, g in enumerate(flags) if g]),
    )
    x = torch.randn(len(flags), 3, 2)
    for a, b in zip(routing.split(x), index.split(x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(routing.merge(*routing.split(x)), index.merge(*index.split(x)))


class CountingReplay(EagerReplay):
    def __init__(self) -> None:
        self.captures = 0

    def capture(self, fn):
        self.captures += 1
        return super().capture(fn)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    # The fused ops' formulas too (on CUDA they are the Triton kernels the pieces capture).
    return load_engine(tiny_ckpt, device="cpu", backend_options={"fused_kernels": True})


def _image(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _run(engine, reqs, poison=None):
    states = engine.prepare(reqs)
    try:
        while not all(s.done for s in states):
            if poison:
                poison()
            engine.step(states)
        return [s.x.clone() for s in states]
    finally:
        for s in states:
            engine.release(s)


def _graph_denoiser(engine, specs, max_padding=0.5):
    packed = engine.denoiser
    assert isinstance(packed, PackedDenoiser)  # CPU exact: the packed forward
    recorder = CountingReplay()
    graphs = GraphDenoiser(
        engine._marker_ids, packed.attention, parse_buckets(specs), recorder, packed, max_padding
    )
    return graphs, recorder


REFINE = GenerationRequest(
    "refine", "a red cup", _image(64, 64), SamplingParams.for_task("refine", steps=4), seed=1
)
SMALL = GenerationRequest(
    "refine", "a cat", _image(32, 32, 1), SamplingParams.for_task("refine", steps=4), seed=2
)
REFINE_LATENTS, SMALL_LATENTS = 16, 4  # the tiny model's latent tokens of a 64^2 and a 32^2 refine


def test_replayed_steps_equal_the_packed_step(engine):
    """One refine in its bucket (padded latent rows), two refines of different sizes in one bucket (padded
    branches and rows), against the packed eager step: equal up to float32 reassociation."""
    expected = {"one": _run(engine, [REFINE]), "two": _run(engine, [REFINE, SMALL])}
    # REFINE: 48 latent rows in 3x20 (60); REFINE + SMALL: 6 branches, 60 rows in 8x9 (72, two pad branches).
    graphs, recorder = _graph_denoiser(engine, ["3x20", "8x9"])
    packed = engine._denoiser
    try:
        engine._denoiser = graphs
        assert engine.warm_up() == {"rvr": ["3x20", "8x9"], "ema": ["3x20", "8x9"]}
        layers = engine.cfg.llm.num_hidden_layers
        assert recorder.captures == 2 * 2 * (layers + 1)  # pieces per bucket per weight set
        got = {"one": _run(engine, [REFINE]), "two": _run(engine, [REFINE, SMALL])}
        assert engine.warm_up() == {"rvr": [], "ema": []} and recorder.captures == 2 * 2 * (layers + 1)
    finally:
        engine._denoiser = packed
    assert graphs.replays == 6 and graphs.fallbacks == 0  # 3 steps each
    for key, xs in expected.items():
        for a, b in zip(got[key], xs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_real_rows(engine):
    """Spare rows and pad branches hold NaN before every step: the real rows do not change."""
    expected = _run(engine, [SMALL])
    graphs, _ = _graph_denoiser(engine, ["4x16"], max_padding=10.0)  # one pad branch, 52 spare rows
    packed = engine._denoiser
    try:
        engine._denoiser = graphs
        engine.warm_up()
        graph = graphs.graphs[("rvr", GraphBucket(4, 16))]
        real = SMALL_LATENTS * 3

        @torch.inference_mode()
        def poison():
            graph.x[real:] = float("nan")
            graph.t[real:] = float("nan")
            graph.o[3 * (SMALL_LATENTS + 2) :] = float("nan")

        got = _run(engine, [SMALL], poison)
    finally:
        engine._denoiser = packed
    assert graphs.replays == 3
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_unfit_steps_fall_back_without_capturing(engine):
    graphs, recorder = _graph_denoiser(engine, ["1x4"], max_padding=0.0)
    packed = engine._denoiser
    try:
        engine._denoiser = graphs
        engine.warm_up()
        captured = recorder.captures
        expected_fallback = _run(engine, [REFINE])
    finally:
        engine._denoiser = packed
    assert graphs.replays == 0 and graphs.fallbacks == 3 and recorder.captures == captured
    torch.testing.assert_close(expected_fallback[0], _run(engine, [REFINE])[0], rtol=0, atol=0)


def test_undeclared_weight_set_or_unwarmed_bucket_runs_eagerly(engine):
    graphs, recorder = _graph_denoiser(engine, ["3x20"])
    packed = engine._denoiser
    try:
        engine._denoiser = graphs
        _run(engine, [REFINE])  # never warmed up: nothing captured mid-request
    finally:
        engine._denoiser = packed
    assert recorder.captures == 0 and graphs.replays == 0 and graphs.fallbacks == 3
