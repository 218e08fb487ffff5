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
from kernels import fused
from kernels.fused_reference import (
    qk_norm_rope_reference,
    rms_norm_reference,
    rotate_half,
    silu_mul_reference,
)

# (q, k, v, k_cache, v_cache, layout) -> out; q: (T, Hq, D), k/v: (T, Hkv, D), caches: (Tc, Hkv, D)
AttentionFn = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, fused_ops: bool = False) -> torch.Tensor:
        return (fused.rms_norm if fused_ops else rms_norm_reference)(x, self.weight, self.eps)


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
    return x * cos + rotate_half(x) * sin


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the outputs of `parts` side by side (their weights concatenated)."""
    first = parts[0]
    has_bias = first.bias is not None
    with torch.device("meta"):
        out = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=has_bias)
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts])
        out.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
        if has_bias:
            out.bias = nn.Parameter(
                torch.cat([p.bias for p in parts]), requires_grad=first.bias.requires_grad
            )
    return out


class _ConcatenatedKeys:
    """State-dict hooks that keep the checkpoint's names for a concatenated projection: `state_dict()`
    writes the parts (`q_proj.weight`, ...) and `load_state_dict` takes them, so the fused module is
    interchangeable with the unfused one in every file and checksum."""

    def __init__(self, fused_name: str, parts: list[tuple[str, int]], bias: bool) -> None:
        self.fused_name, self.parts = fused_name, parts  # parts: (name, out_features)
        self.params = ("weight", "bias") if bias else ("weight",)

    def save(self, module, state_dict, prefix, local_metadata) -> None:
        for p in self.params:
            key = f"{prefix}{self.fused_name}.{p}"
            if key not in state_dict:
                continue
            fused = state_dict.pop(key)
            for (name, _), chunk in zip(self.parts, fused.split([n for _, n in self.parts]), strict=True):
                state_dict[f"{prefix}{name}.{p}"] = chunk

    def load(self, module, state_dict, prefix, *args) -> None:
        for p in self.params:
            keys = [f"{prefix}{name}.{p}" for name, _ in self.parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{self.fused_name}.{p}"] = torch.cat([state_dict.pop(k) for k in keys])


def _fuse(module: nn.Module, fused_name: str, part_names: list[str]) -> None:
    """Replace the nn.Linear children `part_names` of `module` by one concatenated child `fused_name`."""
    parts = [getattr(module, n) for n in part_names]
    setattr(module, fused_name, _concat_linear(parts))
    for n in part_names:
        delattr(module, n)
    keys = _ConcatenatedKeys(
        fused_name,
        [(n, p.out_features) for n, p in zip(part_names, parts, strict=True)],
        parts[0].bias is not None,
    )
    # Plain functions: torch tags hooks with attributes, which bound methods cannot take.
    module.register_state_dict_post_hook(lambda *a: keys.save(*a))
    module.register_load_state_dict_pre_hook(lambda *a: keys.load(*a))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def fuse_projections(self) -> None:
        """gate_proj and up_proj as one GEMM (`gate_up_proj`, [gate | up]); checkpoint keys unchanged."""
        if not hasattr(self, "gate_up_proj"):
            _fuse(self, "gate_up_proj", ["gate_proj", "up_proj"])

    def forward(self, x: torch.Tensor, fused_ops: bool = False) -> torch.Tensor:
        # x: (n, hidden)
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)  # (n, 2 * intermediate)
            act = (fused.silu_mul if fused_ops else silu_mul_reference)(gate_up)
        else:
            act = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(act)


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

    def fuse_projections(self) -> None:
        """q/k/v of each expert as one GEMM (`qkv_proj`, `qkv_proj_moe_gen`); checkpoint keys unchanged."""
        for s in ("", "_moe_gen"):
            if not hasattr(self, f"qkv_proj{s}"):
                _fuse(self, f"qkv_proj{s}", [f"q_proj{s}", f"k_proj{s}", f"v_proj{s}"])

    def project(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw projections: x (n, hidden) -> q (n, Hq, D), k, v (n, Hkv, D) (views of one GEMM when fused)."""
        s = "_moe_gen" if gen else ""
        n, hq, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        fused_proj = getattr(self, f"qkv_proj{s}", None)
        if fused_proj is not None:
            qkv = fused_proj(x).view(n, hq + 2 * hkv, hd)
            return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
        q = getattr(self, f"q_proj{s}")(x).view(n, hq, hd)
        k = getattr(self, f"k_proj{s}")(x).view(n, hkv, hd)
        v = getattr(self, f"v_proj{s}")(x).view(n, hkv, hd)
        return q, k, v

    def qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (n, hidden) -> q (n, Hq, D) float32, k (n, Hkv, D) float32, v (n, Hkv, D) model dtype
        s = "_moe_gen" if gen else ""
        q, k, v = self.project(x, gen)
        q = getattr(self, f"q_norm{s}")(q.float())
        k = getattr(self, f"k_norm{s}")(k.float())
        return q, k, v

    def qkv_rope(
        self, x: torch.Tensor, gen: bool, cos: torch.Tensor, sin: torch.Tensor, fused_ops: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k normed and rotated (model dtype), v: what `qkv` + `apply_rope` give, in one pass over q/k."""
        # x: (n, hidden); cos, sin: (n, 1, D) float32 -> q (n, Hq, D), k, v (n, Hkv, D) in x's dtype
        s = "_moe_gen" if gen else ""
        hq, hkv = self.num_heads, self.num_kv_heads
        fused_proj = getattr(self, f"qkv_proj{s}", None)
        if fused_proj is not None:
            qkv = fused_proj(x).view(x.shape[0], hq + 2 * hkv, self.head_dim)
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
        else:
            q, k, v = self.project(x, gen)
            qk = torch.cat([q, k], dim=1)
        q_norm, k_norm = getattr(self, f"q_norm{s}"), getattr(self, f"k_norm{s}")
        op = fused.qk_norm_rope if fused_ops else qk_norm_rope_reference
        qk = op(qk, q_norm.weight, k_norm.weight, hq, cos, sin, q_norm.eps, x.dtype)  # (n, Hq + Hkv, D)
        return qk[:, :hq], qk[:, hq:], v

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
        # `kernels.fused` ops (Triton on CUDA) for the per-token work; set by Qwen2MoTModel.use_fused_ops.
        self.fused_ops = False

    def pre_attention(self, h: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token work before attention for one expert's rows: input norm, q/k/v, QK-norm."""
        norm = self.input_layernorm_moe_gen if gen else self.input_layernorm
        return self.self_attn.qkv(norm(h, self.fused_ops), gen)

    def pre_attention_rope(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gen: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pre_attention` plus RoPE for one expert's rows (cos, sin: (n, 1, D)): q, k in the model dtype."""
        norm = self.input_layernorm_moe_gen if gen else self.input_layernorm
        return self.self_attn.qkv_rope(norm(h, self.fused_ops), gen, cos, sin, self.fused_ops)

    def post_attention(self, h: torch.Tensor, o: torch.Tensor, gen: bool) -> torch.Tensor:
        """Per-token work after attention for one expert's rows: o_proj + residual, norm, MLP + residual."""
        norm = self.post_attention_layernorm_moe_gen if gen else self.post_attention_layernorm
        mlp = self.mlp_moe_gen if gen else self.mlp
        attn_out = self.self_attn.out(o, gen)
        if self.fused_ops:
            h, normed = fused.add_rms_norm(attn_out, h, norm.weight, norm.eps)
        else:
            h = h + attn_out
            normed = norm(h)
        return h + mlp(normed, self.fused_ops)

    def attention_inputs(
        self,
        h_und: torch.Tensor,  # (Tu, hidden)
        h_gen: torch.Tensor,  # (Tg, hidden)
        routing: Routing,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (T, 1, D) float32 in sequence order
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k, v (T, Hkv, D) in sequence order and the model dtype, RoPE applied."""
        cos, sin = rope
        if self.fused_ops:
            (cos_u, cos_g), (sin_u, sin_g) = routing.split(cos), routing.split(sin)
            q_u, k_u, v_u = self.pre_attention_rope(h_und, cos_u, sin_u, gen=False)
            q_g, k_g, v_g = self.pre_attention_rope(h_gen, cos_g, sin_g, gen=True)
            return routing.merge(q_u, q_g), routing.merge(k_u, k_g), routing.merge(v_u, v_g)
        q_u, k_u, v_u = self.pre_attention(h_und, gen=False)
        q_g, k_g, v_g = self.pre_attention(h_gen, gen=True)
        dtype = h_und.dtype if h_und.numel() else h_gen.dtype
        q = apply_rope(routing.merge(q_u, q_g), cos, sin).to(dtype)  # (T, Hq, D)
        k = apply_rope(routing.merge(k_u, k_g), cos, sin).to(dtype)  # (T, Hkv, D)
        return q, k, routing.merge(v_u, v_g)

    def attention_outputs(
        self, h_und: torch.Tensor, h_gen: torch.Tensor, o: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual streams after this layer, from the attention output o (T, Hq, D)."""
        o_u, o_g = routing.split(o.reshape(o.shape[0], -1))
        return self.post_attention(h_und, o_u, gen=False), self.post_attention(h_gen, o_g, gen=True)

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
        q, k, v = self.attention_inputs(h_und, h_gen, batch.routing, rope)
        pool_k, pool_v = kv
        for w in batch.cache_writes:
            pool_k[w.slot : w.slot + w.n] = k[w.row : w.row + w.n]
            pool_v[w.slot : w.slot + w.n] = v[w.row : w.row + w.n]
        o = attention(q, k, v, pool_k, pool_v, batch.layout)  # (T, Hq, D)
        return self.attention_outputs(h_und, h_gen, o, batch.routing)


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
        self.fused_ops = False

    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up of every expert into one GEMM each (idempotent). State-dict keys
        stay the checkpoint's, so files, checksums and `load_state_dict` see the unfused layout."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
            layer.mlp_moe_gen.fuse_projections()

    def use_fused_ops(self, enabled: bool = True) -> None:
        """Run norms, QK-norm + RoPE, residual + norm and SiLU-mul through `kernels.fused` (Triton on CUDA
        outside autograd; the same formulas in PyTorch elsewhere)."""
        self.fused_ops = enabled
        for layer in self.layers:
            layer.fused_ops = enabled

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
        return self.norm(h_und, self.fused_ops), self.norm_moe_gen(h_gen, self.fused_ops)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


__all__ = ["AttentionFn", "Qwen2MoTForCausalLM", "RMSNorm", "Routing", "apply_rope"]
