"""CUDA-graph replay of the denoising step, piecewise around attention (docs/exact-mode.md).

A `StepGraph` holds static buffers for one bucket of one weight set and L + 1 captured pieces: piece 0
embeds the latents and computes layer 0's q/k/v; piece i finishes layer i - 1 (o_proj, residual, norm,
MLP) and computes layer i's q/k/v; piece L finishes the last layer and the velocity head. Attention runs
eagerly between pieces, so it reads the KV pool wherever it lives (the pool may grow), over any context
lengths, with whichever implementation the shape class chose (engine/attention_choice.py); nothing in a
captured piece depends on KV lengths. Routing is by index tensors (`IndexRouting`), so the pieces depend
only on the bucket, never on how its rows split between requests.

`GraphDenoiser` is a `Denoiser`: a step that fits a warmed-up bucket replays; any other step runs through
the `fallback` denoiser (the packed eager forward), so a batch that changes moves between buckets or to
eager and is never captured mid-request. Captures happen in `warm_up`, for the buckets the deployment
declares. A wrapper denoiser (a step cache) can hold a `GraphDenoiser` as its inner denoiser; modules
swapped into the model (fp8 linears) must be in place before `warm_up`, which records them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.denoise import BranchPlan, Denoiser, velocities_by_branch
from engine.model.packing import IndexRouting
from engine.sampler import Velocities
from engine.step.buckets import GraphBucket, StepShape, choose_bucket
from engine.step.padded import BranchRows, PaddedStep, pad_step

if TYPE_CHECKING:
    from engine.core import WeightSet
    from engine.model.bagel import Bagel
    from engine.model.llm import AttentionFn

log = logging.getLogger("rvr.engine.graphs")

# Padded layouts kept per denoiser (one per batch composition seen recently).
_COMPOSITIONS = 64


class GraphCapture(Protocol):
    """Records `fn` (which reads and writes only static buffers) and returns its replay."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class EagerReplay:
    """Replays by calling the function again: the same dataflow through the same static buffers, on any
    device. The CPU tests check the buffers, padding and routing with it; CUDA graphs add nothing else."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()
        return fn


class CudaGraphCapture:
    """torch.cuda.CUDAGraph captures sharing one memory pool (pieces and buckets replay one at a time and
    keep no data in the pool between replays: outputs are copied into static buffers)."""

    def __init__(self, device: torch.device, warmup_runs: int = 2) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup_runs = warmup_runs
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        # Eager runs on a side stream first: cuBLAS workspaces, Triton compilation, allocator growth.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (the API, encoders) may touch CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        self.graphs.append(graph)
        return graph.replay


@dataclass
class StepBuffers:
    """The float buffers the pieces read and write. One set per denoiser, sized for its largest bucket;
    each bucket of each weight set uses prefix views (buckets replay one at a time, and every replay
    writes a buffer's rows before it reads them)."""

    x: torch.Tensor  # (G, C) float32 latents per gen row
    t: torch.Tensor  # (G,) float32 flow time per gen row
    cos: torch.Tensor  # (T, 1, D) float32
    sin: torch.Tensor
    h_und: torch.Tensor  # (U, hidden) residual stream of the marker rows
    h_gen: torch.Tensor  # (G, hidden) residual stream of the latent rows
    q: torch.Tensor  # (T, Hq, D) in sequence order
    k: torch.Tensor  # (T, Hkv, D)
    v: torch.Tensor
    o: torch.Tensor  # (T, Hq, D) attention output
    velocity: torch.Tensor  # (G, C) float32

    @classmethod
    def allocate(cls, model: Bagel, und: int, gen: int, rows: int, device: torch.device) -> StepBuffers:
        cfg, dtype = model.config, model.vae2llm.weight.dtype
        hq, hkv, hd, hidden = (
            cfg.llm.num_attention_heads,
            cfg.llm.num_key_value_heads,
            cfg.llm.head_dim,
            cfg.llm.hidden_size,
        )

        def zeros(*shape, dt=torch.float32):
            return torch.zeros(*shape, dtype=dt, device=device)

        return cls(
            x=zeros(gen, cfg.latent_channels),
            t=zeros(gen),
            cos=zeros(rows, 1, hd),
            sin=zeros(rows, 1, hd),
            h_und=zeros(und, hidden, dt=dtype),
            h_gen=zeros(gen, hidden, dt=dtype),
            q=zeros(rows, hq, hd, dt=dtype),
            k=zeros(rows, hkv, hd, dt=dtype),
            v=zeros(rows, hkv, hd, dt=dtype),
            o=zeros(rows, hq, hd, dt=dtype),
            velocity=zeros(gen, cfg.latent_channels),
        )

    def prefix(self, bucket: GraphBucket) -> StepBuffers:
        u, g, t = bucket.und_rows, bucket.gen_rows, bucket.rows
        sizes = {"x": g, "t": g, "cos": t, "sin": t, "h_und": u, "h_gen": g, "q": t, "k": t, "v": t, "o": t,
                 "velocity": g}  # fmt: skip
        return StepBuffers(**{name: getattr(self, name)[:n] for name, n in sizes.items()})


class StepGraph:
    """The captured pieces of the denoising step of one bucket and one weight set, over `buffers`."""

    def __init__(
        self, model: Bagel, marker_ids: torch.Tensor, bucket: GraphBucket, buffers: StepBuffers
    ) -> None:
        device = marker_ids.device
        u, g, t = bucket.und_rows, bucket.gen_rows, bucket.rows
        self.model, self.bucket = model, bucket
        b = buffers.prefix(bucket)
        self.x, self.t, self.cos, self.sin = b.x, b.t, b.cos, b.sin
        self.h_und, self.h_gen, self.q, self.k, self.v, self.o = b.h_und, b.h_gen, b.q, b.k, b.v, b.o
        self.velocity = b.velocity
        # The batch composition (loaded when it changes): per bucket, small.
        self.latent_ids = torch.zeros(g, dtype=torch.long, device=device)  # (G,)
        self.positions = torch.zeros(t, dtype=torch.long, device=device)  # (T,)
        # Any valid permutation until a step loads its own: markers first, then latents.
        self.und_rows = torch.arange(u, device=device)
        self.gen_rows = torch.arange(u, t, device=device)
        self.routing = IndexRouting(self.und_rows, self.gen_rows)
        # (U, hidden): [<|vision_start|>, <|vision_end|>] per branch, the order of `und_rows`.
        self.markers = model.embed_tokens(marker_ids).repeat(bucket.branches, 1)
        self.pieces: list[Callable[[], None]] = []
        self.loaded: tuple | None = None  # composition key of the padded step in the buffers

    # ------------------------------------------------------------------ the pieces

    def _store(self, h_und, h_gen, q, k, v) -> None:
        self.h_und.copy_(h_und)
        self.h_gen.copy_(h_gen)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def _embed(self) -> None:
        llm = self.model.llm
        cos, sin = llm.rotary_emb(self.positions)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        h_gen = self.model.embed_latents(self.x, self.t, self.latent_ids)  # (G, hidden)
        self._store(self.markers, h_gen, *self._inputs(0, self.markers, h_gen))

    def _inputs(self, i: int, h_und, h_gen):
        return self.model.llm.layers[i].attention_inputs(h_und, h_gen, self.routing, (self.cos, self.sin))

    def _layer(self, i: int) -> None:
        """Finish layer i - 1 from `o`, then layer i's q/k/v."""
        h_und, h_gen = self.model.llm.layers[i - 1].attention_outputs(
            self.h_und, self.h_gen, self.o, self.routing
        )
        self._store(h_und, h_gen, *self._inputs(i, h_und, h_gen))

    def _head(self) -> None:
        llm = self.model.llm
        _, h_gen = llm.layers[-1].attention_outputs(self.h_und, self.h_gen, self.o, self.routing)
        self.velocity.copy_(self.model.velocity(llm.norm_moe_gen(h_gen, llm.fused_ops)))

    def capture(self, recorder: GraphCapture) -> None:
        layers = len(self.model.llm.layers)
        fns = [self._embed, *(lambda i=i: self._layer(i) for i in range(1, layers)), self._head]
        self.pieces = [recorder.capture(fn) for fn in fns]

    # ------------------------------------------------------------------ one step

    def load(self, step: PaddedStep, key: tuple, plans: list[BranchPlan], latent_ids: torch.Tensor) -> None:
        """Write a step's inputs into the static buffers (composition tensors only when it changed)."""
        if self.loaded != key:  # (x and t are written every step; they may hold another bucket's rows)
            self.positions.copy_(step.positions)
            self.und_rows.copy_(step.und_rows)
            self.gen_rows.copy_(step.gen_rows)
            self.latent_ids[: step.real_gen_rows].copy_(latent_ids)
            self.loaded = key
        offsets = iter(step.gen_offsets)
        start = next(offsets)
        for plan in plans:
            for _ in plan.branches:
                end = next(offsets)
                self.x[start:end].copy_(plan.state.x)
                self.t[start:end].fill_(plan.t)
                start = end

    def run(self, step: PaddedStep, attention: AttentionFn, kv_layers) -> torch.Tensor:
        """Replay every piece with attention between them; returns the (real gen rows, C) velocity view."""
        rows = step.layout.total_q
        self.pieces[0]()
        for (pool_k, pool_v), piece in zip(kv_layers, self.pieces[1:], strict=True):
            o = attention(self.q[:rows], self.k[:rows], self.v[:rows], pool_k, pool_v, step.layout)
            self.o[:rows].copy_(o)
            piece()
        return self.velocity[: step.real_gen_rows]


class GraphDenoiser:
    """Replays captured steps for batches that fit a warmed-up bucket; the rest run through `fallback`."""

    def __init__(
        self,
        marker_ids: torch.Tensor,
        attention: AttentionFn,
        buckets: tuple[GraphBucket, ...],
        recorder: GraphCapture,
        fallback: Denoiser,
        max_padding: float = 0.25,
    ) -> None:
        self.marker_ids = marker_ids
        self.attention = attention
        self.buckets = buckets
        self.recorder = recorder
        self.fallback = fallback
        self.max_padding = max_padding
        self.graphs: dict[tuple[str, GraphBucket], StepGraph] = {}
        # One set for every bucket of every weight set: steps run one at a time (Engine.step is sequential).
        self._buffers: StepBuffers | None = None
        self._steps: OrderedDict[tuple, tuple[PaddedStep, torch.Tensor]] = OrderedDict()
        self.replays = 0
        self.fallbacks = 0

    def warm_up(self, weights: WeightSet) -> list[str]:
        """Capture every declared bucket for `weights` (idempotent); returns the labels captured now."""
        done = []
        if self._buffers is None and self.buckets:
            und, gen = max(b.und_rows for b in self.buckets), max(b.gen_rows for b in self.buckets)
            self._buffers = StepBuffers.allocate(weights.model, und, gen, und + gen, self.marker_ids.device)
        buffers = self._buffers
        for bucket in self.buckets:
            if (weights.name, bucket) in self.graphs:
                continue
            graph = StepGraph(weights.model, self.marker_ids, bucket, buffers)
            graph.capture(self.recorder)
            self.graphs[(weights.name, bucket)] = graph
            log.info("captured the denoising step of %s for bucket %s", weights.name, bucket.label)
            done.append(bucket.label)
        return done

    def bucket_for(self, plans: list[BranchPlan]) -> GraphBucket | None:
        shape = StepShape.of(p.state.x.shape[0] for p in plans for _ in p.branches)
        return choose_bucket(self.buckets, shape, self.max_padding)

    def velocities(self, weights: WeightSet, plans: list[BranchPlan]) -> list[Velocities]:
        bucket = self.bucket_for(plans)
        graph = self.graphs.get((weights.name, bucket)) if bucket is not None else None
        if graph is None:
            self.fallbacks += 1
            return self.fallback.velocities(weights, plans)
        key, step, latent_ids = self._padded(weights.name, bucket, plans)
        graph.load(step, key, plans, latent_ids)
        velocity = graph.run(step, self.attention, weights.pool.layers())
        self.replays += 1
        out, offsets = [], iter(step.gen_offsets)
        start = next(offsets)
        for plan in plans:
            per_branch = {}
            for branch in plan.branches:
                end = next(offsets)
                # A copy: the static buffer is overwritten by the next replay (a step cache may keep this).
                per_branch[branch] = velocity[start:end].clone()
                start = end
            out.append(velocities_by_branch(plan, per_branch))
        return out

    def _padded(self, name: str, bucket: GraphBucket, plans: list[BranchPlan]):
        branches = []
        for plan in plans:
            s = plan.state
            for branch in plan.branches:
                ctx = s.contexts[branch]
                branches.append((s.grid, BranchRows(s.x.shape[0], ctx.offset, ctx.length, ctx.rope)))
        key = (name, bucket, tuple(branches))
        hit = self._steps.get(key)
        if hit is None:
            step = pad_step([b for _, b in branches], bucket, self.marker_ids.device)
            ids = torch.cat([p.state.latent_ids for p in plans for _ in p.branches])
            hit = self._steps[key] = (step, ids)
            if len(self._steps) > _COMPOSITIONS:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        return (key, *hit)
