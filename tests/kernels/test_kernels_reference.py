"""mixed_attention_reference (and the CPU dispatch of mixed_attention) against a float64 dense-mask golden."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import Segment, SequenceSpec, attention_with_layout, build_layout, mixed_attention
from kernels import mixed_attention_reference as ref
from tests.kernels.kernels_testutil import (
    dense_mask,
    error_stats,
    golden,
    lowp_reference,
    make_inputs,
    mask_from_index,
    random_specs,
    within_tolerance,
)


def _args(layout, inputs):
    return (*inputs, *layout.indices)


@pytest.mark.parametrize("seed", range(12))
def test_reference_random_layouts_fp32(seed):
    rng = random.Random(seed)
    cache_rows = rng.choice([0, 40, 97])
    specs = random_specs(rng, max_rows=160, cache_rows=cache_rows)
    hkv, group = rng.choice([(1, 1), (2, 2), (1, 7), (2, 1)])
    d = rng.choice([64, 128, 72])
    layout = build_layout(specs, "cpu")
    inputs = make_inputs(layout.total_q, cache_rows, hkv * group, hkv, d, torch.float32, seed)
    out, lse = ref(*_args(layout, inputs), return_lse=True)
    gold, gold_lse = golden(*inputs, dense_mask(specs, cache_rows))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == inputs[0].shape and lse.shape == inputs[0].shape[:2]
    assert error_stats(out, gold)["max"] < 2e-5
    assert (lse.double() - gold_lse).abs().max().item() < 2e-5
    # The SDPA path (no LSE) agrees with the explicit path.
    out2 = ref(*_args(layout, inputs))
    assert (out2 - out).abs().max().item() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_reference_low_precision(dtype, seed):
    rng = random.Random(100 + seed)
    cache_rows = rng.choice([0, 50])
    specs = random_specs(rng, max_rows=120, cache_rows=cache_rows)
    layout = build_layout(specs)
    inputs = make_inputs(layout.total_q, cache_rows, 4, 2, 64, dtype, seed)
    out = mixed_attention(*_args(layout, inputs))  # CPU dispatch -> reference
    assert out.dtype == dtype
    mask = dense_mask(specs, cache_rows)
    gold, _ = golden(*inputs, mask)
    ok, msg = within_tolerance(out, gold, lowp_reference(*inputs, mask), dtype)
    assert ok, msg


def test_large_logit_row():
    """A huge score must not overflow (missing max subtraction would give inf/NaN)."""
    specs = [SequenceSpec((Segment(3, True), Segment(20, False), Segment(5, True)), 0, 10)]
    layout = build_layout(specs)
    q, k, v, kc, vc = make_inputs(layout.total_q, 12, 2, 1, 64, torch.float32, 0)
    q[4, 0, :] = 1000.0
    q[0, 1, 0] = 1000.0
    out, lse = ref(
        q,
        k,
        v,
        kc,
        vc,
        layout.cu_seqlens_q,
        layout.cache_start,
        layout.cache_len,
        layout.kv_end,
        return_lse=True,
    )
    gold, gold_lse = golden(q, k, v, kc, vc, dense_mask(specs, 12))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert error_stats(out, gold)["max"] < 1e-4
    assert ((lse.double() - gold_lse).abs() / gold_lse.abs().clamp(min=1)).max().item() < 1e-5


def test_packing_order_invariance_bitwise():
    rng = random.Random(7)
    specs = random_specs(rng, max_rows=150, cache_rows=60)
    while len(specs) < 3:
        specs = random_specs(rng, max_rows=150, cache_rows=60)
    layout = build_layout(specs)
    inputs = make_inputs(layout.total_q, 60, 4, 2, 64, torch.float32, 1)
    out = ref(*_args(layout, inputs))
    perm = list(reversed(range(len(specs))))
    cu = layout.cu_seqlens_q.tolist()
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in perm])
    specs2 = [specs[i] for i in perm]
    layout2 = build_layout(specs2)
    q, k, v, kc, vc = inputs
    out2 = ref(*_args(layout2, (q[rows], k[rows], v[rows], kc, vc)))
    assert torch.equal(out2, out[rows])
    # A sequence computed alone equals its rows in the batch.
    alone = build_layout([specs[1]])
    out3 = ref(*_args(alone, (q[cu[1] : cu[2]], k[cu[1] : cu[2]], v[cu[1] : cu[2]], kc, vc)))
    assert torch.equal(out3, out[cu[1] : cu[2]])


def test_fully_masked_rows_output_zero():
    """Unchecked kv_end = 0 rows with no cache see nothing: output 0, LSE -inf (as the kernel does)."""
    q, k, v, kc, vc = make_inputs(6, 0, 2, 1, 64, torch.float32, 3)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)
    kv_end = torch.tensor([0, 0, 3, 3, 6, 6], dtype=torch.int32)
    out, lse = ref(q, k, v, kc, vc, cu, zero, zero, kv_end, return_lse=True, check=False)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all()
    gold, gold_lse = golden(q, k, v, kc, vc, mask_from_index(cu, zero, zero, kv_end, 0))
    assert error_stats(out, gold)["max"] < 1e-5
    assert torch.isfinite(out).all()
    assert (lse[2:].double() - gold_lse[2:]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="kv_end"):
        ref(q, k, v, kc, vc, cu, zero, zero, kv_end)


def test_attention_with_layout_and_scale():
    specs = [
        SequenceSpec((Segment(9, False), Segment(4, True)), 3, 5),
        SequenceSpec((Segment(7, True),), 0, 8),
    ]
    layout = build_layout(specs)
    inputs = make_inputs(layout.total_q, 8, 4, 4, 64, torch.float32, 5)
    out, lse = attention_with_layout(*inputs, layout, scale=0.3, return_lse=True)
    gold, gold_lse = golden(*inputs, dense_mask(specs, 8), scale=0.3)
    assert error_stats(out, gold)["max"] < 2e-5
    assert (lse.double() - gold_lse).abs().max().item() < 2e-5


def test_empty_batch():
    layout = build_layout([])
    q, k, v, kc, vc = make_inputs(0, 0, 2, 1, 64, torch.float32, 0)
    out = attention_with_layout(q, k, v, kc, vc, layout)
    assert out.shape == (0, 2, 64)


_segment = st.builds(Segment, st.integers(1, 40), st.booleans())


@st.composite
def _batch(draw):
    cache_rows = draw(st.sampled_from([0, 1, 33]))
    specs = []
    for _ in range(draw(st.integers(1, 3))):
        segs = tuple(draw(st.lists(_segment, min_size=1, max_size=3)))
        clen = draw(st.integers(0, cache_rows))
        cstart = draw(st.integers(0, cache_rows - clen))
        specs.append(SequenceSpec(segs, cstart, clen))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 7]))
    return specs, cache_rows, hkv, group


@settings(max_examples=25, deadline=None, database=None)
@given(_batch(), st.integers(0, 2**16))
def test_reference_property(batch, seed):
    specs, cache_rows, hkv, group = batch
    layout = build_layout(specs)
    inputs = make_inputs(layout.total_q, cache_rows, hkv * group, hkv, 64, torch.float32, seed)
    out, lse = ref(*_args(layout, inputs), return_lse=True)
    gold, gold_lse = golden(*inputs, dense_mask(specs, cache_rows))
    assert error_stats(out, gold)["max"] < 2e-5
    torch.testing.assert_close(lse.double(), gold_lse, atol=2e-5, rtol=0)
