"""The slot KV cache: rows join and leave without copies, bitwise batch invariance, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.errors import ContextLengthError, ExportFolderError
from prefixport.runtime import Engine
from prefixport.runtime.generation import DecodeBatch
from prefixport.runtime.kv_cache import CacheSettings, KVCache, slot_bytes

from .unit.runs import assert_same, mixed_run, run

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Numbers: 0 1 2 3", "Un café, s'il vous plaît.",
           "Prefix tuning learns keys", "Grüße aus München!"]


def assert_rows_bitwise_alone(engine: Engine, plan, requests) -> None:
    for (_, prompt, adapter, n), got in zip(plan, requests):
        want = run(engine, prompt, adapter, n)
        assert got.tokens == want.tokens, (prompt, adapter)
        assert len(got.logits) == len(want.logits) == n
        assert_same(got, want)


@pytest.fixture(scope="module")
def mistral(tiny_export, tiny_adapters):
    """The tiny sliding-window model (window 8), with a soft prompt and a prefix registered."""
    engine = Engine.load(tiny_export("mistral"))
    folder = tiny_adapters("mistral")
    engine.add_adapter("soft", folder / "prompt.safetensors")
    engine.add_adapter("prefix", folder / "prefix.safetensors")
    yield engine
    engine.close()


PLAN = [  # joins at steps 0, 0, 0, 3, 5, 9; lengths differ so rows leave mid-run and free rows are reused
    (0, PROMPTS[0], None, 12), (0, PROMPTS[1], "soft", 30), (0, PROMPTS[2], None, 5),
    (3, PROMPTS[3], "prefix", 20), (5, PROMPTS[4], "soft", 90), (9, PROMPTS[5], None, 7),
]


def test_mixed_batch_is_bitwise_alone_on_the_sliding_window_model(mistral):
    """Different adapters, lengths, joins and leaves mid-run, and capacity growth mid-generation
    (one row runs past 64 slots): every row's logits and tokens are bitwise its own alone."""
    requests, cache, _ = mixed_run(mistral, PLAN, CacheSettings())
    assert cache.capacity > 64 and cache.grows >= 2, "the capacity grew during the run"
    assert_rows_bitwise_alone(mistral, PLAN, requests)


def test_a_row_that_leaves_takes_the_last_row_and_the_freed_row_is_reused(mistral):
    """Rows stay packed from row 0 (design.md, "Chunked prefill"): the last row moves down into a
    row that leaves, in the buffers already there, and decode steps run over the rows in use alone."""
    m = mistral.manifest
    cache = KVCache(mistral.backend, m, CacheSettings(), mistral.context_limit)
    batch = DecodeBatch(mistral.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0)
    reqs = [mistral.prepare(p, max_new_tokens=n, stop_token_ids=[]) for p, n in zip(PROMPTS, (2, 6, 6))]
    assert batch.join(reqs) == 3 and cache.in_use() == [0, 1, 2]
    buffers = [id(b) for b in cache.buffers]
    for _ in range(2):
        batch.sample()
        batch.advance()
    assert cache.in_use() == [0, 1]  # row 0 left; the last row moved down into it
    assert batch.rows[0] is reqs[2] and batch.rows[1] is reqs[1]
    assert [id(b) for b in cache.buffers] == buffers
    for _ in range(3):  # the freed row is not computed: it never grows
        batch.sample()
        batch.advance()
        assert cache.lengths[2] == 0
    late = mistral.prepare(PROMPTS[3], max_new_tokens=3, stop_token_ids=[])
    assert batch.join([late]) == 1 and cache.in_use() == [0, 1, 2]  # the freed row is taken again


def test_cache_bytes_are_the_formula(mistral):
    m = mistral.manifest
    assert slot_bytes(m) == 2 * m.num_layers * m.num_kv_heads * m.head_dim * np.dtype(m.dtype).itemsize
    cache = KVCache(mistral.backend, m, CacheSettings(), mistral.context_limit)
    batch = DecodeBatch(mistral.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0)
    batch.join([mistral.prepare(p, max_new_tokens=4) for p in PROMPTS[:3]])
    held = sum(b.nbytes for b in cache.buffers)  # the numpy buffers themselves: nothing hidden
    assert held == cache.nbytes == cache.rows * cache.capacity * slot_bytes(m)
    assert mistral.stats().kv_cache.bytes >= 0


def test_capacity_grows_geometrically(mistral):
    m = mistral.manifest
    cache = KVCache(mistral.backend, m, CacheSettings(), 10_000)
    cache.admit(1000)
    sizes = []
    for length in range(1, 1000, 7):
        cache.reserve(1, length)
        sizes.append(cache.capacity)
    assert sorted(set(sizes)) == [64, 128, 256, 512, 1024]  # one copy per doubling


def test_load_over_the_budget_waits_and_still_matches(mistral):
    """A budget for two rows of these requests: six requests go through two at a time, each
    bitwise as alone, and the cache never exceeds the budget."""
    need = max(len(mistral.encode(p)) for p in PROMPTS) + 40
    budget_mb = 2 * need * slot_bytes(mistral.manifest) / 2**20
    plan = [(0, p, None, 40) for p in PROMPTS]
    requests, cache, _ = mixed_run(mistral, plan, CacheSettings(budget_mb=budget_mb))
    assert cache.nbytes <= budget_mb * 2**20 and cache.rows <= 2
    assert_rows_bitwise_alone(mistral, plan, requests)


def test_generate_batch_beyond_max_rows(tiny_export):
    engine = Engine.load(tiny_export("llama"), cache_settings=CacheSettings(max_rows=2))
    batch = engine.generate_batch(PROMPTS, max_new_tokens=6)
    assert [r.token_ids for r in batch] == [engine.generate(p, max_new_tokens=6).token_ids for p in PROMPTS]
    assert all(c.rows <= 2 for c in engine.stats().kv_cache.caches)


def test_a_request_over_the_budget_is_refused_before_any_work(tiny_export):
    engine = Engine.load(tiny_export("llama"), cache_settings=CacheSettings(budget_mb=0.01))  # 10 KB: ~20 slots here
    with pytest.raises(ContextLengthError, match="KV cache"):
        engine.generate(PROMPTS[0], max_new_tokens=100)
    assert engine.stats().kv_cache.bytes == 0
    engine = Engine.load(tiny_export("llama"), cache_settings=CacheSettings(max_context=16))
    with pytest.raises(ContextLengthError, match="KV cache's context of 16"):
        engine.generate(PROMPTS[0], max_new_tokens=100)


def test_an_old_export_is_refused_with_a_re_export_hint(tiny_export, tmp_path):
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_export("llama"), folder)
    manifest = json.loads((folder / "prefixport.json").read_text())
    manifest["format_version"] = 2
    (folder / "prefixport.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportFolderError, match="re-export"):
        Engine.load(folder)


@pytest.mark.slow
def test_mixed_batch_is_bitwise_alone_on_the_default_model(default_export, tmp_path):
    """The real default model with a soft prompt and a prefix (PEFT checkpoints from demo/)."""
    from pathlib import Path

    from prefixport.adapters import convert_checkpoint

    engine = Engine.load(default_export)
    demo = Path(__file__).parent.parent / "demo" / "adapters"
    for name in ("json-prompt", "date-prefix"):
        convert_checkpoint(demo / name, default_export, name=name, out=tmp_path / f"{name}.safetensors")
        engine.add_adapter(name, tmp_path / f"{name}.safetensors")
    plan = [(0, PROMPTS[0], None, 10), (0, PROMPTS[1], "json-prompt", 24), (2, PROMPTS[3], "date-prefix", 12),
            (4, PROMPTS[4], None, 70), (6, PROMPTS[5], "json-prompt", 6)]
    requests, cache, _ = mixed_run(engine, plan, CacheSettings())
    assert cache.capacity > 64
    assert_rows_bitwise_alone(engine, plan, requests)


def test_a_copy_mode_export_joins_and_leaves_like_the_shared_one(plain_export):
    """`--no-optimize` (plain ONNX ops, the graph TensorRT builds from) writes its present into a
    scratch copied back after each run: a mixed run gives each row's tokens alone, with the
    scratch counted in the cache's bytes."""
    engine = Engine.load(plain_export)
    assert engine.manifest.cache == "copy"
    plan = [(0, PROMPTS[0], None, 9), (0, PROMPTS[1], None, 30), (2, PROMPTS[2], None, 70), (4, PROMPTS[3], None, 5)]
    requests, cache, _ = mixed_run(engine, plan, CacheSettings())
    for (_, prompt, adapter, n), got in zip(plan, requests):
        assert got.tokens == run(engine, prompt, adapter, n).tokens
    assert cache.capacity > 64
    assert cache.nbytes == 2 * cache.rows * cache.capacity * slot_bytes(engine.manifest)
