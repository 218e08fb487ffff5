"""The compiled kernel on a CUDA GPU in bf16/fp16 (what the interpreter cannot check): random segment
layouts and the RvR shapes against the float64 dense-mask golden, with docs/kernel.md §5 tolerances."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import Segment, SequenceSpec, build_layout, mixed_attention
from tests.kernels.kernels_testutil import (
    dense_mask,
    golden,
    lowp_reference,
    make_inputs,
    random_specs,
    within_tolerance,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _check(specs, cache_rows, hq, hkv, d, dtype, seed):
    layout = build_layout(specs)
    total_q = layout.total_q
    q, k, v, kc, vc = make_inputs(total_q, cache_rows, hq, hkv, d, dtype, seed)
    mask = dense_mask(specs, cache_rows)
    gold, _ = golden(q, k, v, kc, vc, mask)
    lowp = lowp_reference(q, k, v, kc, vc, mask)
    dev = [t.cuda() for t in (q, k, v, kc, vc)]
    idx = [t.cuda() for t in layout.indices]
    out = mixed_attention(*dev, *idx).cpu()
    ok, msg = within_tolerance(out, gold, lowp, dtype)
    assert ok, msg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (4, 2, 128), (28, 4, 128), (16, 16, 72)])
def test_random_layouts_on_gpu(dtype, hq, hkv, d):
    rng = random.Random(hash((str(dtype), hq, hkv, d)) % 2**32)
    for case in range(6):
        cache_rows = rng.choice([0, 37, 300])
        specs = random_specs(rng, max_rows=600, cache_rows=cache_rows)
        _check(specs, cache_rows, hq, hkv, d, dtype, seed=case)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_rvr_shapes_on_gpu(dtype):
    # RvR prefill [sys 38 causal][ViT block 1602][prompt 20 causal] + a 3-branch denoise step over it.
    prefill = [SequenceSpec((Segment(38, True), Segment(1602, False), Segment(20, True)))]
    _check(prefill, 0, 28, 4, 128, dtype, seed=1)
    ctx = 38 + 1602 + 20
    denoise = [
        SequenceSpec((Segment(1026, False),), 20, ctx),
        SequenceSpec((Segment(1026, False),), 20, 38 + 1602),
        SequenceSpec((Segment(1026, False),), 0, 58),
    ]
    _check(denoise, 20 + ctx, 28, 4, 128, dtype, seed=2)
