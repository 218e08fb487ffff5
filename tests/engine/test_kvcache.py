"""KV pool allocation, growth and release; chunked text prefill (bottom-right causal alignment)."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.core import Engine
from engine.kvcache import KVPool, KVPoolFull
from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import empty_pool, max_pixel_diff, random_image, run_llm


def _pool(capacity, growable=False):
    return KVPool(2, 1, 2, torch.float32, "cpu", capacity=capacity, growable=growable)


def test_allocate_free_coalesce():
    pool = _pool(10)
    assert pool.capacity == 10 and pool.used == 0
    a, b, c = pool.allocate(3), pool.allocate(3), pool.allocate(4)
    assert (a, b, c) == (0, 3, 6)
    assert pool.used == 10
    with pytest.raises(KVPoolFull):
        pool.allocate(1)
    pool.free(b, 3)
    assert pool.used == 7
    with pytest.raises(KVPoolFull):
        pool.allocate(4)
    assert pool.allocate(3) == 3  # first fit reuses the hole
    pool.free(3, 3)
    pool.free(a, 3)  # neighbours [0, 3) and [3, 6) coalesce
    assert pool.allocate(6) == 0
    pool.free(0, 6)
    pool.free(c, 4)  # everything free again: one range
    assert pool.used == 0
    assert pool.allocate(10) == 0
    assert pool.allocate(0) == 0  # empty allocations take nothing
    assert pool.used == 10


def test_free_out_of_order_coalesces():
    pool = _pool(12)
    starts = [pool.allocate(2) for _ in range(6)]
    for s in (starts[4], starts[1], starts[3], starts[0], starts[5], starts[2]):
        pool.free(s, 2)
    assert pool.used == 0
    assert pool.allocate(12) == 0


def test_growth_keeps_offsets_and_contents():
    pool = _pool(4, growable=True)
    a = pool.allocate(3)
    k, v = pool.layer(1)
    k[a : a + 3] = torch.arange(6.0).view(3, 1, 2)
    v[a : a + 3] = -torch.arange(6.0).view(3, 1, 2)
    b = pool.allocate(5)  # does not fit: grows
    assert pool.capacity >= 8
    assert b >= a + 3 or b + 5 <= a
    k, v = pool.layer(1)
    assert torch.equal(k[a : a + 3], torch.arange(6.0).view(3, 1, 2))
    assert torch.equal(v[a : a + 3], -torch.arange(6.0).view(3, 1, 2))
    assert pool.k.shape == (2, pool.capacity, 1, 2)
    assert pool.used == 8
    big = pool.allocate(100)
    assert pool.capacity >= 108 and big >= 8
    assert torch.equal(pool.layer(1)[0][a : a + 3], torch.arange(6.0).view(3, 1, 2))


def _refine(seed=0, steps=4, size=(60, 40)):
    params = SamplingParams.for_task("refine", steps=steps)
    return GenerationRequest("refine", "a small red house", random_image(*size, seed), params, seed=seed)


def test_release_after_finish_frees_everything(tiny_engine):
    pools = [ws.pool for ws in tiny_engine.weight_sets.values()]
    before = [p.used for p in pools]
    gen = GenerationRequest("generate", "a dog", None, SamplingParams.for_task("generate", steps=3), seed=1)
    states = tiny_engine.prepare([_refine(), gen])
    assert [p.used for p in pools] != before
    while not all(s.done for s in states):
        tiny_engine.step(states)
    for s in states:
        tiny_engine.finish(s)
        tiny_engine.release(s)  # idempotent
    assert [p.used for p in pools] == before


def test_non_growable_pool_raises_and_leaks_nothing(tiny_engine):
    e = tiny_engine
    [probe] = e.prepare([_refine(1)])
    n = probe.alloc[1]  # every _refine(seed) needs the same number of slots
    e.release(probe)
    cap = 2 * n + n // 2  # room for two requests, not three
    small = Engine(
        e.cfg, e.tokenizer, {"rvr": e.weight_sets["rvr"].model}, e.vae, e.device, e.dtype, kv_capacity=cap
    )
    pool = small.weight_sets["rvr"].pool
    assert not pool.growable and pool.capacity == cap
    [s1] = small.prepare([_refine(1)])
    used = pool.used
    assert used == n
    with pytest.raises(KVPoolFull):
        small.prepare([_refine(2), _refine(3)])
    assert pool.used == used  # the failed batch released what it had allocated
    [s2] = small.prepare([_refine(2)])  # the first of the pair fitted: it was allocated, then freed
    small.release(s2)
    small.release(s1)
    assert pool.used == 0


# --------------------------------------------------------------------------- chunked prefill


@torch.inference_mode()
@pytest.mark.parametrize("cuts", [(13,), (7, 19), (1, 29)])
def test_chunked_text_prefill_equals_one_shot(tiny_engine, cuts):
    model = tiny_engine.weight_sets["ema"].model
    tok = tiny_engine.tokenizer
    ids = [
        tok.bos_id,
        *tok.encode("a fairly long prompt about seven tall green trees beside a lake"),
        tok.eos_id,
    ]
    ids = (ids * 3)[:30]
    n = len(ids)
    assert n == 30
    embeds = model.embed_tokens(torch.tensor(ids))

    one = empty_pool(model, n)
    h_one, _ = run_llm(model, embeds, range(n), [(n, True)], one, writes=[(0, n, 0)])

    chunked = empty_pool(model, n)
    bounds = [0, *cuts, n]
    outs = []
    for a, b in itertools.pairwise(bounds):
        # chunk [a, b): its own rows causal, plus every cached row [0, a) (bottom-right alignment).
        h, _ = run_llm(
            model, embeds[a:b], range(a, b), [(b - a, True)], chunked, cache=(0, a), writes=[(0, b - a, a)]
        )
        outs.append(h)
    for (k1, v1), (k2, v2) in zip(one, chunked, strict=True):
        torch.testing.assert_close(k2, k1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v2, v1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs), h_one, atol=1e-5, rtol=1e-5)

    # A bidirectional 3-row query over the cache gives the same output on either pool.
    q = model.embed_tokens(torch.tensor([tok.vision_start_id, ids[3], tok.vision_end_id]))
    o1, _ = run_llm(model, q, [n] * 3, [(3, False)], one, cache=(0, n))
    o2, _ = run_llm(model, q, [n] * 3, [(3, False)], chunked, cache=(0, n))
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_top_left_alignment_would_differ(tiny_engine):
    """Control for the test above: hiding the cache from a chunk changes its KV, so alignment is observable."""
    model = tiny_engine.weight_sets["ema"].model
    tok = tiny_engine.tokenizer
    ids = [tok.bos_id, *tok.encode("seven tall green trees beside a lake at dusk"), tok.eos_id]
    n = len(ids)
    embeds = model.embed_tokens(torch.tensor(ids))
    one = empty_pool(model, n)
    run_llm(model, embeds, range(n), [(n, True)], one, writes=[(0, n, 0)])
    wrong = empty_pool(model, n)
    a = n // 2
    run_llm(model, embeds[:a], range(a), [(a, True)], wrong, writes=[(0, a, 0)])
    run_llm(model, embeds[a:], range(a, n), [(n - a, True)], wrong, writes=[(0, n - a, a)])  # no cache
    assert (wrong[-1][0][a:] - one[-1][0][a:]).abs().max() > 1e-3


def test_pool_growth_with_live_requests(tiny_engine):
    """A request that makes the pool grow mid-run leaves the running requests' KV (and images) intact."""
    e = tiny_engine
    eng = Engine(e.cfg, e.tokenizer, {"rvr": e.weight_sets["rvr"].model}, e.vae, e.device, e.dtype)
    ws = eng.weight_sets["rvr"]
    ws.pool = KVPool(*ws.pool.k.shape[:1], *ws.pool.k.shape[2:], e.dtype, "cpu", capacity=8, growable=True)
    reqs = [_refine(seed, steps=5, size=size) for seed, size in ((1, (60, 40)), (2, (90, 90)), (3, (30, 70)))]
    solo = [e.run(r)[0].image for r in reqs]
    first = eng.prepare(reqs[:1])
    cap0 = ws.pool.capacity
    eng.step(first)
    rest = eng.prepare(reqs[1:])  # grows the pool while `first` is live
    assert ws.pool.capacity > cap0
    states = first + rest
    while not all(s.done for s in states):
        eng.step(states)
    images = [eng.finish(s).image for s in states]
    for a, b in zip(images, solo, strict=True):
        assert max_pixel_diff(a, b) <= 1
    assert ws.pool.used == 0
