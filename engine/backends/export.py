"""The exportable hot loop: one denoise step of ONE request for ONE CFG branch (docs/backends.md §1, §2).

`DenoiseStep` is mathematically the engine's packed denoise forward restricted to one branch sequence:
the query block is [<|vision_start|>, N latents, <|vision_end|>], every row at the branch's RoPE position,
attending without a mask to the branch's cached context plus the whole block. MoT routing uses static
slices (und rows 0 and N+1, gen rows 1..N) and the cache is an explicit input, so the graph holds no
index_put / nonzero: ONNX gets Slice/Concat, not ScatterND/NonZero/GatherND (docs/backends.md §1, §7.2).

The module shares its weights with the `Bagel` it is built from (no copies) and holds only what the step
uses: no token embedding table, LM head or ViT.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram

from engine.backends.base import ShapeBucket
from engine.model.bagel import Bagel
from engine.model.llm import apply_rope

if TYPE_CHECKING:
    import onnx

    from engine.core import Engine, RequestState

# ONNX ops that mean dynamic routing or scatter-written caches crept back into the graph
# (docs/backends.md §7.2).
FORBIDDEN_ONNX_OPS = frozenset({"ScatterND", "NonZero", "GatherND"})
# The same in the aten graph of an ExportedProgram.
FORBIDDEN_ATEN_OPS = frozenset({"index_put", "index_put_", "nonzero", "scatter", "masked_scatter"})
INPUT_NAMES = ("x", "t", "latent_ids", "past_k", "past_v", "rope")


class DenoiseStep(nn.Module):
    """(x, t, latent_ids, past_k, past_v, rope) -> velocity, for one request and one CFG branch."""

    def __init__(self, model: Bagel, marker_ids: tuple[int, int]) -> None:
        super().__init__()
        llm = model.llm
        cfg = model.config.llm
        self.layers = llm.layers
        self.norm = llm.norm_moe_gen
        self.rotary_emb = llm.rotary_emb
        self.vae2llm, self.llm2vae, self.time_embedder = model.vae2llm, model.llm2vae, model.time_embedder
        self.latent_pos_embed = model.latent_pos_embed
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.latent_channels = model.config.latent_channels
        ids = torch.tensor(marker_ids, device=llm.embed_tokens.weight.device)
        with torch.no_grad():
            # (2, hidden): <|vision_start|>, <|vision_end|> embeddings, so the graph carries no vocab table.
            self.register_buffer("markers", llm.embed_tokens(ids).detach().clone())
        self.train(False)  # inference only (nothing here differs in training mode; exporters warn otherwise)

    @classmethod
    def from_engine(cls, engine: Engine, weights: str) -> DenoiseStep:
        """The step of one of the engine's weight sets ("rvr" or "ema")."""
        tok = engine.tokenizer
        return cls(engine.weight_sets[weights].model, (tok.vision_start_id, tok.vision_end_id))

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def cast(self, dtype: torch.dtype) -> DenoiseStep:
        """A private copy with weights in `dtype`; RoPE frequencies stay float32, as the loader keeps them."""
        out = copy.deepcopy(self).to(dtype)
        out.rotary_emb.inv_freq = self.rotary_emb.inv_freq.clone()
        return out

    def forward(
        self,
        x: torch.Tensor,  # (N, C) float32 latents
        t: torch.Tensor,  # () float32 flow time
        latent_ids: torch.Tensor,  # (N,) int64 rows of latent_pos_embed
        past_k: torch.Tensor,  # (L, P, Hkv, D) the branch's cached context keys (RoPE applied)
        past_v: torch.Tensor,  # (L, P, Hkv, D)
        rope: torch.Tensor,  # () int64 the branch's RoPE position
    ) -> torch.Tensor:  # (N, C) float32 velocity
        dtype = self.dtype
        # Same sum as Bagel.embed_latents; index_select (Gather) instead of advanced indexing.
        pos = torch.index_select(self.latent_pos_embed.pos_embed, 0, latent_ids)
        h_gen = self.vae2llm(x.to(dtype)) + self.time_embedder(t.reshape(1)) + pos  # (N, hidden)
        h_und = self.markers  # (2, hidden)
        cos, sin = self.rotary_emb(rope.reshape(1))  # (1, 1, D): every block row shares the position
        for i, layer in enumerate(self.layers):
            q_u, k_u, v_u = layer.pre_attention(h_und, gen=False)
            q_g, k_g, v_g = layer.pre_attention(h_gen, gen=True)
            q = apply_rope(_to_sequence(q_u, q_g), cos, sin).to(dtype)  # (N+2, Hq, D)
            k = apply_rope(_to_sequence(k_u, k_g), cos, sin).to(dtype)  # (N+2, Hkv, D)
            v = _to_sequence(v_u, v_g)
            o = self._attend(q, torch.cat([past_k[i], k]), torch.cat([past_v[i], v]))  # (N+2, Hq*D)
            h_und = layer.post_attention(h_und, torch.cat([o[:1], o[-1:]]), gen=False)
            h_gen = layer.post_attention(h_gen, o[1:-1], gen=True)
        return self.llm2vae(self.norm(h_gen)).float()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (T, Hq, D); k, v: (S, Hkv, D) with S = P + T -> (T, Hq*D). Full attention, no mask.
        group = self.num_heads // self.num_kv_heads
        # GQA by repeat (q head h reads kv head h // group, as repeat_interleave): Expand + Reshape in ONNX.
        k = k[:, :, None].expand(-1, -1, group, -1).flatten(1, 2)  # (S, Hq, D)
        v = v[:, :, None].expand(-1, -1, group, -1).flatten(1, 2)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        )  # (1, Hq, T, D)
        return o[0].transpose(0, 1).flatten(1)

    def example_inputs(
        self, n: int, p: int, *, seed: int = 0, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Random inputs of the step's signature with N latents and P cached tokens."""
        device = device or self.markers.device
        g = torch.Generator().manual_seed(seed)
        layers = len(self.layers)
        kv = (layers, p, self.num_kv_heads, self.head_dim)
        grid = self.latent_pos_embed.pos_embed.shape[0]
        return tuple(
            a.to(device)
            for a in (
                torch.randn(n, self.latent_channels, generator=g),
                torch.rand((), generator=g),
                torch.randint(0, grid, (n,), generator=g),
                torch.randn(kv, generator=g).to(self.dtype),
                torch.randn(kv, generator=g).to(self.dtype),
                torch.randint(0, 64, (), generator=g),
            )
        )


def _to_sequence(und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    # und: (2, ...) markers, gen: (N, ...) latents -> (N+2, ...) in block order [start, latents, end]
    return torch.cat([und[:1], gen, und[1:]])


def dynamic_shapes(bucket: ShapeBucket) -> dict[str, dict[int, Dim] | None]:
    """`torch.export` dims for the bucket's N and P ranges (t and rope are scalars)."""
    n = Dim("n", min=bucket.n[0], max=bucket.n[2])
    p = Dim("p", min=bucket.p[0], max=bucket.p[2])
    return {"x": {0: n}, "t": None, "latent_ids": {0: n}, "past_k": {1: p}, "past_v": {1: p}, "rope": None}


def _example_sizes(bucket: ShapeBucket) -> tuple[int, int]:
    # Trace at opt, but away from 1 (torch.export specialises a dim whose example size is 1).
    return min(max(bucket.n[1], 2), bucket.n[2]), min(max(bucket.p[1], 2), bucket.p[2])


def export_denoise_step(step: DenoiseStep, bucket: ShapeBucket) -> ExportedProgram:
    """`torch.export` with dynamic N and P over the bucket's ranges."""
    n, p = _example_sizes(bucket)
    with torch.no_grad():
        return torch.export.export(
            step, step.example_inputs(n, p), dynamic_shapes=dynamic_shapes(bucket), strict=False
        )


def forbidden_aten_ops(exported: ExportedProgram) -> dict[str, int]:
    """Counts of routing-by-index / scatter aten ops in an exported graph (empty when routing is static)."""
    counts: dict[str, int] = {}
    for node in exported.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if name in FORBIDDEN_ATEN_OPS:
                counts[name] = counts.get(name, 0) + 1
    return counts


def export_onnx(
    step: DenoiseStep,
    path: str | Path,
    bucket: ShapeBucket,
    *,
    opset: int = 23,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the step as ONNX (dynamo exporter) at `opset`; `dtype` casts a private copy (e.g. bfloat16).

    Opset 23 fuses attention into `Attention` and the norms into `RMSNormalization` (docs/backends.md §5);
    TensorRT 11 takes precision only from the graph, so a bf16 engine needs a bf16 export
    (docs/backends.md §7.1). Files over 2 GB get external data next to `path`.
    """
    import onnx

    if dtype is not None and dtype != step.dtype:
        step = step.cast(dtype)
    n, p = _example_sizes(bucket)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Exporter-internal notices, not problems of this graph (pytest turns warnings into errors).
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        program = torch.onnx.export(
            step,
            step.example_inputs(n, p),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=["velocity"],
            dynamic_shapes=dynamic_shapes(bucket),
            optimize=True,
            verbose=False,
        )
    program.save(path)
    model = onnx.load(str(path), load_external_data=False)
    if _cast_rms_inputs(model):
        onnx.save(model, str(path))
    return path


def _cast_rms_inputs(model: onnx.ModelProto) -> int:
    """Cast X of every fused RMSNormalization whose X and Y types differ to Y's type; returns the count.

    For QK-norm in a bf16 model, `rmsnorm(q.float())`, the exporter folds the `.float()` cast into a fused
    RMSNormalization(X bf16, Scale fp32) -> Y fp32. ONNX shape inference types Y from X, so the model
    fails full_check; casting X first restores the eager computation (normalise the float32 q) exactly.
    """
    import onnx

    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, casts = [], {}
    for node in model.graph.node:
        if node.op_type == "RMSNormalization":
            x_type, y_type = types.get(node.input[0]), types.get(node.output[0])
            if x_type and y_type and x_type != y_type:
                key = (node.input[0], y_type)
                if key not in casts:
                    casts[key] = f"{node.input[0]}_as_{onnx.TensorProto.DataType.Name(y_type).lower()}"
                    nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [casts[key]], to=y_type))
                node.input[0] = casts[key]
        nodes.append(node)
    if casts:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(casts)


def onnx_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """op_type -> count over the main graph, its subgraphs and its local functions."""
    counts: dict[str, int] = {}

    def visit(graph: onnx.GraphProto | onnx.FunctionProto) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                    visit(sub)

    visit(model.graph)
    for fn in model.functions:
        visit(fn)
    return counts


def forbidden_onnx_ops(
    model: onnx.ModelProto, forbidden: Iterable[str] = FORBIDDEN_ONNX_OPS
) -> dict[str, int]:
    """Counts of the forbidden ops (ScatterND, NonZero, GatherND by default); empty when routing is static."""
    counts = onnx_op_counts(model)
    return {op: counts[op] for op in sorted(set(forbidden)) if op in counts}


def branch_inputs(state: RequestState, branch: str) -> tuple[torch.Tensor, ...]:
    """The step's inputs for one CFG branch of a prepared request at its current step.

    The K/V are views of the weight set's pool (no copy): (L, P, Hkv, D) over the branch's context range.
    """
    ctx = state.contexts[branch]
    pool = state.weights.pool
    x = state.x
    rows = slice(ctx.offset, ctx.offset + ctx.length)
    return (
        x,
        torch.tensor(state.timesteps[state.step], dtype=torch.float32, device=x.device),
        state.latent_ids,
        pool.k[:, rows],
        pool.v[:, rows],
        torch.tensor(ctx.rope, dtype=torch.long, device=x.device),
    )
