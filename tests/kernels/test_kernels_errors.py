"""Every invalid-argument path raises ValueError with a clear message (reference and dispatcher)."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    Segment,
    SequenceSpec,
    attention_with_layout,
    build_layout,
    mixed_attention,
    mixed_attention_reference,
)

I32 = torch.int32


def _valid():
    """Two sequences (3 and 4 rows), cache of 5 rows, Hq 4 / Hkv 2, D 16."""
    q = torch.randn(7, 4, 16)
    k = torch.randn(7, 2, 16)
    v = torch.randn(7, 2, 16)
    kc = torch.randn(5, 2, 16)
    vc = torch.randn(5, 2, 16)
    return {
        "q": q,
        "k": k,
        "v": v,
        "k_cache": kc,
        "v_cache": vc,
        "cu_seqlens_q": torch.tensor([0, 3, 7], dtype=I32),
        "cache_start": torch.tensor([0, 2], dtype=I32),
        "cache_len": torch.tensor([5, 3], dtype=I32),
        "kv_end": torch.tensor([1, 2, 3, 4, 4, 4, 4], dtype=I32),
    }


def _call(fn, args, **kw):
    return fn(**args, **kw)


CASES = [
    ("q", lambda a: a["q"].numpy(), "q must be a torch.Tensor"),
    ("q", lambda a: a["q"][0], "q must be 3-D"),
    ("k_cache", lambda a: a["k_cache"][None], "k_cache must be 3-D"),
    ("q", lambda a: a["q"].double(), "q dtype must be one of"),
    ("q", lambda a: a["q"].to(torch.int32), "q dtype must be one of"),
    ("v", lambda a: a["v"].half(), "v dtype"),
    ("k_cache", lambda a: a["k_cache"].half(), "k_cache dtype"),
    ("kv_end", lambda a: a["kv_end"].long(), "kv_end must be int32"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), "cu_seqlens_q must be int32"),
    ("cache_start", lambda a: a["cache_start"][None], "cache_start must be 1-D"),
    ("k", lambda a: a["k"][:6], "k shape"),
    ("k", lambda a: a["k"][..., :8], "k shape"),
    ("v", lambda a: torch.randn(7, 1, 16), "v shape"),
    ("k_cache", lambda a: torch.randn(5, 1, 16), "k_cache shape"),
    ("v_cache", lambda a: torch.randn(4, 2, 16), "v_cache shape"),
    ("q", lambda a: torch.randn(7, 3, 16), "multiple of key/value heads"),
    ("cu_seqlens_q", lambda a: torch.zeros(0, dtype=I32), "B\\+1 >= 1"),
    ("cache_start", lambda a: torch.zeros(3, dtype=I32), "cache_start must have B=2"),
    ("cache_len", lambda a: torch.zeros(1, dtype=I32), "cache_len must have B=2"),
    ("kv_end", lambda a: a["kv_end"][:5], "one entry per query row"),
]


@pytest.mark.parametrize("fn", [mixed_attention, mixed_attention_reference])
@pytest.mark.parametrize(("name", "bad", "msg"), CASES)
def test_metadata_errors(fn, name, bad, msg):
    args = _valid()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=msg):
        _call(fn, args, check=False)  # metadata checks run even without check


def test_head_dim_limits():
    args = _valid()
    for key in ("q", "k", "v", "k_cache", "v_cache"):
        args[key] = torch.randn(args[key].shape[0], args[key].shape[1], 264)
    with pytest.raises(ValueError, match="head_dim must be in"):
        mixed_attention(**args)


def test_scale_must_be_positive_and_finite():
    # The kernel's online softmax takes max(qk) * scale as the scaled row max: true only for scale > 0.
    args = _valid()
    for bad in (float("nan"), float("inf"), "0.1", True, 0.0, -0.125):
        with pytest.raises(ValueError, match="scale"):
            mixed_attention(**args, scale=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    args = _valid()
    args["kv_end"] = args["kv_end"].cuda()
    with pytest.raises(ValueError, match="share a device"):
        mixed_attention(**args)


def test_device_mismatch_meta():
    """'meta' stands in for a second device on CPU-only machines."""
    args = _valid()
    args["kv_end"] = args["kv_end"].to("meta")
    with pytest.raises(ValueError, match="share a device"):
        mixed_attention(**args)


RANGE_CASES = [
    ("cu_seqlens_q", [1, 3, 7], "cu_seqlens_q\\[0\\] must be 0"),
    ("cu_seqlens_q", [0, 3, 6], "must equal the number of query rows 7"),
    ("cu_seqlens_q", [0, 8, 7], "non-decreasing"),
    ("cache_start", [-1, 2], "cache_start\\[0\\] = -1 is negative"),
    ("cache_len", [5, -1], "cache_len\\[1\\] = -1 is negative"),
    ("cache_start", [1, 2], "exceeds the 5 rows of k_cache"),
    ("cache_len", [5, 4], "exceeds the 5 rows of k_cache"),
    ("kv_end", [1, 2, 3, 4, 4, 4, 5], "kv_end\\[6\\] = 5 out of range"),
    ("kv_end", [1, 2, 3, 4, 4, 4, 3], "kv_end\\[6\\] = 3 out of range"),
    ("kv_end", [0, 2, 3, 4, 4, 4, 4], "kv_end\\[0\\] = 0 out of range"),
    (
        "kv_end",
        [3, 2, 3, 4, 4, 4, 4],
        "non-decreasing within a sequence: kv_end\\[1\\] = 2 < kv_end\\[0\\] = 3",
    ),
    ("kv_end", [1, 2, 3, 4, 3, 4, 4], "kv_end\\[4\\] = 3 < kv_end\\[3\\] = 4 \\(sequence 1\\)"),
]


@pytest.mark.parametrize("fn", [mixed_attention, mixed_attention_reference])
@pytest.mark.parametrize(("name", "values", "msg"), RANGE_CASES)
def test_range_errors(fn, name, values, msg):
    args = _valid()
    args[name] = torch.tensor(values, dtype=I32)
    with pytest.raises(ValueError, match=msg):
        _call(fn, args)


def test_non_monotone_kv_end_only_in_sequence():
    """kv_end may drop across a sequence boundary; the valid base case passes."""
    args = _valid()
    args["kv_end"] = torch.tensor([3, 3, 3, 1, 2, 3, 4], dtype=I32)
    out = mixed_attention(**args)
    assert out.shape == (7, 4, 16)


def test_attention_with_layout_errors():
    lay = build_layout([SequenceSpec((Segment(3, True),), 0, 4)])
    q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    kc = torch.randn(4, 1, 16)
    with pytest.raises(ValueError, match="AttentionLayout"):
        attention_with_layout(q, k, v, kc, kc, {"kv_end": None})
    with pytest.raises(ValueError, match="layout has 3"):
        attention_with_layout(q[:2], k[:2], v[:2], kc, kc, build_layout([SequenceSpec((Segment(3, True),))]))
    with pytest.raises(ValueError, match="reach row 4"):
        attention_with_layout(q, k, v, kc[:3], kc[:3], lay)
    with pytest.raises(ValueError, match="k shape"):
        attention_with_layout(q, k[:2], v, kc, kc, lay)
    assert attention_with_layout(q, k, v, kc, kc, lay).shape == (3, 2, 16)
