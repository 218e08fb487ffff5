"""The engine's step-level interface: prepare (prefill), step (one packed denoising step), finish (decode).

Any mix of requests (task, size, steps, CFG settings, context lengths) advances together: one step runs
every active CFG branch of every request as one packed forward, each branch a sequence that attends to
its own cached context range in the KV pool plus its own query block. Branches outside a request's CFG
window are not computed. Each request draws its noise from its own CPU generator, so its image does not
depend on what else is in the batch.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image

from engine.attention import select_attention
from engine.config import BagelConfig
from engine.contexts import ContextRange, ImageSegment, Node, PrefillSequence, TextSegment, plan_contexts
from engine.errors import InvalidRequestError
from engine.kvcache import KVPool
from engine.model.bagel import Bagel
from engine.model.packing import CacheWrite, ForwardBatch, Routing
from engine.model.vae import AutoEncoder
from engine.preprocess import (
    latent_position_ids,
    patchify_latent,
    patchify_vit,
    tensor_to_pil,
    to_tensor,
    unpatchify_latent,
)
from engine.requests import (
    ContextImage,
    RequestLimits,
    context_image,
    context_token_counts,
    judge_context,
    task_contexts,
    validate_request,
)
from engine.sampler import combine, guidance_at, schedule, x0_estimate
from engine.tokenizer import Tokenizer
from engine.types import GenerationRequest, RoundOutput, SamplingParams, StepEvent
from kernels import Segment as AttnSegment
from kernels import SequenceSpec, build_layout

BRANCHES = ("gen", "cfg_text", "cfg_img")
StepCallback = Callable[[StepEvent, Callable[..., Image.Image]], None]
BranchStepFn = Callable[["RequestState", str], torch.Tensor]


def _params(task: str, overrides: dict) -> SamplingParams:
    try:
        return SamplingParams.for_task(task, **overrides)
    except TypeError as exc:
        raise InvalidRequestError(f"unknown sampling parameter: {exc}") from None


@dataclass(frozen=True)
class StepStats:
    """What one `step` packed: CFG-branch sequences and query rows, over all weight sets."""

    sequences: int
    rows: int


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
class _Rows:
    """Rows of one packed forward being assembled."""

    embeds: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    runs: list[tuple[bool, int]] = field(default_factory=list)
    seqs: list[SequenceSpec] = field(default_factory=list)
    writes: list[CacheWrite] = field(default_factory=list)
    count: int = 0

    def add(self, emb: torch.Tensor, rope: torch.Tensor | int, gen: bool) -> None:
        n = emb.shape[0]
        self.embeds.append(emb)
        if isinstance(rope, int):
            rope = torch.full((n,), rope, dtype=torch.long)
        self.positions.append(rope)
        self.runs.append((gen, n))
        self.count += n

    def batch(self, device: torch.device) -> tuple[torch.Tensor, ForwardBatch]:
        embeds = torch.cat(self.embeds)
        positions = torch.cat(self.positions).to(device)
        layout = build_layout(self.seqs, device)
        return embeds, ForwardBatch(positions, Routing.from_runs(self.runs), layout, self.writes)


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
        info: dict | None = None,
    ) -> None:
        if not weights:
            raise ValueError("an engine needs at least one weight set")
        self.cfg, self.tokenizer, self.vae = cfg, tokenizer, vae
        self.device, self.dtype = device, dtype
        self.limits = limits or RequestLimits()
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
        self._markers = torch.tensor([tokenizer.vision_start_id, tokenizer.vision_end_id], device=device)
        self._empty_kv = torch.empty(0, llm.num_key_value_heads, llm.head_dim, dtype=dtype, device=device)
        # Per weight set, an optional `fn(state, branch) -> (N, C) velocity` that replaces the packed denoise
        # forward (compiled one-branch modules, e.g. TensorRT engines); prefill always stays packed.
        self.branch_steps: dict[str, BranchStepFn] = {}
        self.last_step = StepStats(0, 0)

    # ------------------------------------------------------------------ public API

    @property
    def device_name(self) -> str:
        return str(self.device)

    def info(self) -> dict:
        return {
            **self._info,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": sorted(self.weight_sets),
            "max_image_side": self.cfg.max_image_side,
            "size_multiple": self.cfg.latent_downsample,
        }

    def weights_for(self, task: str) -> WeightSet:
        """Refine uses RvR weights; generate, edit and judge use BAGEL's (each falls back to the other)."""
        prefer = ("rvr", "ema") if task == "refine" else ("ema", "rvr")
        return next(self.weight_sets[n] for n in prefer if n in self.weight_sets)

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        return validate_request(req, self.cfg, self.tokenizer, self.limits)

    def kv_tokens(self, req: GenerationRequest) -> int:
        """KV slots plus query rows of all branches a (validated) request holds while it runs."""
        plan = plan_contexts(self._contexts(req))  # sizes only: no pixel work at admission
        h, w = req.height // self.cfg.latent_downsample, req.width // self.cfg.latent_downsample
        return plan.total_slots + len(BRANCHES) * (h * w + 2)

    @torch.inference_mode()
    def prepare(self, requests: list[GenerationRequest]) -> list[RequestState]:
        """Validate, allocate KV and prefill every context of every request (one forward per weight set)."""
        t0 = time.perf_counter()
        reqs = [self.validate(r) for r in requests]
        states: list[RequestState] = []
        groups: dict[str, list[tuple[RequestState, ContextImage | None, list[PrefillSequence]]]] = {}
        try:
            for req in reqs:
                state, image, sequences = self._new_state(req)
                states.append(state)
                groups.setdefault(state.weights.name, []).append((state, image, sequences))
            for name, members in groups.items():
                self._prefill(self.weight_sets[name], members)
        except BaseException:
            for state in states:
                self.release(state)
            raise
        elapsed = time.perf_counter() - t0
        for state in states:
            state.timings["prefill_s"] = elapsed
        return states

    @torch.inference_mode()
    def step(self, states: list[RequestState]) -> list[StepEvent]:
        """Advance every unfinished state by one denoising step (one packed forward per weight set).

        `last_step` then holds how many sequences (CFG branches) and query rows the step computed.
        """
        active = [s for s in states if not s.done and not s.released]
        groups: dict[str, list[RequestState]] = {}
        for s in active:
            groups.setdefault(s.weights.name, []).append(s)
        self.last_step = StepStats(0, 0)
        for name, members in groups.items():
            self._denoise_step(self.weight_sets[name], members)
        return [
            StepEvent(s.request.request_id, s.request.round_index, s.request.rounds, s.step, s.total_steps)
            for s in active
        ]

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
    def finish(self, state: RequestState) -> RoundOutput:
        """Decode the finished round, free its KV, and judge it when `until_score` was asked."""
        if not state.done:
            raise RuntimeError("finish() called before the last denoising step")
        t0 = time.perf_counter()
        image = self._decode(self._unpatchify(state, state.x))
        state.timings["decode_s"] = time.perf_counter() - t0
        self.release(state)
        req = state.request
        score = None
        if req.until_score is not None:
            score = self.judge([(image, req.prompt)])[0]
        done = req.round_index >= req.rounds or (score is not None and score >= req.until_score)
        next_request = None
        if not done:
            next_request = replace(
                req, image=image, round_index=req.round_index + 1, generator=state.generator
            )
        return RoundOutput(
            req.request_id, image, req.round_index, req.seed, score, done, next_request, dict(state.timings)
        )

    def release(self, state: RequestState) -> None:
        """Free a state's KV (idempotent); used by finish and to cancel."""
        if not state.released:
            state.weights.pool.free(*state.alloc)
            state.released = True

    @torch.inference_mode()
    def judge(self, items: list[tuple[Image.Image, str]]) -> list[float]:
        """p(yes) that each image shows its prompt, from the first answer token's yes/no logits (one forward)."""
        if not items:
            return []
        ws = self.weights_for("judge")
        rows = _Rows()
        images = []
        for img, prompt in items:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidRequestError("judge prompt must be a non-empty string")
            if not isinstance(img, Image.Image) or min(img.size) < 1:
                raise InvalidRequestError("judge needs a non-empty PIL image")
            n_tokens = len(self.tokenizer.encode(prompt))
            if n_tokens > self.limits.max_prompt_tokens:
                raise InvalidRequestError(
                    f"prompt is {n_tokens} tokens; the limit is {self.limits.max_prompt_tokens}"
                )
            ci = context_image(img, self.cfg)
            images.append(ci)
        vit = self._vit_embeddings(ws.model, images)
        for i, ((_, prompt), ci) in enumerate(zip(items, images, strict=True)):
            segments = judge_context(self.tokenizer, prompt, ci.vit_grid[0] * ci.vit_grid[1])
            nodes, rope = [], 0
            for seg in segments:
                nodes.append(Node(seg, rope))
                rope += seg.rope_advance
            specs = self._add_nodes(ws.model, rows, nodes, {"input": vit[i]}, {})
            # The answer's first token is predicted at one more <|im_start|> row (not cached).
            rows.add(
                ws.model.embed_tokens(torch.tensor([self.tokenizer.bos_id], device=self.device)), rope, False
            )
            rows.seqs.append(SequenceSpec((*specs, AttnSegment(1, True))))
        embeds, batch = rows.batch(self.device)
        h_und, _ = ws.model.llm(
            embeds,
            batch,
            [(self._empty_kv, self._empty_kv)] * self.cfg.llm.num_hidden_layers,
            self._attention,
        )
        # Every row is und here, so h_und is in sequence order; pick each sequence's last row.
        ends = batch.layout.cu_seqlens_q[1:].long() - 1
        logits = ws.model.logits(h_und[ends])  # (B, vocab)
        yes, no = self.tokenizer.answer_token_ids()
        pair = torch.stack([logits[:, yes].logsumexp(-1), logits[:, no].logsumexp(-1)], dim=-1)
        return pair.softmax(-1)[:, 0].tolist()

    # ------------------------------------------------------------------ single-request API

    def run(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[RoundOutput]:
        """Run one request through every round with the batch API; returns one output per round.

        `on_step(event, preview)` is called after every denoising step; `preview(max_side=256)` decodes the
        current x0 estimate on demand (it costs a VAE decode, so call it only when a preview is wanted).
        """
        outputs: list[RoundOutput] = []
        req: GenerationRequest | None = request
        while req is not None:
            [state] = self.prepare([req])
            try:
                while not state.done:
                    [event] = self.step([state])
                    if on_step is not None:
                        on_step(event, functools.partial(self.preview, state))
            except BaseException:
                self.release(state)
                raise
            outputs.append(self.finish(state))
            req = outputs[-1].next_request
        return outputs

    def run_batch(self, requests: list[GenerationRequest], batch_size: int = 32) -> list[list[RoundOutput]]:
        """Run many requests in lockstep batches of at most `batch_size`; one list of rounds per request.

        Offline work (dataset construction, evaluation) gets the packed step's throughput; each request's
        images are the ones `run` gives it alone, since noise comes from the request's own generator.
        """
        outputs: list[list[RoundOutput]] = [[] for _ in requests]
        pending = list(enumerate(requests))
        while pending:
            chunk, pending = pending[:batch_size], pending[batch_size:]
            states = self.prepare([req for _, req in chunk])
            try:
                while not all(s.done for s in states):
                    self.step(states)
            except BaseException:
                for state in states:
                    self.release(state)
                raise
            for (i, _), state in zip(chunk, states, strict=True):
                out = self.finish(state)
                outputs[i].append(out)
                if out.next_request is not None:
                    pending.append((i, out.next_request))
        return outputs

    def refine(
        self,
        image: Image.Image,
        prompt: str,
        *,
        rounds: int = 1,
        until_score: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        on_step: StepCallback | None = None,
        **params,
    ) -> RoundOutput:
        """RvR: regenerate `image` to match `prompt` (released defaults; `params` override SamplingParams).

        With `rounds > 1` each output is fed back as the next input; `until_score` stops early once the
        judge's p(yes) reaches it. Returns the last round's output (`run` returns every round).
        """
        req = GenerationRequest(
            "refine", prompt, image, _params("refine", params), seed, height, width, rounds, until_score
        )
        return self.run(req, on_step)[-1]

    def generate(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        *,
        seed: int | None = None,
        on_step: StepCallback | None = None,
        **params,
    ) -> RoundOutput:
        """BAGEL text-to-image with its notebook defaults (cfg_text 4, interval [0.4, 1], global renorm)."""
        req = GenerationRequest("generate", prompt, None, _params("generate", params), seed, height, width)
        return self.run(req, on_step)[-1]

    def edit(
        self,
        image: Image.Image,
        instruction: str,
        *,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        on_step: StepCallback | None = None,
        **params,
    ) -> RoundOutput:
        """BAGEL editing (VAE + ViT blocks of the input): the refinement-via-editing baseline."""
        req = GenerationRequest("edit", instruction, image, _params("edit", params), seed, height, width)
        return self.run(req, on_step)[-1]

    # ------------------------------------------------------------------ preparation

    def _context_image(self, req: GenerationRequest) -> ContextImage | None:
        return context_image(req.image, self.cfg) if req.image is not None else None

    def _contexts(self, req: GenerationRequest):
        vit_tokens, vae_tokens = context_token_counts(req.image.size, self.cfg) if req.image else (0, 0)
        return task_contexts(req, self.tokenizer, vit_tokens, vae_tokens)

    def _new_state(
        self, req: GenerationRequest
    ) -> tuple[RequestState, ContextImage | None, list[PrefillSequence]]:
        ws = self.weights_for(req.task)
        image = self._context_image(req)
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
        return state, image, plan.sequences

    def _prefill(self, ws: WeightSet, members) -> None:
        images = [img for _, img, _ in members if img is not None]
        vit = iter(self._vit_embeddings(ws.model, images)) if images else iter(())
        rows = _Rows()
        for state, image, sequences in members:
            vit_embeds = {"input": next(vit)} if image is not None else {}
            vae_tokens = {}
            if state.request.task == "edit":
                vae_tokens["input"] = self._encode_vae(image, state.generator)
                h, w = state.grid
                state.x = torch.randn(h * w, self.cfg.latent_channels, generator=state.generator).to(
                    self.device
                )
            for seq in sequences:
                specs = self._add_nodes(ws.model, rows, seq.nodes, vit_embeds, vae_tokens, write=True)
                rows.seqs.append(SequenceSpec(tuple(specs), seq.cache_offset, seq.cache_len))
        if not rows.seqs:
            return  # e.g. only empty contexts
        embeds, batch = rows.batch(self.device)
        ws.model.llm(embeds, batch, ws.pool.layers(), self._attention)

    def _add_nodes(
        self, model: Bagel, rows: _Rows, nodes: list[Node], vit_embeds, vae_tokens, write: bool = False
    ):
        """Append the rows of `nodes` (one sequence, path order); returns the kernel segments."""
        specs = []
        for node in nodes:
            seg, row0 = node.segment, rows.count
            if isinstance(seg, TextSegment):
                ids = torch.tensor(seg.ids, device=self.device)
                pos = torch.arange(node.rope_start, node.rope_start + len(seg.ids))
                rows.add(model.embed_tokens(ids), pos, gen=False)
                specs.append(AttnSegment(len(seg.ids), True))
            else:
                self._add_image_block(model, rows, seg, node.rope_start, vit_embeds, vae_tokens)
                specs.append(AttnSegment(seg.kv_len, False))
            if write:
                rows.writes.append(CacheWrite(row0, seg.kv_len, node.offset))
        return specs

    def _add_image_block(
        self, model: Bagel, rows: _Rows, seg: ImageSegment, rope: int, vit_embeds, vae_tokens
    ):
        markers = model.embed_tokens(self._markers)  # (2, hidden)
        rows.add(markers[:1], rope, gen=False)
        if seg.kind == "vit":
            rows.add(vit_embeds[seg.key], rope, gen=False)
        else:
            tokens, ids = vae_tokens[seg.key]
            t = torch.zeros(tokens.shape[0], device=self.device)  # clean context latents: t = 0
            rows.add(model.embed_latents(tokens, t, ids), rope, gen=True)
        rows.add(markers[1:], rope, gen=False)

    def _vit_embeddings(self, model: Bagel, images: list[ContextImage]) -> list[torch.Tensor]:
        """One packed ViT forward over all images -> per image (N_i, hidden)."""
        patches, ids, cu = [], [], [0]
        p, side = self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side
        for ci in images:
            pp, pid, _ = patchify_vit(to_tensor(ci.vit_image), p, side)
            patches.append(pp)
            ids.append(pid)
            cu.append(cu[-1] + pp.shape[0])
        dtype = model.connector.fc1.weight.dtype
        out = model.embed_vit(torch.cat(patches).to(self.device, dtype), torch.cat(ids).to(self.device), cu)
        return list(out.split([b - a for a, b in itertools.pairwise(cu)]))

    def _encode_vae(self, image: ContextImage, generator: torch.Generator):
        """Sampled VAE encode of the context image; the posterior noise comes from the request's generator."""
        x = to_tensor(image.vae_image)[None].to(self.device, self._vae_dtype)  # (1, 3, H, W)
        z_c, d = self.cfg.vae.z_channels, self.cfg.vae.downsample
        noise = torch.randn(1, z_c, x.shape[2] // d, x.shape[3] // d, generator=generator)
        z = self.vae.encode(x, noise.to(self.device, self._vae_dtype))[0].float()  # (z, H/8, W/8)
        tokens = patchify_latent(z, self.cfg.latent_patch_size)  # (h*w, C)
        p = self.cfg.latent_patch_size
        ids = latent_position_ids(z.shape[1] // p, z.shape[2] // p, self.cfg.max_latent_size).to(self.device)
        return tokens, ids

    # ------------------------------------------------------------------ denoising

    def _denoise_step(self, ws: WeightSet, states: list[RequestState]) -> None:
        plans = []
        for s in states:
            t = s.timesteps[s.step]
            g = guidance_at(s.request.params, t)
            branches = (
                ["gen"]
                + (["cfg_text"] if g.use_text_branch else [])
                + (["cfg_img"] if g.use_img_branch else [])
            )
            plans.append((s, t, g, branches))
            self.last_step = StepStats(
                self.last_step.sequences + len(branches),
                self.last_step.rows + len(branches) * (s.x.shape[0] + 2),
            )
        t0 = time.perf_counter()
        branch_step = self.branch_steps.get(ws.name)
        if branch_step is None:
            velocities = self._packed_velocities(ws, plans)
        else:
            velocities = [[branch_step(s, b) for b in branches] for s, _, _, branches in plans]
        for (s, t, g, _), vs in zip(plans, velocities, strict=True):
            v_text = vs[1] if g.use_text_branch else None
            v_img = vs[2] if g.use_img_branch else None
            v = combine(vs[0], v_text, v_img, g, s.request.params.renorm, s.request.params.renorm_min)
            s.x0 = x0_estimate(s.x, v, t)
            s.x = s.x - v * s.dts[s.step]
            s.step += 1
        elapsed = time.perf_counter() - t0
        for s, *_ in plans:
            s.timings["denoise_s"] = s.timings.get("denoise_s", 0.0) + elapsed

    def _packed_velocities(self, ws: WeightSet, plans) -> list[list[torch.Tensor]]:
        """Every branch of every request as one packed forward -> per request, per branch (N, C) velocity."""
        rows = _Rows()
        markers = ws.model.embed_tokens(self._markers)
        for s, t, _, branches in plans:
            n = s.x.shape[0]
            lat = ws.model.embed_latents(s.x, torch.full((n,), t, device=self.device), s.latent_ids)
            for b in branches:
                ctx = s.contexts[b]
                rows.add(markers[:1], ctx.rope, gen=False)
                rows.add(lat, ctx.rope, gen=True)
                rows.add(markers[1:], ctx.rope, gen=False)
                rows.seqs.append(SequenceSpec((AttnSegment(n + 2, False),), ctx.offset, ctx.length))
        embeds, batch = rows.batch(self.device)
        _, h_gen = ws.model.llm(embeds, batch, ws.pool.layers(), self._attention)
        v_all = ws.model.velocity(h_gen)  # (sum of branch latents, C), branch after branch
        out, offset = [], 0
        for s, _, _, branches in plans:
            n = s.x.shape[0]
            out.append([v_all[offset + i * n : offset + (i + 1) * n] for i in range(len(branches))])
            offset += len(branches) * n
        return out

    # ------------------------------------------------------------------ decoding

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _unpatchify(self, state: RequestState, x: torch.Tensor) -> torch.Tensor:
        h, w = state.grid
        return unpatchify_latent(x, h, w, self.cfg.latent_patch_size, self.cfg.vae.z_channels)

    def _decode(self, z: torch.Tensor) -> Image.Image:
        # z: (C, H/8, W/8) -> PIL image
        out = self.vae.decode(z[None].to(self.device, self._vae_dtype))[0]
        return tensor_to_pil(out.float().cpu())
