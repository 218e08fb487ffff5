"""The alignment judge: p(yes) that an image shows a prompt, for many (image, prompt) items in one forward.

Each item is a sequence [ViT(image)][question] plus one `<|im_start|>` row whose next-token logits give
the answer; the score is softmax over the logsumexp of the "yes" and "no" token ids. Nothing is cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from engine.contexts import Node
from engine.model.packing import RowPacker
from engine.prefill import pack_nodes, vit_embeddings
from engine.requests import context_image, judge_context, validate_judge_item
from kernels import Segment as AttentionSegment
from kernels import SequenceSpec

if TYPE_CHECKING:
    from engine.config import BagelConfig
    from engine.core import WeightSet
    from engine.model.llm import AttentionFn
    from engine.requests import RequestLimits
    from engine.tokenizer import Tokenizer


def judge_scores(
    weights: WeightSet,
    cfg: BagelConfig,
    tokenizer: Tokenizer,
    limits: RequestLimits,
    attention: AttentionFn,
    items: list[tuple[Image.Image, str]],
) -> list[float]:
    """p(yes) per item. Every item is validated first, so one bad item raises before any work is done."""
    if not items:
        return []
    for image, prompt in items:
        validate_judge_item(image, prompt, tokenizer, limits)
    model = weights.model
    device = model.llm.embed_tokens.weight.device
    markers = model.embed_tokens(
        torch.tensor([tokenizer.vision_start_id, tokenizer.vision_end_id], device=device)
    )
    images = [context_image(image, cfg) for image, _ in items]
    vit = vit_embeddings(model, cfg, images)
    packer = RowPacker()
    bos = model.embed_tokens(torch.tensor([tokenizer.bos_id], device=device))  # (1, hidden)
    for (_, prompt), ci, vit_embeds in zip(items, images, vit, strict=True):
        nodes, rope = [], 0
        for seg in judge_context(tokenizer, prompt, ci.vit_grid[0] * ci.vit_grid[1]):
            nodes.append(Node(seg, rope))
            rope += seg.rope_advance
        segments = pack_nodes(model, packer, nodes, markers, {"input": vit_embeds}, {})
        # The answer's first token is predicted at one more <|im_start|> row (not cached).
        packer.add(bos, rope, gen=False)
        packer.sequences.append(SequenceSpec((*segments, AttentionSegment(1, causal=True))))
    embeds, batch = packer.build(device)
    no_cache = torch.empty(
        0, cfg.llm.num_key_value_heads, cfg.llm.head_dim, dtype=embeds.dtype, device=device
    )
    h_und, _ = model.llm(embeds, batch, [(no_cache, no_cache)] * cfg.llm.num_hidden_layers, attention)
    # Every row is und here, so h_und is in sequence order; pick each sequence's last row.
    ends = batch.layout.cu_seqlens_q[1:].long() - 1
    logits = model.logits(h_und[ends])  # (B, vocab)
    yes, no = tokenizer.answer_token_ids()
    pair = torch.stack([logits[:, yes].logsumexp(-1), logits[:, no].logsumexp(-1)], dim=-1)  # (B, 2)
    return pair.softmax(-1)[:, 0].tolist()
