"""Shared helpers for the kernels tests: random layouts, a float64 dense-mask golden, tolerances.

The golden's mask is built from the segment specs directly (not from kv_end), so it also checks the
layout derivation. Imported by the in-process tests and by the interpreter worker subprocess.
"""

from __future__ import annotations

import random

import torch

from kernels import Segment, SequenceSpec


def random_specs(
    rng: random.Random, max_rows: int = 200, cache_rows: int = 0, min_rows: int = 1
) -> list[SequenceSpec]:
    """A random batch of sequences: length-1 segments, blocks shorter/longer than a 32/64 tile, boundaries
    on and off tile edges, shared/overlapping cache ranges, empty caches. Redraws until >= min_rows rows."""
    while True:
        specs = _random_specs(rng, max_rows, cache_rows)
        if sum(s.length for s in specs) >= min_rows:
            return specs


def _random_specs(rng: random.Random, max_rows: int, cache_rows: int) -> list[SequenceSpec]:
    n_seq = rng.randint(1, 4)
    budget = max_rows
    shared = []  # cache ranges to reuse (overlap / identical prefixes)
    specs = []
    for _ in range(n_seq):
        segs = []
        for _ in range(rng.randint(1, 4)):
            length = rng.choice([1, 1, 2, rng.randint(3, 12), 16, 31, 32, 33, rng.randint(34, 80), 64, 65])
            length = max(1, min(length, budget - 1 if budget > 1 else 1))
            segs.append(Segment(length, rng.random() < 0.5))
            budget -= length
            if budget <= 1:
                break
        cstart, clen = 0, 0
        if cache_rows > 0:
            mode = rng.random()
            if mode < 0.2:
                clen = 0
            elif mode < 0.45 and shared:
                cstart, clen = rng.choice(shared)
            else:
                clen = rng.choice([1, rng.randint(2, cache_rows), cache_rows, 31, 32, 33])
                clen = min(clen, cache_rows)
                cstart = rng.randint(0, cache_rows - clen)
                shared.append((cstart, clen))
        specs.append(SequenceSpec(tuple(segs), cstart, clen))
        if budget <= 1:
            break
    return specs


def dense_mask(specs: list[SequenceSpec], cache_rows: int) -> torch.Tensor:
    """(Tq, Tc + Tq) boolean mask over [k_cache ; k] from the segments themselves."""
    tq = sum(s.length for s in specs)
    mask = torch.zeros(tq, cache_rows + tq, dtype=torch.bool)
    row = 0
    for spec in specs:
        n = spec.length
        mask[row : row + n, spec.cache_start : spec.cache_start + spec.cache_len] = True
        pos = 0
        for seg in spec.segments:
            for i in range(pos, pos + seg.length):
                end = i + 1 if seg.causal else pos + seg.length
                mask[row + i, cache_rows + row : cache_rows + row + end] = True
            pos += seg.length
        row += n
    return mask


def mask_from_index(cu, cache_start, cache_len, kv_end, cache_rows: int) -> torch.Tensor:
    """Dense mask straight from (possibly invalid, check=False) index tensors."""
    cu, cs, cl, ke = (x.tolist() for x in (cu, cache_start, cache_len, kv_end))
    tq = cu[-1]
    mask = torch.zeros(tq, cache_rows + tq, dtype=torch.bool)
    for b in range(len(cu) - 1):
        for r in range(cu[b], cu[b + 1]):
            mask[r, cs[b] : cs[b] + cl[b]] = True
            mask[r, cache_rows + cu[b] : cache_rows + cu[b] + max(ke[r], 0)] = True
    return mask


def golden(q, k, v, k_cache, v_cache, mask, scale=None):
    """float64 attention over [k_cache ; k] with a dense mask; fully masked rows give 0 and LSE -inf."""
    d = q.shape[-1]
    scale = scale if scale is not None else d**-0.5
    group = q.shape[1] // k.shape[1]
    keys = torch.cat([k_cache, k]).double().repeat_interleave(group, dim=1)  # (S, Hq, D)
    vals = torch.cat([v_cache, v]).double().repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q.double(), keys) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (H, T)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    out = torch.einsum("hts,shd->thd", p, vals)
    return out, lse.transpose(0, 1)


def lowp_reference(q, k, v, k_cache, v_cache, mask, scale=None):
    """The same attention with the low-precision roundings a flash kernel makes (probabilities rounded to
    the input dtype before the PV product, output rounded): PyTorch's 'out_pt' of the FA3 tests."""
    dt = q.dtype
    d = q.shape[-1]
    scale = scale if scale is not None else d**-0.5
    group = q.shape[1] // k.shape[1]
    keys = torch.cat([k_cache, k]).float().repeat_interleave(group, dim=1)
    vals = torch.cat([v_cache, v]).float().repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q.float(), keys) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    o = torch.einsum("hts,shd->thd", p.to(dt).float(), vals) / denom.transpose(0, 1)
    return o.to(dt)


def make_inputs(total_q, cache_rows, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return (
        rnd(total_q, hq, d),
        rnd(total_q, hkv, d),
        rnd(total_q, hkv, d),
        rnd(cache_rows, hkv, d),
        rnd(cache_rows, hkv, d),
    )


def fwd_atol(gold: torch.Tensor, dtype) -> float:
    """FA3's fwd_atol: twice the rounding error of the output magnitude in `dtype`."""
    g = gold.to(dtype)
    return 2 * ((g + 0.3 - 0.3) - g).abs().max().item() if gold.numel() else 0.0


def error_stats(out: torch.Tensor, gold: torch.Tensor) -> dict:
    diff = (out.double() - gold).abs()
    if diff.numel() == 0:
        return {"max": 0.0, "mean": 0.0, "nan": False}
    return {"max": diff.max().item(), "mean": diff.mean().item(), "nan": bool(torch.isnan(out).any().item())}


def within_tolerance(out, gold, lowp, dtype) -> tuple[bool, str]:
    """docs/kernel.md §5: max|out-gold| <= 2 max|out_pt-gold| + fwd_atol (FA3), and
    mean|out-gold| <= fudge * mean|out_pt-gold| (+ a floor at fp32 epsilon scale), fudge 1.1 / 10."""
    e = error_stats(out, gold)
    r = error_stats(lowp, gold)
    atol = fwd_atol(gold, dtype)
    fudge = 10.0 if dtype == torch.float32 else 1.1
    floor = 1e-6 if dtype == torch.float32 else 0.0
    ok_max = e["max"] <= 2 * r["max"] + atol
    ok_mean = e["mean"] <= fudge * r["mean"] + floor
    msg = (
        f"max {e['max']:.3g} (bound {2 * r['max'] + atol:.3g}), mean {e['mean']:.3g} "
        f"(bound {fudge * r['mean'] + floor:.3g}), nan {e['nan']}"
    )
    return (ok_max and ok_mean and not e["nan"]), msg
