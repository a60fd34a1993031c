"""The prompt cache (`runtime/prompt_cache.py`): a hit gives bitwise what a miss gives (an engine
without the cache), computes only the uncached tokens, and is found only under the same adapter
tensors and salt; the byte budget, pinned blocks, adapters re-registered."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from prefixport.runtime.kv_cache import slot_bytes
from prefixport.runtime.prompt_cache import BLOCK_TOKENS, MIN_REST

from .runs import assert_same, batch_twice_as_plain, run
from .toy_export import prefix

SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, name the "
          "parcel's city when you know it, and never invent tracking numbers. ")
QUESTIONS = ["Where is parcel 12?", "Wo ist mein Paket?", "Où est le colis 7 ?", "Where is parcel 12?"]
VIRTUAL = {None: 0, "soft": 4, "soft6": 6, "prefix": 5}


@pytest.fixture
def pair(make_engine):
    """(cached, plain): engines with and without a prompt cache, every adapter registered."""
    return make_engine(), make_engine(prompt_cache_bytes=0)


@pytest.mark.parametrize("adapter", [None, "soft", "soft6", "prefix"])
def test_hits_equal_misses_bitwise_and_skip_the_cached_tokens(pair, adapter):
    cached, plain = pair
    found = []
    for question in QUESTIONS:
        ids = cached.encode(SYSTEM + question)
        calls = len(cached.backend.calls)
        got = run(cached, ids, adapter)
        assert_same(got, run(plain, ids, adapter))
        prefill = cached.backend.calls[calls]  # the request's first run: its prefill
        assert prefill.past_lengths[0] + prefill.input_lengths[0] == VIRTUAL[adapter] + len(ids)
        if got.cached_tokens:
            assert prefill.input_lengths[0] == len(ids) - got.cached_tokens >= MIN_REST  # only the rest computed
        found.append(got.cached_tokens)
    system_blocks = len(cached.encode(SYSTEM)) // BLOCK_TOKENS * BLOCK_TOKENS
    assert found[0] == 0 and all(n > 0 for n in found[1:]) and max(found) >= system_blocks > 0, found
    stats = cached.stats().prompt_cache
    assert stats.cached_tokens == sum(found) and stats.requests == 4 and stats.hits == 3
    assert plain.stats().prompt_cache is None


def test_prompts_of_many_lengths_sharing_their_start_are_exact(pair):
    """Whatever the cache holds (the last block maybe in part), the rest is prefilled after it."""
    cached, plain = pair
    base = cached.encode(SYSTEM * 2)[:130]
    for adapter in (None, "soft", "prefix"):
        found = []
        for length in range(33, 131, 7):
            got = run(cached, base[:length], adapter, 2)
            assert_same(got, run(plain, base[:length], adapter, 2))
            assert length - got.cached_tokens >= MIN_REST
            found.append(got.cached_tokens)
        assert sum(n > 0 for n in found) >= len(found) - 2, found
        if adapter == "soft":  # the run-length rule cuts into a block for some lengths (89 here)
            assert any(n % BLOCK_TOKENS for n in found), found


def test_adapters_and_salts_never_share_blocks(pair):
    cached, _ = pair
    ids = cached.encode(SYSTEM + QUESTIONS[0])
    assert run(cached, ids, "soft").cached_tokens == 0
    for other in ("soft6", "prefix", "prefix3", None):  # the same tokens under another adapter (or none)
        assert run(cached, ids, other).cached_tokens == 0
    assert run(cached, ids, "soft").cached_tokens > 0
    assert run(cached, ids, None, cache_salt="tenant-a").cached_tokens == 0
    assert run(cached, ids, None, cache_salt="tenant-b").cached_tokens == 0
    assert run(cached, ids, None, cache_salt="tenant-a").cached_tokens > 0
    assert run(cached, ids, None).cached_tokens > 0  # no salt: the unsalted chain stored above


def test_a_re_registered_adapter_never_hits_its_old_blocks(pair, manifest):
    cached, plain = pair
    ids = cached.encode(SYSTEM + QUESTIONS[1])
    first = run(cached, ids, "prefix")
    assert run(cached, ids, "prefix").cached_tokens > 0 and cached.stats().prompt_cache.by_adapter["prefix"] > 0
    other = prefix(manifest, 5, seed=77)  # the same name and shape, other tensors
    cached.add_adapter("prefix", bundle=other)
    plain.add_adapter("prefix-2", bundle=other)
    assert "prefix" not in cached.stats().prompt_cache.by_adapter  # its old chain was dropped
    got = run(cached, ids, "prefix")
    assert got.cached_tokens == 0 and got.logits[0].tobytes() != first.logits[0].tobytes()
    assert_same(got, run(plain, ids, "prefix-2"))
    assert run(cached, ids, "prefix").cached_tokens > 0
    cached.remove_adapter("prefix")
    assert "prefix" not in cached.stats().prompt_cache.by_adapter


def test_eviction_keeps_the_budget_and_the_outputs(make_engine, pair):
    _, plain = pair
    block = BLOCK_TOKENS * slot_bytes(plain.manifest)
    engine = make_engine(prompt_cache_bytes=3 * block)
    prompts = [f"{i}. {SYSTEM}" for i in range(4)]  # different from the first token: nothing shared
    for prompt in prompts * 2:
        assert_same(run(engine, prompt), run(plain, prompt))
        stats = engine.stats().prompt_cache
        assert 0 < stats.bytes <= stats.budget_bytes
    assert stats.evicted_blocks > 0 and stats.blocks == 3 and stats.bytes == 3 * block


def test_blocks_a_request_holds_are_not_evicted(make_engine, manifest):
    engine = make_engine(adapters=False, prompt_cache_bytes=2 * BLOCK_TOKENS * slot_bytes(manifest))
    cache = engine.prompt_cache
    a, b = (engine.encode(f"{i}. {SYSTEM}")[: 2 * BLOCK_TOKENS + MIN_REST] for i in (1, 2))
    run(engine, a)
    assert cache.peek(a, None) == 2 * BLOCK_TOKENS
    hit = cache.lookup(a, None)  # as a request holds them between its lookup and its copy
    run(engine, b)  # b's blocks go over the budget: b's own are evicted, not a's
    assert cache.peek(a, None) == 2 * BLOCK_TOKENS and cache.peek(b, None) == 0
    cache.release(hit)
    run(engine, b)
    assert cache.peek(b, None) == 2 * BLOCK_TOKENS and cache.peek(a, None) == 0
    assert cache.stats().bytes <= cache.budget_bytes


def test_a_batch_of_hits_and_misses_equals_no_cache(pair):
    cached, plain = pair
    prompts = [SYSTEM + q for q in ("Hello?", "Bonjour ?", "Hello?", "Hallo?", "Bonjour ?")]
    adapters = [None, "soft", "prefix", "soft6", "soft"]
    got = batch_twice_as_plain(cached, plain, prompts, adapters)
    assert all(g.cached_tokens > 0 for g in got)


def test_threads_share_one_cache(pair):
    cached, plain = pair
    jobs = [(SYSTEM + q, a) for q in QUESTIONS[:3] for a in (None, "soft", "prefix")] * 2
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: run(cached, *job), jobs))
    for (prompt, adapter), g in zip(jobs, got):
        assert_same(g, run(plain, prompt, adapter))
    assert sum(g.cached_tokens > 0 for g in got) >= len(jobs) // 2
