"""The engine's step API: prepare (prefill), step (one packed denoising step), preview, finish, release.

The `Engine` owns what only it can: the resident weight sets, each with its KV pool, and the request
states between `prepare` and `finish`. Any mix of requests (task, size, steps, CFG settings, context
lengths) advances together: `step` runs every planned CFG branch of every request through the backend's
`Denoiser` (by default one packed forward per weight set). Each request draws its noise from its own CPU
generator, so its image does not depend on what else is in the batch. Run-to-completion calls (`run`,
`refine`, ...) live in `engine.pipelines`, the judge in `engine.judge`, packing in `engine.prefill` and
`engine.denoise`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from engine import pipelines
from engine.attention import select_attention
from engine.backends.base import Backend
from engine.capabilities import Capabilities, checkpoint_fingerprint, tokenizer_hash
from engine.config import BagelConfig
from engine.contexts import ContextRange, PrefillSequence, plan_contexts
from engine.denoise import BRANCHES, Denoiser, PackedDenoiser, advance, plan_step
from engine.judge import judge_scores
from engine.kvcache import KVPool
from engine.model.bagel import Bagel
from engine.model.packing import RowPacker
from engine.model.vae import AutoEncoder
from engine.prefill import encode_vae, pack_nodes, vit_embeddings
from engine.preprocess import latent_position_ids, tensor_to_pil, unpatchify_latent
from engine.requests import (
    ContextImage,
    RequestLimits,
    context_image,
    context_token_counts,
    task_contexts,
    validate_request,
)
from engine.sampler import schedule
from engine.tokenizer import Tokenizer
from engine.types import MAX_STEPS, MIN_STEPS, TASKS, FinishedRound, GenerationRequest, StepEvent
from kernels import SequenceSpec

StepCallback = Callable[[StepEvent, Callable[..., Image.Image]], None]


@dataclass(frozen=True)
class StepStats:
    """What one `step` computed: CFG-branch sequences and query rows, over all weight sets."""

    sequences: int = 0
    rows: int = 0


@dataclass(frozen=True)
class StepResult:
    """Progress of every request a `step` advanced, and what the step computed."""

    events: list[StepEvent]
    stats: StepStats


@dataclass
class WeightSet:
    """One resident set of BAGEL weights with its own KV pool (KV rows are only valid for their weights)."""

    name: str  # "rvr" or "ema"
    model: Bagel
    pool: KVPool


@dataclass(eq=False)
class RequestState:
    """A prepared request between `prepare` and `finish`/`release`."""

    request: GenerationRequest
    weights: WeightSet
    generator: torch.Generator
    grid: tuple[int, int]  # latent tokens (rows, cols)
    alloc: tuple[int, int]  # (first slot, slots) in the weight set's KV pool
    contexts: dict[str, ContextRange]  # absolute pool offsets
    x: torch.Tensor  # (N, C) float32 current latents
    latent_ids: torch.Tensor  # (N,) position ids into latent_pos_embed
    timesteps: list[float]
    dts: list[float]
    step: int = 0
    x0: torch.Tensor | None = None  # (N, C) x0 estimate after the last step
    timings: dict[str, float] = field(default_factory=dict)
    released: bool = False

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


@dataclass
class _Prefill:
    """One request's part of a prefill forward."""

    state: RequestState
    image: ContextImage | None
    sequences: list[PrefillSequence]


class Engine:
    def __init__(
        self,
        cfg: BagelConfig,
        tokenizer: Tokenizer,
        weights: dict[str, Bagel],
        vae: AutoEncoder,
        device: torch.device,
        dtype: torch.dtype,
        *,
        attention: str = "auto",
        kv_capacity: int | None = None,
        limits: RequestLimits | None = None,
        backend: Backend | None = None,
        info: dict | None = None,
    ) -> None:
        """`backend` (default: eager) prepares the weight sets and may supply the denoiser that steps run
        through (per-branch compiled modules); prefill always stays on the packed forward."""
        if not weights:
            raise ValueError("an engine needs at least one weight set")
        self.cfg, self.tokenizer, self.vae = cfg, tokenizer, vae
        self.device, self.dtype = device, dtype
        self.limits = limits or RequestLimits()
        self.attention_impl = attention
        self._attention = select_attention(attention, device)
        llm = cfg.llm
        self.weight_sets = {
            name: WeightSet(
                name,
                model,
                KVPool(
                    llm.num_hidden_layers,
                    llm.num_key_value_heads,
                    llm.head_dim,
                    dtype,
                    device,
                    capacity=kv_capacity or 4096,
                    growable=kv_capacity is None,
                ),
            )
            for name, model in weights.items()
        }
        self._info = dict(info or {})
        self._capabilities: Capabilities | None = None
        self._marker_ids = torch.tensor([tokenizer.vision_start_id, tokenizer.vision_end_id], device=device)
        if backend is None:
            from engine.backends.eager import EagerBackend

            backend = EagerBackend()
        self.backend = backend
        self._denoiser: Denoiser = backend.attach(self) or PackedDenoiser(self._marker_ids, self._attention)

    # ------------------------------------------------------------------ queries

    @property
    def device_name(self) -> str:
        return str(self.device)

    def info(self) -> dict:
        return {
            **self._info,
            "backend": self.backend.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": sorted(self.weight_sets),
            "max_image_side": self.cfg.max_image_side,
            "size_multiple": self.cfg.latent_downsample,
        }

    def capabilities(self) -> Capabilities:
        """Tasks, placement and the request limits this engine enforces (docs/serving.md §6).
        The checkpoint fingerprint and tokenizer hash are computed once."""
        if self._capabilities is None:
            stride = self.cfg.latent_downsample
            model_dir = self._info.get("model_dir")
            self._capabilities = Capabilities(
                model=Path(model_dir).name if model_dir else "unnamed",
                model_hash=checkpoint_fingerprint(model_dir) if model_dir else "",
                tasks=(*TASKS, "judge"),
                device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."),
                weights=tuple(sorted(self.weight_sets)),
                backend=self.backend.name,
                attention=self.attention_impl,
                speed_modes=("exact",),
                min_side=stride,
                max_side=self.cfg.max_image_side,
                side_multiple=stride,
                min_steps=MIN_STEPS,
                max_steps=MAX_STEPS,
                max_rounds=self.limits.max_rounds,
                max_prompt_tokens=self.limits.max_prompt_tokens,
                tokenizer_hash=tokenizer_hash(self.tokenizer.to_json()),
            )
        return self._capabilities

    def weights_for(self, task: str) -> WeightSet:
        """Refine uses RvR weights; generate, edit and judge use BAGEL's (each falls back to the other)."""
        prefer = ("rvr", "ema") if task == "refine" else ("ema", "rvr")
        return next(self.weight_sets[n] for n in prefer if n in self.weight_sets)

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """A normalised copy of `req` (defaults, seed, output size); raises InvalidRequestError."""
        return validate_request(req, self.cfg, self.tokenizer, self.limits)

    def kv_tokens(self, req: GenerationRequest) -> int:
        """KV slots plus query rows of all branches a (validated) request holds while it runs."""
        plan = plan_contexts(self._contexts(req))  # sizes only: no pixel work at admission
        h, w = req.height // self.cfg.latent_downsample, req.width // self.cfg.latent_downsample
        return plan.total_slots + len(BRANCHES) * (h * w + 2)

    @torch.inference_mode()
    def warm_up(self) -> dict[str, list[str]]:
        """Prepare the backend's denoiser for serving (CUDA-graph captures of the declared buckets); returns
        what was prepared per weight set. A no-op for denoisers without a warm-up."""
        warm = getattr(self._denoiser, "warm_up", None)
        if warm is None:
            return {}
        return {name: warm(ws) for name, ws in self.weight_sets.items()}

    @property
    def denoiser(self) -> Denoiser:
        """What `step` runs the planned branches through (the backend's choice)."""
        return self._denoiser

    # ------------------------------------------------------------------ step API

    @torch.inference_mode()
    def prepare(self, requests: list[GenerationRequest]) -> list[RequestState]:
        """Validate, allocate KV and prefill every context of every request (one forward per weight set)."""
        t0 = time.perf_counter()
        reqs = [self.validate(r) for r in requests]
        states: list[RequestState] = []
        groups: dict[str, list[_Prefill]] = {}
        try:
            for req in reqs:
                part = self._new_state(req)
                states.append(part.state)
                groups.setdefault(part.state.weights.name, []).append(part)
            for name, parts in groups.items():
                self._prefill(self.weight_sets[name], parts)
        except BaseException:
            for state in states:
                self.release(state)
            raise
        elapsed = time.perf_counter() - t0
        for state in states:
            state.timings["prefill_s"] = elapsed
        return states

    @torch.inference_mode()
    def step(self, states: list[RequestState]) -> StepResult:
        """Advance every unfinished, unreleased state by one denoising step (per weight set, one call of
        the backend's denoiser: by default one packed forward)."""
        active = [s for s in states if not s.done and not s.released]
        groups: dict[str, list[RequestState]] = {}
        for s in active:
            groups.setdefault(s.weights.name, []).append(s)
        sequences = rows = 0
        for name, members in groups.items():
            plans = plan_step(members)
            t0 = time.perf_counter()
            velocities = self._denoiser.velocities(self.weight_sets[name], plans)
            for plan, v in zip(plans, velocities, strict=True):
                advance(plan, v)
            elapsed = time.perf_counter() - t0
            for plan in plans:
                plan.state.timings["denoise_s"] = plan.state.timings.get("denoise_s", 0.0) + elapsed
                sequences += len(plan.branches)
                rows += plan.rows
        events = [
            StepEvent(s.request.request_id, s.request.round_index, s.request.rounds, s.step, s.total_steps)
            for s in active
        ]
        return StepResult(events, StepStats(sequences, rows))

    @torch.inference_mode()
    def preview(self, state: RequestState, max_side: int = 256) -> Image.Image:
        """The current x0 estimate, decoded from a pooled latent so its cost stays small."""
        x = state.x0 if state.x0 is not None else state.x
        z = self._unpatchify(state, x)  # (C, 2h, 2w)
        factor = 1
        longest = max(state.request.height, state.request.width)
        while (
            longest // (factor * 2) >= max_side
            and z.shape[1] % (factor * 2) == 0
            and z.shape[2] % (factor * 2) == 0
        ):
            factor *= 2
        if factor > 1:
            z = F.avg_pool2d(z[None], factor)[0]
        image = self._decode(z)
        image.thumbnail((max_side, max_side))
        return image

    @torch.inference_mode()
    def finish(self, state: RequestState) -> FinishedRound:
        """Decode a finished state's image; its KV is freed whether or not the decode succeeds."""
        if not state.done:
            raise RuntimeError("finish() called before the last denoising step")
        t0 = time.perf_counter()
        try:
            image = self._decode(self._unpatchify(state, state.x))
        finally:
            self.release(state)
        state.timings["decode_s"] = time.perf_counter() - t0
        return FinishedRound(state.request, image, state.generator, dict(state.timings))

    def release(self, state: RequestState) -> None:
        """Free a state's KV (idempotent); used by finish and to cancel."""
        if not state.released:
            state.weights.pool.free(*state.alloc)
            state.released = True

    @torch.inference_mode()
    def judge(self, items: list[tuple[Image.Image, str]]) -> list[float]:
        """p(yes) that each image shows its prompt (`engine.judge`), all items in one forward."""
        return judge_scores(
            self.weights_for("judge"), self.cfg, self.tokenizer, self.limits, self._attention, items
        )

    # Run-to-completion conveniences on top of the step API (engine/pipelines.py).
    run = pipelines.run
    run_batch = pipelines.run_batch
    refine = pipelines.refine
    generate = pipelines.generate
    edit = pipelines.edit

    # ------------------------------------------------------------------ preparation

    def _contexts(self, req: GenerationRequest):
        vit_tokens, vae_tokens = context_token_counts(req.image.size, self.cfg) if req.image else (0, 0)
        return task_contexts(req, self.tokenizer, vit_tokens, vae_tokens)

    def _new_state(self, req: GenerationRequest) -> _Prefill:
        ws = self.weights_for(req.task)
        image = context_image(req.image, self.cfg) if req.image is not None else None
        plan = plan_contexts(self._contexts(req))
        start = ws.pool.allocate(plan.total_slots)
        contexts = {
            name: ContextRange(start + c.offset, c.length, c.rope) for name, c in plan.contexts.items()
        }
        for seq in plan.sequences:
            seq.cache_offset += start
            for node in seq.nodes:
                node.offset += start
        generator = req.generator or torch.Generator(device="cpu").manual_seed(req.seed)
        d = self.cfg.latent_downsample
        h, w = req.height // d, req.width // d
        # Edit draws its VAE posterior sample first (in `_prefill`); noise comes after it, so defer for edit.
        x = None if req.task == "edit" else torch.randn(h * w, self.cfg.latent_channels, generator=generator)
        timesteps, dts = schedule(req.params.steps, req.params.shift)
        state = RequestState(
            request=req,
            weights=ws,
            generator=generator,
            grid=(h, w),
            alloc=(start, plan.total_slots),
            contexts=contexts,
            x=x.to(self.device) if x is not None else torch.empty(0),
            latent_ids=latent_position_ids(h, w, self.cfg.max_latent_size).to(self.device),
            timesteps=timesteps,
            dts=dts,
        )
        return _Prefill(state, image, plan.sequences)

    def _prefill(self, ws: WeightSet, parts: list[_Prefill]) -> None:
        """Every context of every request of one weight set as one packed forward writing the KV pool."""
        vit = iter(vit_embeddings(ws.model, self.cfg, [p.image for p in parts if p.image is not None]))
        markers = ws.model.embed_tokens(self._marker_ids)  # (2, hidden)
        packer = RowPacker()
        for part in parts:
            state = part.state
            vit_embeds = {"input": next(vit)} if part.image is not None else {}
            vae_tokens = {}
            if state.request.task == "edit":
                vae_tokens["input"] = encode_vae(self.vae, self.cfg, part.image, state.generator)
                h, w = state.grid
                noise = torch.randn(h * w, self.cfg.latent_channels, generator=state.generator)
                state.x = noise.to(self.device)
            for seq in part.sequences:
                segments = pack_nodes(
                    ws.model, packer, seq.nodes, markers, vit_embeds, vae_tokens, write=True
                )
                packer.sequences.append(SequenceSpec(tuple(segments), seq.cache_offset, seq.cache_len))
        if not packer.sequences:
            return  # e.g. only empty contexts
        embeds, batch = packer.build(self.device)
        ws.model.llm(embeds, batch, ws.pool.layers(), self._attention)

    # ------------------------------------------------------------------ decoding

    def _unpatchify(self, state: RequestState, x: torch.Tensor) -> torch.Tensor:
        h, w = state.grid
        return unpatchify_latent(x, h, w, self.cfg.latent_patch_size, self.cfg.vae.z_channels)

    def _decode(self, z: torch.Tensor) -> Image.Image:
        # z: (C, H/8, W/8) -> PIL image
        vae_dtype = next(self.vae.parameters()).dtype
        out = self.vae.decode(z[None].to(self.device, vae_dtype))[0]
        return tensor_to_pil(out.float().cpu())
