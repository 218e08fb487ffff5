"""Context planner + task contexts: token ids, kv lengths and RoPE positions per docs/rvr.md §3."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.contexts import ImageSegment, TextSegment, plan_contexts
from engine.prefill import vit_embeddings
from engine.requests import context_image, task_contexts
from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import SYSTEM_PROMPT, empty_pool, random_image, refine_prompt, run_llm

NV = 9  # ViT tokens of a hypothetical 3x3 grid
NVAE = 12  # VAE tokens of a hypothetical 3x4 latent grid


def _text_ids(tok, text: str) -> list[int]:
    return [tok.bos_id, *tok.encode(text), tok.eos_id]


def _slot_table(plan) -> dict[int, tuple[int, object]]:
    """slot -> (RoPE position, token id or image kind), from every node the plan prefills."""
    table: dict[int, tuple[int, object]] = {}
    for seq in plan.sequences:
        for node in seq.nodes:
            seg = node.segment
            for i in range(seg.kv_len):
                slot = node.offset + i
                assert slot not in table, "two nodes share a slot"
                if isinstance(seg, TextSegment):
                    table[slot] = (node.rope_start + i, seg.ids[i])
                else:
                    table[slot] = (node.rope_start, seg.kind)
    return table


def _context_rows(plan, table, name: str) -> list[tuple[int, object]]:
    c = plan.contexts[name]
    return sorted((table[s] for s in range(c.offset, c.offset + c.length)), key=repr)


def _expected(*parts) -> list[tuple[int, object]]:
    """parts: ("text", ids, start) or ("img", kind, n_tokens, pos) -> sorted (pos, tag) rows."""
    rows = []
    for part in parts:
        if part[0] == "text":
            _, ids, start = part
            rows += [(start + i, t) for i, t in enumerate(ids)]
        else:
            _, kind, n, pos = part
            rows += [(pos, kind)] * (n + 2)
    return sorted(rows, key=repr)


def _request(task, prompt, image=None):
    return GenerationRequest(task, prompt, image, SamplingParams.for_task(task), seed=0, height=64, width=64)


def test_refine_contexts_match_rvr_table(tiny_engine):
    tok = tiny_engine.tokenizer
    user = "two red apples on a wooden table"
    segs = task_contexts(_request("refine", user), tok, NV, NVAE)
    sys_ids = _text_ids(tok, SYSTEM_PROMPT)
    prompt_ids = _text_ids(tok, refine_prompt(user))
    assert refine_prompt(user).endswith(". ")
    S, P = len(sys_ids), len(prompt_ids)

    # Segments: no VAE anywhere in refine.
    for ctx in segs.values():
        assert not any(isinstance(s, ImageSegment) and s.kind == "vae" for s in ctx)
    assert [s.ids for s in segs["gen"] if isinstance(s, TextSegment)] == [tuple(sys_ids), tuple(prompt_ids)]

    plan = plan_contexts(segs)
    c = plan.contexts
    assert (c["gen"].length, c["gen"].rope) == (S + NV + 2 + P, S + 1 + P)
    assert (c["cfg_text"].length, c["cfg_text"].rope) == (S + NV + 2, S + 1)
    assert (c["cfg_img"].length, c["cfg_img"].rope) == (S + P, S + P)
    # Shared prefix stored once: [SYS][ViT] is shared by all, cfg_img's PROMPT' is the only copy.
    assert plan.total_slots == S + (NV + 2) + P + P
    assert c["cfg_text"].offset == c["gen"].offset  # a prefix range of gen
    for ctx in c.values():
        assert ctx.offset >= 0 and ctx.offset + ctx.length <= plan.total_slots

    table = _slot_table(plan)
    assert sorted(table) == list(range(plan.total_slots))
    assert _context_rows(plan, table, "gen") == _expected(
        ("text", sys_ids, 0), ("img", "vit", NV, S), ("text", prompt_ids, S + 1)
    )
    assert _context_rows(plan, table, "cfg_text") == _expected(("text", sys_ids, 0), ("img", "vit", NV, S))
    assert _context_rows(plan, table, "cfg_img") == _expected(("text", sys_ids, 0), ("text", prompt_ids, S))
    # The SYS rows of cfg_img are the very slots gen reads.
    sys_slots = [s for s, (pos, tag) in table.items() if pos < S]
    assert len(sys_slots) == S
    for name in ("gen", "cfg_text", "cfg_img"):
        r = c[name]
        assert all(r.offset <= s < r.offset + r.length for s in sys_slots)


def test_edit_contexts(tiny_engine):
    tok = tiny_engine.tokenizer
    instr = "make the sky purple"
    segs = task_contexts(_request("edit", instr, random_image(8, 8)), tok, NV, NVAE)
    ids = _text_ids(tok, instr)  # raw instruction: no template, no system prompt
    n = len(ids)
    assert [type(s).__name__ + getattr(s, "kind", "") for s in segs["gen"]] == [
        "ImageSegmentvae",
        "ImageSegmentvit",
        "TextSegment",
    ]
    plan = plan_contexts(segs)
    c = plan.contexts
    img = (NVAE + 2) + (NV + 2)
    assert (c["gen"].length, c["gen"].rope) == (img + n, 2 + n)
    assert (c["cfg_text"].length, c["cfg_text"].rope) == (img, 2)
    assert (c["cfg_img"].length, c["cfg_img"].rope) == (n, n)
    assert plan.total_slots == img + n + n
    table = _slot_table(plan)
    assert _context_rows(plan, table, "gen") == _expected(
        ("img", "vae", NVAE, 0), ("img", "vit", NV, 1), ("text", ids, 2)
    )
    assert _context_rows(plan, table, "cfg_text") == _expected(("img", "vae", NVAE, 0), ("img", "vit", NV, 1))
    assert _context_rows(plan, table, "cfg_img") == _expected(("text", ids, 0))


def test_generate_contexts(tiny_engine):
    tok = tiny_engine.tokenizer
    prompt = "a blue bird"
    segs = task_contexts(_request("generate", prompt), tok, 0, 0)
    ids = _text_ids(tok, prompt)
    plan = plan_contexts(segs)
    c = plan.contexts
    assert plan.total_slots == len(ids)
    assert (c["gen"].length, c["gen"].rope) == (len(ids), len(ids))
    assert c["cfg_img"] == c["gen"]  # identical context, stored once
    assert (c["cfg_text"].length, c["cfg_text"].rope) == (0, 0)
    table = _slot_table(plan)
    assert _context_rows(plan, table, "gen") == _expected(("text", ids, 0))


def test_shared_prefix_left_right_and_fallback():
    a, b, c, d, e = (
        TextSegment((1, 2)),
        TextSegment((3,)),
        TextSegment((4,)),
        TextSegment((5,)),
        TextSegment((6,)),
    )
    # c1 shares [a] and goes left of it, c2 shares nothing and goes right; c3 would share [a], which is now
    # in the middle of the layout, so it must get its own copy of a.
    plan = plan_contexts({"c0": [a, b], "c1": [a, c], "c2": [d], "c3": [a, e]})
    table = _slot_table(plan)
    assert sorted(table) == list(range(plan.total_slots))
    assert plan.total_slots == 2 + 1 + 1 + 1 + 2 + 1
    assert _context_rows(plan, table, "c0") == _expected(("text", [1, 2, 3], 0))
    assert _context_rows(plan, table, "c1") == _expected(("text", [1, 2, 4], 0))
    assert _context_rows(plan, table, "c2") == _expected(("text", [5], 0))
    assert _context_rows(plan, table, "c3") == _expected(("text", [1, 2, 6], 0))
    for name, rope in (("c0", 3), ("c1", 3), ("c2", 1), ("c3", 3)):
        assert plan.contexts[name].rope == rope
    # Each prefill sequence sees exactly its cached prefix range.
    for seq in plan.sequences:
        first = seq.nodes[0]
        cached = [table[s] for s in range(seq.cache_offset, seq.cache_offset + seq.cache_len)]
        assert all(pos < first.rope_start for pos, _ in cached)
        assert len(cached) == first.rope_start  # text-only: one position per cached row


# --------------------------------------------------------------------------- actual prefill


def _naive_context_kv(tiny_engine, model, parts):
    """Prefill one context on its own from scratch; parts: ("text", ids, pos0) / ("vit", embeds, pos)."""
    vs, ve = tiny_engine.tokenizer.vision_start_id, tiny_engine.tokenizer.vision_end_id
    embeds, positions, segments = [], [], []
    for part in parts:
        if part[0] == "text":
            _, ids, p0 = part
            embeds.append(model.embed_tokens(torch.tensor(ids)))
            positions += range(p0, p0 + len(ids))
            segments.append((len(ids), True))
        else:
            _, vit, p = part
            embeds += [model.embed_tokens(torch.tensor([vs])), vit, model.embed_tokens(torch.tensor([ve]))]
            positions += [p] * (vit.shape[0] + 2)
            segments.append((vit.shape[0] + 2, False))
    embeds = torch.cat(embeds)
    n = embeds.shape[0]
    pool = empty_pool(model, n)
    run_llm(model, embeds, positions, segments, pool, writes=[(0, n, 0)])
    return pool


@torch.inference_mode()
def test_refine_prefill_kv(tiny_engine):
    eng = tiny_engine
    tok, cfg = eng.tokenizer, eng.cfg
    img, user = random_image(70, 50, 3), "a green chair"
    [state] = eng.prepare([_request("refine", user, img)])
    try:
        ws = state.weights
        assert ws.name == "rvr"
        model = ws.model
        ci = context_image(img, cfg)
        vit = vit_embeddings(model, cfg, [ci])[0]
        nv = vit.shape[0]
        sys_ids, prompt_ids = _text_ids(tok, SYSTEM_PROMPT), _text_ids(tok, refine_prompt(user))
        S, P = len(sys_ids), len(prompt_ids)
        assert state.alloc[1] == S + nv + 2 + P + P

        plan = plan_contexts(task_contexts(state.request, tok, nv, 0))
        table = _slot_table(plan)
        base = state.alloc[0]
        for name, r in plan.contexts.items():  # the state's ranges are the plan's, shifted
            assert (state.contexts[name].offset - base, state.contexts[name].length) == (r.offset, r.length)
        slot_of = {v: base + s for s, v in table.items() if isinstance(v[1], int)}  # text rows only
        vit_slots = sorted(base + s for s, v in table.items() if v[1] == "vit")

        gen = _naive_context_kv(
            eng, model, [("text", sys_ids, 0), ("vit", vit, S), ("text", prompt_ids, S + 1)]
        )
        cfg_img = _naive_context_kv(eng, model, [("text", sys_ids, 0), ("text", prompt_ids, S)])
        for layer, (pk, pv) in enumerate(ws.pool.layers()):
            gk, gv = gen[layer]
            ik, iv = cfg_img[layer]
            sys_rows = [slot_of[(i, t)] for i, t in enumerate(sys_ids)]
            # Shared SYS rows: one copy in the pool, equal to SYS computed in either context on its own.
            torch.testing.assert_close(pk[sys_rows], gk[:S], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pk[sys_rows], ik[:S], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pv[sys_rows], gv[:S], atol=1e-5, rtol=1e-5)
            # ViT block (markers included) at position S.
            torch.testing.assert_close(pk[vit_slots], gk[S : S + nv + 2], atol=1e-5, rtol=1e-5)
            # PROMPT in gen (after the image, positions S+1..) vs PROMPT' in cfg_img (positions S..).
            gen_rows = [slot_of[(S + 1 + j, t)] for j, t in enumerate(prompt_ids)]
            img_rows = [slot_of[(S + j, t)] for j, t in enumerate(prompt_ids)]
            assert not set(gen_rows) & set(img_rows)
            torch.testing.assert_close(pk[gen_rows], gk[S + nv + 2 :], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pv[gen_rows], gv[S + nv + 2 :], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pk[img_rows], ik[S:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pv[img_rows], iv[S:], atol=1e-5, rtol=1e-5)
            assert (pk[gen_rows] - pk[img_rows]).abs().max() > 1e-3
            if layer > 0:  # V of layer 0 depends only on the token, deeper layers see the context
                assert (pv[gen_rows] - pv[img_rows]).abs().max() > 1e-3
    finally:
        eng.release(state)


@pytest.mark.parametrize("user", ["x", "a much longer prompt with many words in it, and punctuation."])
def test_refine_slot_count_through_engine(tiny_engine, user):
    eng = tiny_engine
    tok = eng.tokenizer
    img = random_image(90, 40, 1)
    ci = context_image(img, eng.cfg)
    nv = ci.vit_grid[0] * ci.vit_grid[1]
    S = len(tok.encode(SYSTEM_PROMPT)) + 2
    P = len(tok.encode(refine_prompt(user))) + 2
    pool = eng.weight_sets["rvr"].pool
    before = pool.used
    [state] = eng.prepare([_request("refine", user, img)])
    assert pool.used - before == S + nv + 2 + 2 * P
    c = state.contexts
    assert (c["gen"].length, c["gen"].rope) == (S + nv + 2 + P, S + 1 + P)
    assert (c["cfg_text"].length, c["cfg_text"].rope) == (S + nv + 2, S + 1)
    assert (c["cfg_img"].length, c["cfg_img"].rope) == (S + P, S + P)
    n = state.x.shape[0]
    assert n == state.grid[0] * state.grid[1]
    assert eng.kv_tokens(state.request) == S + nv + 2 + 2 * P + 3 * (n + 2)  # KV slots + query rows
    eng.release(state)
    assert pool.used == before
    assert Counter(type(s) for s in task_contexts(state.request, tok, nv, 0)["gen"])[ImageSegment] == 1


def test_refine_never_encodes_with_the_vae(tiny_engine, monkeypatch):
    calls = []
    inner = tiny_engine.vae.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.vae, "encode", counting)
    img = random_image(50, 50, 4)
    states = tiny_engine.prepare([_request("refine", "a cup", img), _request("generate", "a cup")])
    assert calls == []
    states += tiny_engine.prepare([_request("edit", "a cup", img)])
    assert calls == [1]  # the control: edit does encode its input
    for s in states:
        tiny_engine.release(s)
