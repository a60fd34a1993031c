"""Running prepared requests and comparing two runs exactly (tokens and the logits behind them).
Torch-free: the integration tests use these too, on real exports."""

from __future__ import annotations

from typing import Any

import numpy as np

from prefixport.runtime import CacheSettings, Engine, GenerationResult
from prefixport.runtime.generation import DecodeBatch, RowRequest
from prefixport.runtime.kv_cache import KVCache


def run(engine: Engine, prompt: Any, adapter: str | None = None, n: int = 6, **settings: Any) -> RowRequest:
    """A finished request alone (greedy, no stop ids by default) with the logits each token was chosen from."""
    request = engine.prepare(prompt, adapter=adapter, max_new_tokens=n, **{"stop_token_ids": [], **settings})
    request.logits = []
    for _ in engine.run_rows([request]):
        pass
    return request


def assert_same(got: RowRequest, want: RowRequest) -> None:
    """Same tokens, and bitwise the same logits at every step."""
    assert got.tokens == want.tokens
    assert got.logits is not None and want.logits is not None
    for a, b in zip(got.logits, want.logits, strict=True):
        np.testing.assert_array_equal(a, b)


def batch_twice_as_plain(cached: Engine, plain: Engine, prompts: list[str], adapters: list[str | None]
                         ) -> list[GenerationResult]:
    """One generate_batch on both engines, twice (the second round hits what the first stored):
    every row's tokens and logprobs the same; the cached engine's last results."""
    for _ in range(2):
        got = cached.generate_batch(prompts, adapters, max_new_tokens=5, stop_token_ids=[], logprobs=3)
        want = plain.generate_batch(prompts, adapters, max_new_tokens=5, stop_token_ids=[], logprobs=3)
        for g, w in zip(got, want, strict=True):
            assert g.token_ids == w.token_ids and g.logprobs is not None and w.logprobs is not None
            assert [(x.logprob, x.top) for x in g.logprobs] == [(x.logprob, x.top) for x in w.logprobs]
    return got


def mixed_run(engine: Engine, plan: list[tuple[int, Any, str | None, int]],
              settings: CacheSettings = CacheSettings(), prefill_budget: int | None = None,
              prompt_cache: bool = False) -> tuple[list[RowRequest], KVCache, set[int]]:
    """The plan's requests ((step, prompt, adapter, max_new_tokens)) in one DecodeBatch, joining at
    their steps and leaving when done (prompts prefilled in chunks with `prefill_budget`; the
    engine's prompt cache used with `prompt_cache`): the finished requests in plan order, the
    cache, and every cache row the run used."""
    m = engine.manifest
    cache = KVCache(engine.backend, m, settings, engine.context_limit)
    batch = DecodeBatch(engine.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0,
                        engine.prompt_cache if prompt_cache else None, prefill_budget=prefill_budget)
    requests = [engine.prepare(p, adapter=a, max_new_tokens=n, stop_token_ids=[]) for _, p, a, n in plan]
    for r in requests:
        r.logits = []
    index = {id(r): i for i, r in enumerate(requests)}
    step, waiting, rows_seen = 0, list(range(len(plan))), set()
    while waiting or batch:
        due = [i for i in waiting if plan[i][0] <= step]
        joined = batch.join([requests[i] for i in due]) if due else 0
        waiting = [i for i in waiting if i not in due[:joined]]
        rows_seen |= set(cache.in_use())
        if batch:
            batch.sample()
            batch.advance()
            waiting = [index[id(r)] for r in batch.take_preempted()] + waiting  # preempted: first in line
        step += 1
    return requests, cache, rows_seen


def stop_string_in(text: str) -> str:
    """A 3-character piece of `text` (from its middle where it can), without a replacement
    character: a stop string that generation will meet (first where `text.index` says)."""
    starts = [*range(len(text) // 3, len(text) - 2), *range(len(text) // 3)]
    for start in starts:
        if "\ufffd" not in text[start : start + 3]:
            return text[start : start + 3]
    raise AssertionError(f"no stop string to take from {text!r}")
