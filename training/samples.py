"""From records to training samples (docs/training.md §2), and the data mixture (docs/training.md §4).

- rvr: [system prompt, causal][ViT of the misaligned image, full][templated prompt, causal]
       [noised aligned latents, noise, MSE]. No VAE tokens of the misaligned image, no CFG dropout
       (both dropouts are options, default 0 as in the release).
- t2i: [prompt, causal][noised latents, noise, MSE]; the prompt split is dropped with `text_dropout`
       (0.1) so the model learns the unconditional branch used by CFG.
- und: [ViT of the image, full][question, causal][answer, causal, CE].
- edit: [clean VAE latents of the source, full][ViT of the source, full][instruction, causal]
       [noised latents of the edited image, noise, MSE]: BAGEL's editing, the refinement-via-editing
       baseline (editing.py). The instruction is dropped with `edit_text_dropout` and both source images
       with `edit_image_dropout`, so the model learns the cfg_text and cfg_img branches of edit.

Images are preprocessed exactly as the engine does at inference (`context_image`: VAE rule, then ViT
rule), so the trained weights see the same inputs at serving time. Target latents are the VAE posterior
means (deterministic), cached per image path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import BagelConfig
from engine.model.vae import AutoEncoder
from engine.preprocess import (
    latent_position_ids,
    patchify_latent,
    patchify_vit,
    pil_img2rgb,
    resize_image,
    to_tensor,
)
from engine.prompts import REFINE_PROMPT, REFINE_SYSTEM_PROMPT
from engine.requests import context_image
from engine.tokenizer import Tokenizer
from training.dataset import first_prompt, open_rgb, parse_image_list, resolve
from training.packing import Sample, VaeSplit, VitSplit, sample_rows, text_split
from training.world import color_cast, random_cast


class ImageEncoder:
    """ViT patches and target latents of images, with the engine's preprocessing; latents are cached."""

    def __init__(self, cfg: BagelConfig, vae: AutoEncoder, cache: bool = True) -> None:
        self.cfg = cfg
        self.vae = vae
        self._cache: dict[str, VaeSplit] | None = {} if cache else None

    def vit(self, img: Image.Image) -> VitSplit:
        ci = context_image(img, self.cfg)
        patches, ids, _ = patchify_vit(
            to_tensor(ci.vit_image), self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side
        )
        return VitSplit(patches, ids)

    @torch.no_grad()
    def latents(self, img: Image.Image, key: str | None = None) -> VaeSplit:
        if key is not None and self._cache is not None and key in self._cache:
            return self._cache[key]
        split = self._encode(img, None)
        if key is not None and self._cache is not None:
            self._cache[key] = split
        return split

    @torch.no_grad()
    def context_latents(self, img: Image.Image, seed: int) -> VaeSplit:
        """Clean latents of a context image, a posterior sample as the engine's edit draws (not cached)."""
        return self._encode(img, torch.Generator().manual_seed(seed))

    def _encode(self, img: Image.Image, generator: torch.Generator | None) -> VaeSplit:
        x = to_tensor(resize_image(pil_img2rgb(img), self.cfg.vae_transform))[None]  # (1, 3, H, W)
        p, d = self.cfg.latent_patch_size, self.cfg.vae.downsample
        w = next(self.vae.parameters())
        noise = None
        if generator is not None:
            noise = torch.randn(
                1, self.cfg.vae.z_channels, x.shape[2] // d, x.shape[3] // d, generator=generator
            )
        z = self.vae.encode(x.to(w.device, w.dtype), noise).float().cpu()[0]  # (z_channels, H/8, W/8)
        return VaeSplit(
            patchify_latent(z, p),
            latent_position_ids(z.shape[1] // p, z.shape[2] // p, self.cfg.max_latent_size),
            clean=generator is not None,
        )


def refine_sample(
    tok: Tokenizer,
    misaligned_vit: VitSplit,
    aligned: VaeSplit,
    prompt: str,
    system_prompt: str = REFINE_SYSTEM_PROMPT,
    drop_prompt: bool = False,
    drop_image: bool = False,
) -> Sample:
    splits = [text_split(tok, system_prompt)]
    if not drop_image:
        splits.append(misaligned_vit)
    if not drop_prompt:
        splits.append(text_split(tok, REFINE_PROMPT.format(user_prompt=prompt)))
    splits.append(aligned)
    return Sample(splits, "rvr")


def t2i_sample(tok: Tokenizer, target: VaeSplit, prompt: str, drop_text: bool = False) -> Sample:
    # With the text dropped the sample is the bare noised image: the empty cfg_text context of T2I.
    splits = [] if drop_text else [text_split(tok, prompt)]
    return Sample([*splits, target], "t2i")


def und_sample(tok: Tokenizer, image_vit: VitSplit, question: str, answer: str) -> Sample:
    return Sample([image_vit, text_split(tok, question), text_split(tok, answer, loss=True)], "und")


def edit_sample(
    tok: Tokenizer,
    source_latents: VaeSplit,
    source_vit: VitSplit,
    instruction: str,
    target: VaeSplit,
    drop_text: bool = False,
    drop_image: bool = False,
) -> Sample:
    # cfg_text context = [VAE, ViT] (no instruction); cfg_img context = [instruction] (no source images)
    splits: list = [] if drop_image else [source_latents, source_vit]
    if not drop_text:
        splits.append(text_split(tok, instruction))
    return Sample([*splits, target], "edit")


def _cast_key(path: str, gains: np.ndarray) -> str:
    """Latent cache key of an image under a cast (the casts are a small fixed set: world.casts)."""
    return f"{path}|cast=" + ",".join(f"{g:.4f}" for g in gains)


@dataclass
class MixtureConfig:
    """Group weights (rvr:und:t2i = 2:1:1 in the release) and dropout probabilities."""

    weights: dict[str, float]
    text_dropout: float = 0.1  # t2i prompt
    refine_prompt_dropout: float = 0.0  # the release has none on rvr samples
    refine_image_dropout: float = 0.0
    system_prompt: str = REFINE_SYSTEM_PROMPT
    # > 0: both images of a refine pair get one random colour cast of this strength (world.random_cast),
    # like two samples of one generator sharing its white balance; only the input image tells the cast
    refine_pair_cast: float = 0.0
    # > 0: every text-to-image and understanding image gets its own random cast of this strength
    image_cast: float = 0.0
    edit_text_dropout: float = 0.1
    edit_image_dropout: float = 0.1


class Mixture:
    """Samples for a step, drawn deterministically from (seed, step): a resumed run sees the same data.

    Like the release's packed dataset, every batch first takes one sample from each group, then draws
    groups by weight until `max_rows` packed rows would be exceeded (at least `min_samples` samples)."""

    def __init__(
        self,
        tok: Tokenizer,
        encoder: ImageEncoder,
        root: str | Path,
        records: dict[str, Sequence[dict]],
        cfg: MixtureConfig,
    ) -> None:
        self.tok, self.enc, self.root, self.cfg = tok, encoder, Path(root), cfg
        self.records = {k: list(v) for k, v in records.items() if v and cfg.weights.get(k, 0) > 0}
        if not self.records:
            raise ValueError("no training records for any weighted group")

    def _image(self, path: str) -> Image.Image:
        return open_rgb(resolve(self.root, path))

    def _cast_image(self, path: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
        """(image, latent cache key): under its own random cast when `image_cast` > 0 (cached per cast)."""
        img = self._image(path)
        if self.cfg.image_cast > 0:
            gains = random_cast(rng, self.cfg.image_cast)
            return color_cast(img, gains), _cast_key(path, gains)
        return img, path

    def _pair(self, rec: dict, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, str]:
        """(first image, second image, latent cache key of the second) of a two-image record; both share
        one random cast when `refine_pair_cast` > 0, like two samples of one generator."""
        a, b = parse_image_list(rec["image_list"])
        a_img, b_img, b_key = self._image(a), self._image(b), b
        if self.cfg.refine_pair_cast > 0:
            gains = random_cast(rng, self.cfg.refine_pair_cast)
            a_img, b_img = color_cast(a_img, gains), color_cast(b_img, gains)
            b_key = _cast_key(b, gains)
        return a_img, b_img, b_key

    def make(self, kind: str, rec: dict, rng: np.random.Generator) -> Sample:
        if kind == "rvr":
            mis_img, ali_img, ali_key = self._pair(rec, rng)
            return refine_sample(
                self.tok,
                self.enc.vit(mis_img),
                self.enc.latents(ali_img, key=ali_key),
                first_prompt(rec["user_prompt"]),
                self.cfg.system_prompt,
                drop_prompt=rng.random() < self.cfg.refine_prompt_dropout,
                drop_image=rng.random() < self.cfg.refine_image_dropout,
            )
        if kind == "t2i":
            img, key = self._cast_image(parse_image_list(rec["image_list"])[0], rng)
            return t2i_sample(
                self.tok,
                self.enc.latents(img, key=key),
                first_prompt(rec["user_prompt"]),
                drop_text=rng.random() < self.cfg.text_dropout,
            )
        if kind == "und":
            img, _ = self._cast_image(rec["image"], rng)
            return und_sample(self.tok, self.enc.vit(img), rec["question"], rec["answer"])
        if kind == "edit":
            src_img, tgt_img, tgt_key = self._pair(rec, rng)
            return edit_sample(
                self.tok,
                self.enc.context_latents(src_img, seed=int(rng.integers(2**31))),
                self.enc.vit(src_img),
                rec["instruction"],
                self.enc.latents(tgt_img, key=tgt_key),
                drop_text=rng.random() < self.cfg.edit_text_dropout,
                drop_image=rng.random() < self.cfg.edit_image_dropout,
            )
        raise ValueError(f"unknown sample kind {kind!r}")

    def batch(
        self, seed: int, step: int, max_rows: int, min_samples: int = 1, shard: int | None = None
    ) -> list[Sample]:
        """The samples of `step`; data-parallel ranks pass their rank as `shard` to draw different ones."""
        rng = np.random.default_rng([seed, step] if shard is None else [seed, step, shard])
        kinds = list(self.records)
        w = np.array([self.cfg.weights[k] for k in kinds], dtype=np.float64)
        order = list(kinds)  # one of each group first
        out: list[Sample] = []
        rows = 0
        while True:
            kind = order.pop(0) if order else kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
            recs = self.records[kind]
            s = self.make(kind, recs[int(rng.integers(len(recs)))], rng)
            n = sample_rows(s)
            if out and len(out) >= min_samples and rows + n > max_rows:
                return out
            out.append(s)
            rows += n
