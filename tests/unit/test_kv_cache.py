"""The slot KV cache (`runtime/kv_cache.py`): rows taken and reused, bytes, growth, bounds; rows
joining and leaving a `DecodeBatch` each bitwise as alone; the "copy" binding as the "shared" one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from prefixport.errors import PrefixportError
from prefixport.runtime import CacheSettings
from prefixport.runtime.generation import DecodeBatch
from prefixport.runtime.kv_cache import KVCache, slot_bytes

from .runs import assert_same, mixed_run, run

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Numbers: 0 1 2 3", "Un café, s'il vous plaît.",
           "Where is parcel 12?", "Grüße aus München!"]


def _cache(engine, settings=CacheSettings(), manifest=None) -> KVCache:
    return KVCache(engine.backend, manifest or engine.manifest, settings, engine.context_limit)


def test_rows_are_taken_lowest_first_and_a_freed_row_is_reused(engine):
    cache = _cache(engine)
    assert [cache.admit(10) for _ in range(3)] == [0, 1, 2]
    assert cache.stats().reallocations == 0 and cache.buffers == []  # no slots needed before a first token
    cache.lengths[:3] = [4, 5, 6]
    cache.release(1)
    assert cache.in_use() == [0, 2] and cache.active == 3 and cache.used(3).tolist() == [True, False, True]
    assert cache.lengths.tolist()[:3] == [4, 0, 6]
    assert cache.admit(10) == 1 and cache.admit(10) == 3
    for row in (3, 2):
        cache.release(row)
    assert cache.active == 2 and cache.stats().rows_in_use == 2
    cache.reserve(2, 10)
    assert cache.capacity >= 10 and cache.stats().reallocations == 1


@pytest.mark.parametrize("mode,factor", [("shared", 1), ("copy", 2)])
def test_bytes_are_the_formula(engine, mode, factor):
    m = dataclasses.replace(engine.manifest, cache=mode)
    assert slot_bytes(m) == 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    cache = _cache(engine, manifest=m)
    for need in (20, 70, 30):
        cache.admit(need)
    cache.reserve(3, 70)
    held = sum(b.nbytes for b in cache.buffers)  # the buffers themselves: nothing hidden
    assert held == cache.rows * cache.capacity * slot_bytes(m) and cache.rows >= 3 and cache.capacity >= 70
    assert cache.nbytes == cache.stats().bytes == factor * held  # a "copy" graph's scratch counted too


def test_capacity_doubles_and_rows_in_use_keep_their_slots(engine):
    m = engine.manifest
    cache = _cache(engine)
    cache.admit(200)
    data = [np.random.default_rng(t).standard_normal((1, m.num_kv_heads, 40, m.head_dim)).astype(np.float32)
            for t in range(2 * m.num_layers)]
    cache.write(0, data)
    grows, capacities = cache.grows, []
    for length in range(41, 201, 9):
        cache.reserve(1, length)
        capacities.append(cache.capacity)
    assert sorted(set(capacities)) == [64, 128, 256] and cache.grows - grows == 2  # one copy per doubling
    for got, want in zip(cache.read(0), data):
        np.testing.assert_array_equal(got, want[0])


def test_bounds_refuse_a_row_or_make_it_wait(engine):
    cache = _cache(engine, CacheSettings(max_rows=2))
    assert cache.admit(10) == 0 and cache.admit(10) == 1 and cache.admit(10) is None
    cache.release(0)
    assert cache.admit(10) == 0
    per_slot = slot_bytes(engine.manifest)
    cache = _cache(engine, CacheSettings(budget_mb=100 * per_slot / 2**20))  # 100 slots in all
    assert cache.admit(60) == 0 and cache.admit(60) is None  # 2 x 60 > 100: waits
    assert cache.nbytes <= 100 * per_slot
    with pytest.raises(PrefixportError, match="does not fit"):
        cache.admit(101)
    cache = _cache(engine, CacheSettings(max_context=16))
    with pytest.raises(PrefixportError, match="does not fit"):
        cache.admit(17)


PLAN = [  # (step it joins at, prompt, adapter, max_new_tokens): rows leave mid-run, free rows are reused
    (0, PROMPTS[0], None, 12), (0, PROMPTS[1], "soft", 30), (0, PROMPTS[2], None, 5),
    (3, PROMPTS[3], "prefix", 20), (5, PROMPTS[4], "soft6", 70), (9, PROMPTS[5], None, 7), (9, PROMPTS[0], "soft", 9),
]


def test_rows_joining_and_leaving_mid_run_are_bitwise_alone(engine):
    """Different adapters and lengths, joins at steps 0, 3, 5 and 9, leaves in between, and
    capacity growth mid-generation (one row passes 64 slots)."""
    requests, cache, rows_seen = mixed_run(engine, PLAN)
    assert cache.capacity > 64 and cache.grows >= 2
    assert len(rows_seen) < len(PLAN) and cache.in_use() == []  # rows were reused, all freed
    for (_, prompt, adapter, n), got in zip(PLAN, requests):
        assert_same(got, run(engine, prompt, adapter, n))
    assert len({tuple(r.tokens[:5]) for r in requests}) > 4  # the adapters and prompts really differ


def test_a_load_over_the_budget_waits_and_still_matches(engine):
    need = max(len(engine.encode(p)) for p in PROMPTS) + 6 + 20
    settings = CacheSettings(budget_mb=2 * need * slot_bytes(engine.manifest) / 2**20)
    plan = [(0, p, a, 20) for p, a in zip(PROMPTS, [None, "soft6", "prefix", None, "soft", "prefix3"])]
    requests, cache, _ = mixed_run(engine, plan, settings)
    assert cache.rows <= 2 and cache.nbytes <= settings.budget_bytes
    for (_, prompt, adapter, n), got in zip(plan, requests):
        assert_same(got, run(engine, prompt, adapter, n))


def test_a_copy_mode_export_gives_what_the_shared_one_gives(engine, make_engine, toy_copy):
    copy = make_engine(folder=toy_copy[0])
    assert copy.manifest.cache == "copy" and engine.manifest.cache == "shared"
    requests, cache, _ = mixed_run(copy, PLAN)
    assert cache.nbytes == 2 * cache.rows * cache.capacity * slot_bytes(copy.manifest)
    for (_, prompt, adapter, n), got in zip(PLAN, requests):
        assert_same(got, run(engine, prompt, adapter, n))


def test_rows_over_the_budget_are_preempted_fairly_and_resume_exactly(engine):
    """KV taken as used: four rows join a cache of 120 slots (each holds only its prompt), and
    grow past it. The youngest row of the tenant holding the most is preempted (its slots to host
    memory), twice here, both of tenant "a"; they resume when rows leave, and every request gives
    bitwise what it gives alone (greedy and seeded)."""
    m = engine.manifest
    settings = CacheSettings(budget_mb=120 * slot_bytes(m) / 2**20)
    cache = KVCache(engine.backend, m, settings, engine.context_limit)
    batch = DecodeBatch(engine.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0, headroom=0)
    jobs = [(PROMPTS[0], "a", {}), (PROMPTS[1], "b", {}), (PROMPTS[2], "a", dict(temperature=0.8, seed=3)),
            (PROMPTS[3], "a", {})]
    requests = [engine.prepare(p, max_new_tokens=40, stop_token_ids=[], tenant=t, **kw) for p, t, kw in jobs]
    for r in requests:
        r.logits = []
    waiting, order = list(requests), []
    while waiting or batch:
        waiting = waiting[batch.join(waiting):]
        batch.sample()
        batch.advance()
        back = batch.take_preempted()
        order += back
        waiting = back + waiting
        assert cache.nbytes <= settings.budget_bytes
    assert [requests.index(r) for r in order] == [3, 2]  # tenant a's youngest, then its next youngest
    assert cache.swaps == 2 and cache.stats().preemptions == 2
    for (prompt, _, kw), got in zip(jobs, requests):
        assert_same(got, run(engine, prompt, None, 40, **kw))
