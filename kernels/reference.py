"""Plain-PyTorch implementation of the `mixed_attention` contract (the CPU path and the test oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._validate import default_scale, validate

__all__ = ["mixed_attention_reference"]


def mixed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_start: torch.Tensor,
    cache_len: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    check: bool = True,
):
    """Same contract as `kernels.mixed_attention`, computed per sequence with an fp32 softmax.

    Sequence b's keys are cat(k_cache[cache_start[b] : cache_start[b] + cache_len[b]], k[own rows]); its
    local row r sees the first cache_len[b] + kv_end[r] of them. Rows that see no key at all (possible
    only with `check=False` and kv_end <= 0) output 0 with LSE -inf, like the kernel.
    """
    validate(q, k, v, k_cache, v_cache, cu_seqlens_q, cache_start, cache_len, kv_end, scale, check)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    sc = default_scale(scale, d)
    out = torch.zeros_like(q)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    b = cu_seqlens_q.numel() - 1
    host = torch.cat([cu_seqlens_q, cache_start, cache_len]).tolist()
    cu, cs, cl = host[: b + 1], host[b + 1 : 2 * b + 1], host[2 * b + 1 :]
    ke_host = kv_end.to("cpu").numpy()
    for i in range(b):
        s, e = cu[i], cu[i + 1]
        if e <= s:
            continue
        n, p = e - s, cl[i]
        kb = torch.cat([k_cache[cs[i] : cs[i] + p], k[s:e]]).float().transpose(0, 1)  # (Hkv, S, D)
        vb = torch.cat([v_cache[cs[i] : cs[i] + p], v[s:e]]).float().transpose(0, 1)
        qb = q[s:e].float().transpose(0, 1)  # (Hq, L, D)
        ke = ke_host[s:e]
        lo, hi_ = int(ke.min()), int(ke.max())
        all_seen = p + lo > 0
        if return_lse or not all_seen:
            hi = kv_end[s:e].long() + p  # visible keys per row
            mask = torch.arange(p + n, device=q.device)[None, :] < hi[:, None]  # (L, S)
        if return_lse:
            qg = qb.reshape(hkv, group, n, d)
            scores = torch.einsum("kgld,ksd->kgls", qg, kb) * sc
            scores = scores.masked_fill(~mask, float("-inf"))
            row_lse = torch.logsumexp(scores, dim=-1)  # (Hkv, G, L)
            safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
            probs = torch.exp(scores - safe[..., None])
            ob = torch.einsum("kgls,ksd->kgld", probs, vb).reshape(hq, n, d)
            lse[s:e] = row_lse.reshape(hq, n).transpose(0, 1)
        else:
            gqa = {"enable_gqa": True} if group > 1 else {}
            qb, kb, vb = qb[None], kb[None], vb[None]  # 4-D: the fused CPU kernels take (B, H, L, D)
            if lo == n:  # every row sees every key: no mask
                ob = F.scaled_dot_product_attention(qb, kb, vb, scale=sc, **gqa)
            elif p == 0 and lo == 1 and hi_ == n and bool((ke[1:] - ke[:-1] == 1).all()):  # plain causal
                ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=sc, **gqa)
            else:
                if all_seen:
                    mask = torch.arange(p + n, device=q.device)[None, :] < (kv_end[s:e].long() + p)[:, None]
                ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=sc, **gqa)
            ob = ob[0]
        if not all_seen:
            seen = (kv_end[s:e].long() + p > 0)[None, :, None]
            ob = torch.where(seen, ob, torch.zeros_like(ob))
        out[s:e] = ob.transpose(0, 1).to(q.dtype)
    if return_lse:
        return out, lse
    return out
