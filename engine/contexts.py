"""Context planning: which KV rows a request caches, where they live, and how they are prefilled.

A context is a list of segments (text: `<|im_start|> ids <|im_end|>`, causal, one RoPE position per token;
image block: `<|vision_start|> tokens <|vision_end|>`, bidirectional, one shared RoPE position). The KV of
a segment depends on its content and on everything before it, so contexts form a prefix tree and a shared
prefix is computed and stored once. Attention over a cached context does not depend on the order of its
keys, so the planner lays the tree out in one allocation where every context is a contiguous range:

    RvR:  gen = [SYS][ViT][PROMPT], cfg_text = [SYS][ViT], cfg_img = [SYS][PROMPT']
    slots:   [PROMPT'][SYS][ViT][PROMPT]   -> cfg_img = [0, P+S), gen = [P, ...), cfg_text = [P, P+S+V)

A context whose new segments cannot be placed next to its cached prefix is recomputed in its own range
(never needed by refine, edit, generate or judge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TextSegment:
    ids: tuple[int, ...]  # [bos] + tokens + [eos]

    @property
    def kv_len(self) -> int:
        return len(self.ids)

    @property
    def rope_advance(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImageSegment:
    kind: Literal["vit", "vae"]
    key: str  # identity of the image within its request
    num_tokens: int  # without the two markers

    @property
    def kv_len(self) -> int:
        return self.num_tokens + 2

    @property
    def rope_advance(self) -> int:
        return 1


Segment = TextSegment | ImageSegment


@dataclass(eq=False)
class Node:
    segment: Segment
    rope_start: int
    offset: int = -1  # slot offset within the request's allocation, set by `plan_contexts`


@dataclass(frozen=True)
class ContextRange:
    """A context as a range of the request's allocation plus the next RoPE position."""

    offset: int
    length: int
    rope: int


@dataclass
class PrefillSequence:
    """New nodes (in path order) prefilled as one attention sequence over a cached prefix range."""

    nodes: list[Node]
    cache_offset: int
    cache_len: int


@dataclass
class ContextPlan:
    total_slots: int
    contexts: dict[str, ContextRange]
    sequences: list[PrefillSequence] = field(default_factory=list)


def plan_contexts(contexts: dict[str, list[Segment]]) -> ContextPlan:
    order: list[Node] = []  # storage order
    trie: dict[tuple[int, Segment], Node] = {}
    paths: dict[str, list[Node]] = {}
    pending: list[tuple[list[Node], list[Node]]] = []  # (new chain, cached prefix)

    for name, segments in contexts.items():
        prefix: list[Node] = []
        parent_id, rope = 0, 0
        i = 0
        while i < len(segments) and (parent_id, segments[i]) in trie:
            node = trie[(parent_id, segments[i])]
            prefix.append(node)
            parent_id, rope = id(node), node.rope_start + node.segment.rope_advance
            i += 1
        rest = segments[i:]
        if rest:
            placement = _placement(order, prefix)
            if placement is None:  # cannot extend the shared prefix contiguously: recompute in own range
                prefix, parent_id, rope, rest, placement = [], -len(paths) - 1, 0, segments, "right"
            chain = []
            for seg in rest:
                node = Node(seg, rope)
                trie[(parent_id, seg)] = node
                chain.append(node)
                parent_id, rope = id(node), rope + seg.rope_advance
            if placement == "right":
                order.extend(chain)
            else:
                order[:0] = reversed(chain)
            pending.append((chain, prefix))
            paths[name] = prefix + chain
        else:
            paths[name] = prefix

    offset = 0
    for node in order:
        node.offset = offset
        offset += node.segment.kv_len

    plan = ContextPlan(total_slots=offset, contexts={})
    for name, path in paths.items():
        start, length = _span(path)
        rope = path[-1].rope_start + path[-1].segment.rope_advance if path else 0
        plan.contexts[name] = ContextRange(start, length, rope)
    for chain, prefix in pending:
        start, length = _span(prefix)
        plan.sequences.append(PrefillSequence(chain, start, length))
    return plan


def _placement(order: list[Node], prefix: list[Node]) -> Literal["left", "right"] | None:
    """Where new nodes go so prefix + new nodes stay contiguous, or None if nowhere."""
    if not prefix:
        return "right"
    idx = sorted(order.index(n) for n in prefix)
    if idx[-1] - idx[0] + 1 != len(idx):
        return None
    if idx[-1] == len(order) - 1:
        return "right"
    if idx[0] == 0:
        return "left"
    return None


def _span(nodes: list[Node]) -> tuple[int, int]:
    if not nodes:
        return 0, 0
    start = min(n.offset for n in nodes)
    length = sum(n.segment.kv_len for n in nodes)
    end = max(n.offset + n.segment.kv_len for n in nodes)
    if end - start != length:
        raise AssertionError("context laid out non-contiguously")  # planner invariant
    return start, length
