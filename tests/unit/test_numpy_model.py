"""The numpy model itself, through the graph contract: what the other unit tests lean on (each
position computed alike whatever the call) and that it is a model, not a stub (its outputs depend
on the history, the soft prompt and the prefix)."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.runtime.generation import graph_inputs
from prefixport.runtime.kv_cache import CacheSettings, KVCache

from .numpy_model import NumpyBackend


def _cache(backend: NumpyBackend, rows: int) -> KVCache:
    cache = KVCache(backend, backend.manifest, CacheSettings(max_rows=rows), 128)
    for _ in range(rows):
        cache.admit(100)
    cache.reserve(rows, 100)
    return cache


def _run(backend: NumpyBackend, cache: KVCache, start: int, rows: list[list[int]], embeds: np.ndarray,
         every: bool = False) -> np.ndarray:
    stop = start + len(rows)
    inputs = graph_inputs(rows, embeds, embeds.shape[1], cache.lengths[start:stop].copy(), every=every)
    logits = backend.run(inputs, *cache.bind(start, stop))
    cache.lengths[start:stop] += inputs["input_lengths"]
    return logits


def test_a_batch_of_rows_is_each_row_alone_and_a_prompt_cut_in_two_is_the_prompt(engine):
    backend = engine.backend
    m = engine.manifest
    rows = [[5, 9, 11, 3, 40, 41], [7, 8], [100, 3, 4, 5]]
    embeds = np.random.default_rng(0).standard_normal((3, 2, m.hidden_size)).astype(np.float32)
    together = _run(backend, _cache(backend, 3), 0, rows, embeds, every=True)
    for b, row in enumerate(rows):
        alone = _run(backend, _cache(backend, 1), 0, [row], embeds[b : b + 1], every=True)
        n = 2 + len(row)
        np.testing.assert_array_equal(together[b, :n], alone[0])
        cache = _cache(backend, 1)  # the soft prompt and one token, then the rest after that past
        first = _run(backend, cache, 0, [row[:1]], embeds[b : b + 1], every=True)
        rest = _run(backend, cache, 0, [row[1:]], np.zeros((1, 0, m.hidden_size), np.float32), every=True)
        np.testing.assert_array_equal(np.concatenate([first[0], rest[0]]), alone[0])


def test_outputs_depend_on_history_soft_prompt_and_prefix(engine):
    def last(prompt, adapter=None):
        request = engine.prepare(prompt, adapter=adapter, max_new_tokens=1, stop_token_ids=[])
        request.logits = []
        list(engine.run_rows([request]))
        return request.logits[0]

    ids = engine.encode("The quick brown fox")
    base = last(ids)
    assert not np.array_equal(base, last([(ids[0] + 1) % engine.manifest.vocab_size, *ids[1:]]))  # the first token
    assert not np.array_equal(base, last(ids, "soft"))
    assert not np.array_equal(base, last(ids, "prefix"))
    assert not np.array_equal(last(ids, "prefix"), last(ids, "prefix3"))


def test_the_backend_refuses_what_the_graph_refuses(engine):
    backend = engine.backend
    m = engine.manifest
    cache = _cache(backend, 2)
    none = np.zeros((2, 0, m.hidden_size), np.float32)
    _run(backend, cache, 0, [[1, 2], [3, 4]], none)
    with pytest.raises(ValueError, match="batch 1 only"):  # several new positions after a past, batch 2
        _run(backend, cache, 0, [[1, 2], [3, 4]], none)
    inputs = graph_inputs([[1] * (cache.capacity + 1)], none[:1], 0, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="capacity"):
        backend.run(inputs, *cache.bind(0, 1))
