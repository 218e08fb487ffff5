"""Training samples as splits, and their packing into one sequence with BAGEL's training attention mask.

A sample is a list of splits (docs/training.md §2, docs/model.md §6):

- text   `<|im_start|> ids <|im_end|>`, causal, one RoPE position per token, optional CE on its tokens;
- vit    `<|vision_start|> ViT tokens <|vision_end|>`, full (bidirectional), one RoPE position, then +1;
- vae    `<|vision_start|> noised latents <|vision_end|>`, noise mode, one RoPE position, MSE on the
         velocity of its latent tokens; or, `clean`, the clean latents of a context image (editing): full
         mode at t = 0, one RoPE position, then +1, no loss (as the engine's edit context).

Mask per sample: a causal split is lower-triangular within itself, a full or noise split is bidirectional
within itself, every split sees the earlier splits except noise splits, which no other split may see.
Samples packed together are isolated (block-diagonal). Routing: latent tokens use the gen expert, every
other row (text, ViT tokens and all image markers) the und expert, as at inference.

The flow time and noise of each noised image are drawn at pack time from a caller's generator, so a packed
batch is a fixed, reproducible input (the loss on it is deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.tokenizer import Tokenizer

Mode = Literal["causal", "full", "noise"]


@dataclass
class TextSplit:
    ids: list[int]  # [bos] + tokens + [eos]
    loss: bool = False  # CE: each row predicts the next token of the split (bos predicts the first token)


@dataclass
class VitSplit:
    patches: torch.Tensor  # (N, p*p*3) in [-1, 1]
    position_ids: torch.Tensor  # (N,) row * vit_max_num_patch_per_side + col


@dataclass
class VaeSplit:
    x0: torch.Tensor  # (N, latent_channels) clean scaled latent tokens of the target (or context) image
    position_ids: torch.Tensor  # (N,) row * max_latent_size + col
    clean: bool = False  # a context image: seen at t = 0 by later splits, no loss


Split = TextSplit | VitSplit | VaeSplit


@dataclass
class Sample:
    splits: list[Split]
    kind: str = ""  # "rvr", "t2i", "und": for per-kind logging only


def text_split(tok: Tokenizer, text: str, loss: bool = False) -> TextSplit:
    return TextSplit([tok.bos_id, *tok.encode(text), tok.eos_id], loss)


def shifted_timestep(n: torch.Tensor, shift: float) -> torch.Tensor:
    """t = s·σ / (1 + (s − 1)·σ) with σ = sigmoid(n): BAGEL's training times (shift 4.0 for RvR)."""
    sigma = torch.sigmoid(n)
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class PackedBatch:
    """One packed training sequence of T rows (several samples)."""

    num_rows: int
    positions: torch.Tensor  # (T,) int64 RoPE positions
    is_gen: torch.Tensor  # (T,) bool: latent rows (gen expert)
    mask: torch.Tensor  # (T, T) bool, True = query row may attend to key column
    text_rows: torch.Tensor  # (Nt,) rows holding token embeddings (text and image markers)
    text_ids: torch.Tensor  # (Nt,)
    vit_rows: torch.Tensor  # (Nv,)
    vit_patches: torch.Tensor  # (Nv, p*p*3)
    vit_position_ids: torch.Tensor  # (Nv,)
    vit_cu_seqlens: list[int]  # image boundaries within the ViT rows
    lat_rows: torch.Tensor  # (Nl,) in increasing order: exactly the gen rows
    lat_x0: torch.Tensor  # (Nl, C)
    lat_noise: torch.Tensor  # (Nl, C)
    lat_t: torch.Tensor  # (Nl,) flow time of each token's image
    lat_position_ids: torch.Tensor  # (Nl,)
    lat_loss: torch.Tensor  # (Nl,) bool: noised target tokens (clean context latents take no loss)
    ce_rows: torch.Tensor  # (Nc,) und rows whose logits are scored
    ce_labels: torch.Tensor  # (Nc,)
    kinds: list[str] = field(default_factory=list)

    @property
    def num_latent_tokens(self) -> int:
        return int(self.lat_rows.numel())

    @property
    def num_ce_tokens(self) -> int:
        return int(self.ce_rows.numel())


def pack(
    samples: list[Sample],
    vision_start_id: int,
    vision_end_id: int,
    generator: torch.Generator,
    timestep_shift: float = 4.0,
) -> PackedBatch:
    """Pack samples into one sequence; draws each noised image's t and noise from `generator`."""
    positions: list[int] = []
    is_gen: list[bool] = []
    text_rows, text_ids = [], []
    vit_rows, vit_patches, vit_pos, vit_cu = [], [], [], [0]
    lat_rows, lat_x0, lat_noise, lat_t, lat_pos, lat_loss = [], [], [], [], [], []
    ce_rows, ce_labels = [], []
    # (start, end, mode, sample index) of every split, for the mask
    spans: list[tuple[int, int, Mode, int]] = []

    def add_token(tok_id: int, pos: int) -> None:
        text_rows.append(len(positions))
        text_ids.append(tok_id)
        positions.append(pos)
        is_gen.append(False)

    for si, sample in enumerate(samples):
        rope = 0
        for split in sample.splits:
            start = len(positions)
            if isinstance(split, TextSplit):
                for j, tid in enumerate(split.ids):
                    if split.loss and j + 1 < len(split.ids):
                        ce_rows.append(len(positions))
                        ce_labels.append(split.ids[j + 1])
                    add_token(tid, rope + j)
                rope += len(split.ids)
                mode: Mode = "causal"
            elif isinstance(split, VitSplit):
                n = split.patches.shape[0]
                add_token(vision_start_id, rope)
                vit_rows.extend(range(len(positions), len(positions) + n))
                positions.extend([rope] * n)
                is_gen.extend([False] * n)
                vit_patches.append(split.patches)
                vit_pos.append(split.position_ids)
                vit_cu.append(vit_cu[-1] + n)
                add_token(vision_end_id, rope)
                rope += 1
                mode = "full"
            else:
                n = split.x0.shape[0]
                add_token(vision_start_id, rope)
                lat_rows.extend(range(len(positions), len(positions) + n))
                positions.extend([rope] * n)
                is_gen.extend([True] * n)
                lat_x0.append(split.x0.float())
                lat_pos.append(split.position_ids)
                lat_loss.append(torch.full((n,), not split.clean))
                add_token(vision_end_id, rope)
                if split.clean:
                    lat_noise.append(torch.zeros(split.x0.shape))
                    lat_t.append(torch.zeros(n))  # x_t = x0 at t = 0
                    rope += 1
                    mode = "full"
                else:
                    lat_noise.append(torch.randn(split.x0.shape, generator=generator))
                    t = shifted_timestep(torch.randn((), generator=generator), timestep_shift)
                    lat_t.append(t.expand(n))
                    # a noised image is the generation target: the RoPE counter does not advance past it
                    mode = "noise"
            spans.append((start, len(positions), mode, si))

    t_rows = len(positions)
    mask = torch.zeros(t_rows, t_rows, dtype=torch.bool)
    for start, end, mode, si in spans:
        # earlier splits of the same sample, except noise splits; other samples stay invisible
        for ps, pe, pmode, psi in spans:
            if psi == si and pe <= start and pmode != "noise":
                mask[start:end, ps:pe] = True
        if mode == "causal":
            mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        else:
            mask[start:end, start:end] = True

    def cat(xs: list[torch.Tensor], *shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.cat(xs) if xs else torch.zeros(0, *shape, dtype=dtype)

    long = torch.int64
    return PackedBatch(
        num_rows=t_rows,
        positions=torch.tensor(positions, dtype=long),
        is_gen=torch.tensor(is_gen, dtype=torch.bool),
        mask=mask,
        text_rows=torch.tensor(text_rows, dtype=long),
        text_ids=torch.tensor(text_ids, dtype=long),
        vit_rows=torch.tensor(vit_rows, dtype=long),
        vit_patches=cat(vit_patches, 0),
        vit_position_ids=cat(vit_pos, dtype=long),
        vit_cu_seqlens=vit_cu,
        lat_rows=torch.tensor(lat_rows, dtype=long),
        lat_x0=cat(lat_x0, 0),
        lat_noise=cat(lat_noise, 0),
        lat_t=cat(lat_t),
        lat_position_ids=cat(lat_pos, dtype=long),
        lat_loss=cat(lat_loss, dtype=torch.bool),
        ce_rows=torch.tensor(ce_rows, dtype=long),
        ce_labels=torch.tensor(ce_labels, dtype=long),
        kinds=[s.kind for s in samples],
    )


def sample_rows(sample: Sample) -> int:
    """Rows a sample occupies once packed (for token-budget batching)."""
    n = 0
    for s in sample.splits:
        if isinstance(s, TextSplit):
            n += len(s.ids)
        elif isinstance(s, VitSplit):
            n += s.patches.shape[0] + 2
        else:
            n += s.x0.shape[0] + 2
    return n


def routing_runs(is_gen: torch.Tensor) -> list[tuple[bool, int]]:
    """(is_gen, length) runs of the row experts in sequence order."""
    runs: list[tuple[bool, int]] = []
    for g in is_gen.tolist():
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        else:
            runs.append((g, 1))
    return runs
