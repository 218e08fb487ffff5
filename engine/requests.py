"""Request validation and the context segments each task builds (docs/rvr.md §3, §5)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from PIL import Image

from engine.config import BagelConfig
from engine.contexts import ImageSegment, Segment, TextSegment
from engine.errors import InvalidRequestError
from engine.preprocess import pil_img2rgb, resize_dims, resize_image
from engine.prompts import JUDGE_QUESTION, REFINE_PROMPT, REFINE_SYSTEM_PROMPT
from engine.tokenizer import Tokenizer
from engine.types import TASKS, GenerationRequest, SamplingParams, _is_int, _is_number

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int = 1024
    max_rounds: int = 8
    default_generate_size: int | None = None  # None: the VAE rule's largest side (1024 for BAGEL)


@dataclass
class ContextImage:
    """The input image after the VAE rule (its size is the default output size) and the ViT rule."""

    vae_image: Image.Image
    vit_image: Image.Image
    vit_grid: tuple[int, int]  # ViT patch rows, cols


def context_image(img: Image.Image, cfg: BagelConfig) -> ContextImage:
    rgb = pil_img2rgb(img)
    vae_image = resize_image(rgb, cfg.vae_transform)
    vit_image = resize_image(vae_image, cfg.vit_transform)
    p = cfg.vit.patch_size
    grid = (vit_image.height // p, vit_image.width // p)
    if max(grid) > cfg.vit_max_num_patch_per_side:
        raise InvalidRequestError(f"image too large for the ViT position table: {grid} patches")
    return ContextImage(vae_image, vit_image, grid)


def context_token_counts(size: tuple[int, int], cfg: BagelConfig) -> tuple[int, int]:
    """(ViT tokens, VAE latent tokens) of a context image of `size` (w, h), from the resize rules alone."""
    vae_w, vae_h = resize_dims(*size, cfg.vae_transform)
    vit_w, vit_h = resize_dims(vae_w, vae_h, cfg.vit_transform)
    p, d = cfg.vit.patch_size, cfg.latent_downsample
    return (vit_h // p) * (vit_w // p), (vae_h // d) * (vae_w // d)


def validate_request(
    req: GenerationRequest, cfg: BagelConfig, tok: Tokenizer, limits: RequestLimits
) -> GenerationRequest:
    """A normalised copy of `req`: defaults filled, seed chosen, output size resolved. Raises InvalidRequestError."""
    if req.task not in TASKS:
        raise InvalidRequestError(f"task must be one of {TASKS}, got {req.task!r}")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InvalidRequestError("prompt must be a non-empty string")
    _check_prompt_tokens(req.prompt, tok, limits)
    params = req.params or SamplingParams.for_task(req.task)
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("params must be a SamplingParams")
    params.validate()
    if req.task in ("refine", "edit"):
        if not isinstance(req.image, Image.Image):
            raise InvalidRequestError(f"{req.task} needs an input image")
        if min(req.image.size) < 1:
            raise InvalidRequestError("input image is empty")
    elif req.image is not None:
        raise InvalidRequestError("generate takes no input image")
    for name in ("seed", "height", "width"):
        value = getattr(req, name)
        if value is not None and not _is_int(value):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if not _is_int(req.rounds):
        raise InvalidRequestError(f"rounds must be an integer, got {req.rounds!r}")
    if req.until_score is not None and not _is_number(req.until_score):
        raise InvalidRequestError(f"until_score must be a number, got {req.until_score!r}")
    if req.task != "refine" and (req.rounds != 1 or req.until_score is not None):
        raise InvalidRequestError("rounds and until_score apply to refine only")
    if not 1 <= req.rounds <= limits.max_rounds:
        raise InvalidRequestError(f"rounds must be in [1, {limits.max_rounds}], got {req.rounds}")
    if req.until_score is not None and not 0.0 <= req.until_score <= 1.0:
        raise InvalidRequestError(f"until_score must be in [0, 1], got {req.until_score}")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"seed must be in [0, {MAX_SEED}]")
    height, width = _output_size(req, cfg, limits)
    return replace(req, params=params, seed=seed, height=height, width=width)


def _output_size(req: GenerationRequest, cfg: BagelConfig, limits: RequestLimits) -> tuple[int, int]:
    stride, largest = cfg.latent_downsample, cfg.max_image_side
    if req.image is not None:  # the input's VAE-rule size
        default_w, default_h = resize_dims(*req.image.size, cfg.vae_transform)
    else:
        # the VAE rule's largest side: what the model takes as input, 1024 for BAGEL
        default_h = default_w = limits.default_generate_size or min(largest, cfg.vae_transform.max_size)
    h = req.height if req.height is not None else default_h
    w = req.width if req.width is not None else default_w
    for name, value in (("height", h), ("width", w)):
        if not isinstance(value, int) or value % stride or not stride <= value <= largest:
            raise InvalidRequestError(
                f"{name} must be a multiple of {stride} in [{stride}, {largest}], got {value}"
            )
    return h, w


def validate_judge_item(image: object, prompt: object, tok: Tokenizer, limits: RequestLimits) -> None:
    """One judge item: a non-empty PIL image and a non-blank prompt within the token limit."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("judge prompt must be a non-empty string")
    if not isinstance(image, Image.Image) or min(image.size) < 1:
        raise InvalidRequestError("judge needs a non-empty PIL image")
    _check_prompt_tokens(prompt, tok, limits)


def _check_prompt_tokens(prompt: str, tok: Tokenizer, limits: RequestLimits) -> None:
    n_tokens = tok.count_tokens(prompt)
    if n_tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(f"prompt is {n_tokens} tokens; the limit is {limits.max_prompt_tokens}")


def text_segment(tok: Tokenizer, text: str) -> TextSegment:
    return TextSegment((tok.bos_id, *tok.encode(text), tok.eos_id))


def task_contexts(
    req: GenerationRequest, tok: Tokenizer, vit_tokens: int, vae_tokens: int
) -> dict[str, list[Segment]]:
    """The gen / cfg_text / cfg_img contexts of a validated request (gen first: it is laid out first)."""
    if req.task == "refine":
        sys_seg = text_segment(tok, REFINE_SYSTEM_PROMPT)
        vit = ImageSegment("vit", "input", vit_tokens)
        prompt = text_segment(tok, REFINE_PROMPT.format(user_prompt=req.prompt))
        return {"gen": [sys_seg, vit, prompt], "cfg_text": [sys_seg, vit], "cfg_img": [sys_seg, prompt]}
    if req.task == "edit":
        vae = ImageSegment("vae", "input", vae_tokens)
        vit = ImageSegment("vit", "input", vit_tokens)
        instr = text_segment(tok, req.prompt)
        return {"gen": [vae, vit, instr], "cfg_text": [vae, vit], "cfg_img": [instr]}
    prompt = text_segment(tok, req.prompt)
    return {"gen": [prompt], "cfg_text": [], "cfg_img": [prompt]}


def judge_context(tok: Tokenizer, prompt: str, vit_tokens: int) -> list[Segment]:
    """[ViT(image)][question]; the answer's first token is read after one more `<|im_start|>` row."""
    return [ImageSegment("vit", "input", vit_tokens), text_segment(tok, JUDGE_QUESTION.format(prompt=prompt))]
