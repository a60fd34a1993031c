"""Requests past a limit are refused before any work with an error naming the limit: the model's
context (virtual tokens counted), the KV cache's bounds, and a TensorRT engine's shapes (a
backend reporting `Limits`)."""

from __future__ import annotations

import pytest

from prefixport.errors import AdapterError, ContextLengthError, InputError, PrefixportError
from prefixport.runtime import CacheSettings, Scheduler
from prefixport.runtime.kv_cache import slot_bytes
from prefixport.runtime.limits import Limits

PROMPT = "Where is parcel 12?"


@pytest.mark.parametrize("adapter,virtual", [(None, 0), ("soft6", 6), ("prefix", 5)])
def test_the_context_is_exact_to_the_position(engine, adapter, virtual):
    n = len(engine.encode(PROMPT))
    room = engine.room(n, virtual)
    assert room == engine.manifest.max_positions - virtual - n
    assert engine.prepare(PROMPT, adapter=adapter, max_new_tokens=room).need == engine.manifest.max_positions
    with pytest.raises(ContextLengthError, match=f"exceed the model's context of {engine.manifest.max_positions}") as e:
        engine.prepare(PROMPT, adapter=adapter, max_new_tokens=room + 1)
    assert (f"the adapter's virtual tokens ({virtual})" in str(e.value)) == bool(virtual)
    assert f"the prompt ({n} tokens)" in str(e.value)


def test_a_request_at_the_context_generates_to_its_end(engine):
    ids = engine.encode(PROMPT) * 12
    result = engine.generate(ids, adapter="soft", max_new_tokens=engine.room(len(ids), 4), stop_token_ids=[])
    assert len(result.token_ids) == engine.room(len(ids), 4) and result.finish_reason == "length"
    assert max(c.capacity for c in engine.stats().kv_cache.caches) == engine.manifest.max_positions


def test_the_kv_cache_bounds_refuse_before_any_work(make_engine, manifest):
    engine = make_engine(adapters=False, cache_settings=CacheSettings(budget_mb=50 * slot_bytes(manifest) / 2**20))
    assert engine.room(len(engine.encode(PROMPT))) == 50 - len(engine.encode(PROMPT))
    with pytest.raises(ContextLengthError, match=r"need [0-9.]+ MB of KV cache, over the budget"):
        engine.generate(PROMPT, max_new_tokens=60)
    assert engine.stats().kv_cache.bytes == 0 and engine.backend.calls == []
    engine = make_engine(adapters=False, cache_settings=CacheSettings(max_context=16))
    with pytest.raises(ContextLengthError, match="exceed the KV cache's context of 16 positions"):
        engine.generate(PROMPT, max_new_tokens=16)
    assert engine.backend.calls == []
    assert len(engine.generate(PROMPT, max_new_tokens=16 - len(engine.encode(PROMPT))).token_ids) >= 1


def test_an_engines_limits_bound_requests_adapters_batches_and_the_scheduler(make_engine, toy):
    free = make_engine()
    limits = Limits(max_batch=2, max_seq=8, max_past=63, max_virtual=4)
    engine = make_engine(adapters=False, limits=limits)
    assert engine.context_limit == 64 and engine.max_batch == 2
    engine.add_adapter("soft", toy[0] / "adapters" / "soft.safetensors")  # 4 virtual tokens: fits
    with pytest.raises(AdapterError, match="more than the TensorRT engine's max_virtual 4"):
        engine.add_adapter("soft6", toy[0] / "adapters" / "soft6.safetensors")
    with pytest.raises(ContextLengthError, match="exceeds the TensorRT engine's max_seq 8"):
        engine.generate("The quick brown fox jumps over the lazy dog.", max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="TensorRT engine's context of 64"):
        engine.generate("Un café", max_new_tokens=62)
    with pytest.raises(InputError, match="takes at most 2 rows"):
        engine.generate_batch(["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(PrefixportError, match="max_batch 3 exceeds the TensorRT engine's 2 rows"):
        Scheduler(engine, max_batch=3)
    batch = engine.generate_batch(["Un café", "Hello"], ["soft", None], max_new_tokens=40, stop_token_ids=[])
    want = free.generate_batch(["Un café", "Hello"], ["soft", None], max_new_tokens=40, stop_token_ids=[])
    assert [r.token_ids for r in batch] == [r.token_ids for r in want]  # limits refuse, they never change a result
    assert max(c.batch for c in engine.backend.calls) <= 2 and max(c.seq for c in engine.backend.calls) <= 8


def test_limits_are_checked_against_the_model(manifest):
    assert Limits.for_manifest(manifest).context == manifest.max_positions
    with pytest.raises(InputError, match="exceeds the model's context"):
        Limits.for_manifest(manifest, max_past=manifest.max_positions)
    with pytest.raises(InputError, match="must not exceed max_past"):
        Limits.for_manifest(manifest, max_past=10, max_seq=11)
