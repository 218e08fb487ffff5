"""build_layout against hand-derived kv_end, and the kernel's tile table."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import AttentionLayout, Segment, SequenceSpec, build_layout, build_tile_table
from tests.kernels.kernels_testutil import dense_mask, random_specs


def test_rvr_prefill_layout():
    """[system text, causal 4][ViT block 6][prompt text, causal 3], cached context of 5 rows at 2."""
    spec = SequenceSpec((Segment(4, True), Segment(6, False), Segment(3, True)), cache_start=2, cache_len=5)
    lay = build_layout([spec], "cpu")
    assert isinstance(lay, AttentionLayout)
    assert lay.kv_end.tolist() == [1, 2, 3, 4, 10, 10, 10, 10, 10, 10, 11, 12, 13]
    assert lay.cu_seqlens_q.tolist() == [0, 13]
    assert lay.cache_start.tolist() == [2] and lay.cache_len.tolist() == [5]
    assert all(t.dtype == torch.int32 for t in (lay.kv_end, lay.cu_seqlens_q, lay.cache_start, lay.cache_len))
    assert (lay.total_q, lay.max_seqlen_q, lay.num_seqs, lay.max_cache_end) == (13, 13, 1, 7)
    assert lay.visible_pairs == sum(lay.kv_end.tolist()) + 13 * 5


def test_denoise_three_branches_shared_cache():
    """One denoise step, 3 CFG branches of a 5-row latent block (bidirectional). Cache rows: text [0, 4),
    ViT [4, 10). cond sees text+ViT, text-dropped sees ViT only, image-dropped sees text only."""
    latent = (Segment(5, False),)
    seqs = [SequenceSpec(latent, 0, 10), SequenceSpec(latent, 4, 6), SequenceSpec(latent, 0, 4)]
    lay = build_layout(seqs)
    assert lay.cu_seqlens_q.tolist() == [0, 5, 10, 15]
    assert lay.cache_start.tolist() == [0, 4, 0]
    assert lay.cache_len.tolist() == [10, 6, 4]
    assert lay.kv_end.tolist() == [5] * 15
    assert lay.max_cache_end == 10
    assert lay.visible_pairs == 5 * (15 + 11 + 9)


def test_decode_and_mixed_batch():
    seqs = [SequenceSpec((Segment(1, True),), 3, 9), SequenceSpec((Segment(2, False), Segment(2, True)))]
    lay = build_layout(seqs)
    assert lay.kv_end.tolist() == [1, 2, 2, 3, 4]
    assert lay.cu_seqlens_q.tolist() == [0, 1, 5]


@pytest.mark.parametrize("seed", range(6))
def test_layout_matches_dense_mask(seed):
    """kv_end + cache ranges describe exactly the segment mask."""
    rng = random.Random(seed)
    specs = random_specs(rng, max_rows=150, cache_rows=40)
    lay = build_layout(specs)
    mask = dense_mask(specs, 40)
    cu = lay.cu_seqlens_q.tolist()
    for b, spec in enumerate(specs):
        for r in range(cu[b], cu[b + 1]):
            own = mask[r, 40:]
            n = int(own.sum())
            assert own[cu[b] : cu[b] + n].all() and n == lay.kv_end[r].item()
            assert int(mask[r, :40].sum()) == spec.cache_len


@pytest.mark.parametrize("block_m", [16, 32, 128])
@pytest.mark.parametrize("seed", range(4))
def test_tile_table(block_m, seed):
    rng = random.Random(seed)
    specs = random_specs(rng, max_rows=300, cache_rows=50)
    lay = build_layout(specs)
    tab = lay.tile_table(block_m)
    assert tab.dtype == torch.int32 and tab.shape[1] == 4
    assert lay.tile_table(block_m) is tab  # cached
    cu = lay.cu_seqlens_q.tolist()
    covered = torch.zeros(lay.total_q, dtype=torch.int64)
    costs = []
    for seq, m0, m1, start in tab.tolist():
        if m1 <= m0:
            costs.append(-1)
            continue
        assert start == cu[seq] and cu[seq] <= m0 < m1 <= cu[seq + 1], "tile straddles a sequence"
        assert m1 - m0 <= block_m and (m0 - cu[seq]) % block_m == 0, "tiles anchored at the sequence start"
        covered[m0:m1] += 1
        costs.append(specs[seq].cache_len + lay.kv_end[m1 - 1].item())
    assert covered.eq(1).all(), "every row in exactly one tile"
    assert costs == sorted(costs, reverse=True), "longest tiles first"
    same = build_tile_table(lay.cu_seqlens_q, lay.kv_end, lay.cache_len, lay.total_q, block_m)
    assert torch.equal(same, tab)


def test_build_layout_errors():
    with pytest.raises(ValueError, match="at least one segment"):
        build_layout([SequenceSpec(())])
    with pytest.raises(ValueError, match="length must be an int >= 1"):
        build_layout([SequenceSpec((Segment(0, True),))])
    with pytest.raises(ValueError, match="length must be an int >= 1"):
        build_layout([SequenceSpec((Segment(2.5, True),))])
    with pytest.raises(ValueError, match="causal must be a bool"):
        build_layout([SequenceSpec((Segment(2, 1),))])
    with pytest.raises(ValueError, match="cache_start"):
        build_layout([SequenceSpec((Segment(2, True),), cache_start=-1)])
    with pytest.raises(ValueError, match="cache_len"):
        build_layout([SequenceSpec((Segment(2, True),), cache_len=-3)])
    with pytest.raises(ValueError, match="expected a SequenceSpec"):
        build_layout([(Segment(2, True),)])
    with pytest.raises(ValueError, match="expected a Segment"):
        build_layout([SequenceSpec(((2, True),))])


def test_tile_table_empty_sequence_and_decode():
    """Zero-row sequences (allowed by the raw API) get no tile; 1-row decode sequences one tile each."""
    cu = torch.tensor([0, 0, 3, 3, 4, 5], dtype=torch.int32)
    kv_end = torch.tensor([1, 2, 3, 1, 1], dtype=torch.int32)
    cache_len = torch.tensor([0, 4, 9, 2, 7], dtype=torch.int32)
    tab = build_tile_table(cu, kv_end, cache_len, 5, 16)
    real = [row for row in tab.tolist() if row[2] > row[1]]
    assert sorted(real) == [[1, 0, 3, 0], [3, 3, 4, 3], [4, 4, 5, 4]]
    assert [r[0] for r in real] == [4, 1, 3]  # cost 8, 7, 3: longest first
