"""Qwen2 backbone with BAGEL's Mixture-of-Transformers split (und weights / `*_moe_gen` weights).

Per layer, every row uses the weights of its expert for the input norm, q/k/v, QK-norm, o_proj, the
post-attention norm and the MLP; attention is one softmax over all rows of a sequence plus its cached
keys. QK-norm and RoPE run in float32 (as the reference does in gen mode), attention in the model dtype.
Module and parameter names follow the official checkpoint (`language_model.model.layers.{i}...`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import LLMConfig
from engine.model.packing import ForwardBatch, Routing

# (q, k, v, k_cache, v_cache, layout) -> out; q: (T, Hq, D), k/v: (T, Hkv, D), caches: (Tc, Hkv, D)
AttentionFn = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE, rotate-half convention; cos/sin computed in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,) -> cos, sin: (T, 1, D) float32, broadcast over heads
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (T, H, D) float32
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Projections of both experts; the attention itself is supplied by the caller (kernel or reference)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        d, hq, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, hq * hd, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, hkv * hd, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, hkv * hd, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(hq * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))

    def qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (n, hidden) -> q (n, Hq, D) float32, k (n, Hkv, D) float32, v (n, Hkv, D) model dtype
        s = "_moe_gen" if gen else ""
        n = x.shape[0]
        q = getattr(self, f"q_proj{s}")(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{s}")(x).view(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{s}")(x).view(n, self.num_kv_heads, self.head_dim)
        q = getattr(self, f"q_norm{s}")(q.float())
        k = getattr(self, f"k_norm{s}")(k.float())
        return q, k, v

    def out(self, o: torch.Tensor, gen: bool) -> torch.Tensor:
        return (self.o_proj_moe_gen if gen else self.o_proj)(o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(d, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(d, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_moe_gen = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps)

    def pre_attention(self, h: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token work before attention for one expert's rows: input norm, q/k/v, QK-norm."""
        return self.self_attn.qkv((self.input_layernorm_moe_gen if gen else self.input_layernorm)(h), gen)

    def post_attention(self, h: torch.Tensor, o: torch.Tensor, gen: bool) -> torch.Tensor:
        """Per-token work after attention for one expert's rows: o_proj + residual, norm, MLP + residual."""
        h = h + self.self_attn.out(o, gen)
        norm = self.post_attention_layernorm_moe_gen if gen else self.post_attention_layernorm
        return h + (self.mlp_moe_gen if gen else self.mlp)(norm(h))

    def forward(
        self,
        h_und: torch.Tensor,  # (Tu, hidden)
        h_gen: torch.Tensor,  # (Tg, hidden)
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's pool K, V: (capacity, Hkv, D)
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Only routing, RoPE, cache writes and attention depend on the batch layout; the per-token blocks
        # (`pre_attention`, `post_attention`) take any row count, which is what compile backends wrap.
        routing = batch.routing
        q_u, k_u, v_u = self.pre_attention(h_und, gen=False)
        q_g, k_g, v_g = self.pre_attention(h_gen, gen=True)
        dtype = h_und.dtype if h_und.numel() else h_gen.dtype
        cos, sin = rope
        q = apply_rope(routing.merge(q_u, q_g), cos, sin).to(dtype)  # (T, Hq, D)
        k = apply_rope(routing.merge(k_u, k_g), cos, sin).to(dtype)  # (T, Hkv, D)
        v = routing.merge(v_u, v_g)
        pool_k, pool_v = kv
        for w in batch.cache_writes:
            pool_k[w.slot : w.slot + w.n] = k[w.row : w.row + w.n]
            pool_v[w.slot : w.slot + w.n] = v[w.row : w.row + w.n]
        o = attention(q, k, v, pool_k, pool_v, batch.layout)  # (T, Hq, D)
        o_u, o_g = routing.split(o.reshape(o.shape[0], -1))
        return self.post_attention(h_und, o_u, gen=False), self.post_attention(h_gen, o_g, gen=True)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # Training only: recompute each layer in backward instead of keeping its activations (7B-scale runs).
        self.gradient_checkpointing = False

    def forward(
        self,
        embeds: torch.Tensor,  # (T, hidden) input rows in sequence order
        batch: ForwardBatch,
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (pool K, pool V)
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the final-normed hidden states of the und rows and the gen rows (each in sequence order)."""
        rope = self.rotary_emb(batch.positions)
        h_und, h_gen = batch.routing.split(embeds)
        for layer, kv in zip(self.layers, kv_layers, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h_und, h_gen = checkpoint(
                    layer, h_und, h_gen, batch, rope, kv, attention, use_reentrant=False
                )
            else:
                h_und, h_gen = layer(h_und, h_gen, batch, rope, kv, attention)
        return self.norm(h_und), self.norm_moe_gen(h_gen)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


__all__ = ["AttentionFn", "Qwen2MoTForCausalLM", "RMSNorm", "Routing", "apply_rope"]
