"""Chunked prefill (docs/design.md, "Chunked prefill"): a prompt prefilled over several steps under
a budget, beside rows that keep decoding, gives bitwise what it gives alone in one run, for every
adapter kind, with and without the prompt cache; and no step holds the running rows back by more
than the budget (counted in tokens per step, not seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.runtime import Engine, Scheduler
from prefixport.runtime.generation import DecodeBatch
from prefixport.runtime.kv_cache import CacheSettings, KVCache
from prefixport.runtime.prompt_cache import next_cut

from .conftest import ADAPTER_VARIANTS
from .unit.runs import assert_same, mixed_run, run

TEXT = ("The harbour master kept a ledger of every ship that came into port: its name, its flag, its cargo, "
        "the day it arrived and the day it left. Over forty years the ledger grew into twelve volumes, and "
        "the town's children learned to read from it, tracing the names of ships from Lisbon, Bergen, "
        "Valparaiso and Yokohama. ") * 6


@pytest.fixture(scope="module")
def llama(llama_cache_pair):
    """The tiny Llama export (its attention rounds the last row of a run of 32k + 1 rows otherwise),
    with and without a prompt cache."""
    return llama_cache_pair


def test_the_chunk_rule_keeps_runs_ending_alike():
    """Every cut is even, the last chunk starts at a multiple of the run's period, and chunks keep
    to the budget except the last (by less than the period) and a soft prompt's first."""
    for whole in range(1, 1100):
        for budget in (1, 16, 50, 128):
            cuts = [0]
            while cuts[-1] < whole:
                cuts.append(next_cut(cuts[-1], whole, budget))
            period = 1 << min(((whole - 1) & -(whole - 1)).bit_length(), 10) if whole > 1 else 1
            assert all(c % 2 == 0 for c in cuts[1:-1]) and cuts[-2] % period == 0, (whole, budget, cuts)
            sizes = [b - a for a, b in zip(cuts, cuts[1:])]
            assert all(s <= max(budget, 2) for s in sizes[:-1]) and sizes[-1] < max(budget, 2) + period
    assert next_cut(0, 200, 16, least=21) == 22  # a soft prompt's 20 virtual tokens and one more: one chunk


@pytest.mark.parametrize("adapter", [None, *ADAPTER_VARIANTS])
def test_every_prompt_length_chunked_is_bitwise_one_run(llama, adapter):
    """Prompts of 30 to 140 tokens prefilled in chunks of 16 and 50 rows (the last chunk where the
    rule puts it): each row's logits and tokens bitwise those of its one-run prefill alone."""
    _, plain = llama
    base = plain.encode(TEXT)[:140]
    lengths = range(30, 141) if adapter in (None, "prompt") else range(30, 141, 7)
    for budget in (16, 50):
        plan = [(0, base[:n], adapter, 3) for n in lengths]
        requests, _, _ = mixed_run(plain, plan, CacheSettings(max_rows=4), prefill_budget=budget)
        for (_, prompt, _, _), got in zip(plan, requests):
            assert_same(got, run(plain, prompt, adapter, 3))


@pytest.mark.parametrize("adapter", [None, "prompt", "prefix"])
def test_chunks_after_a_prompt_cache_hit_are_exact(llama, adapter):
    """The cache gives a prompt's start, chunks compute the rest: bitwise the uncached one run."""
    cached, plain = llama
    ids = plain.encode(TEXT)
    plan = [(0, ids[:120], adapter, 4), (0, ids[:181], adapter, 4), (3, ids[:240], adapter, 4),
            (8, ids[:97], adapter, 4)]
    requests, _, _ = mixed_run(cached, plan, prefill_budget=24, prompt_cache=True)
    assert any(r.cached_tokens for r in requests)
    for (_, prompt, _, _), got in zip(plan, requests):
        assert_same(got, run(plain, prompt, adapter, 4))


def test_a_long_prompt_never_holds_running_rows_back_more_than_the_budget(llama):
    """Three rows decode; a prompt of 200 tokens joins. At every step each running row gains
    exactly one token, and the step's prefill computes at most the budget (its last chunk at most
    the budget plus the run's period), so the long prompt comes in over many steps."""
    _, plain = llama
    m = plain.manifest
    budget = 16
    cache = KVCache(plain.backend, m, CacheSettings(), plain.context_limit)
    batch = DecodeBatch(plain.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0,
                        prefill_budget=budget)
    short = [plain.prepare(p, max_new_tokens=60, stop_token_ids=[]) for p in ("Ships:", "Cargo: tea", "Port")]
    long_ids = plain.encode(TEXT)[:200]  # the tiny model's context is 256
    long = plain.prepare(long_ids, max_new_tokens=5, stop_token_ids=[])
    for r in [*short, long]:
        r.logits = []
    batch.join(short)
    steps, prefilled = 0, []
    while not long.tokens:
        before = [len(r.tokens) for r in short]
        batch.sample()
        if steps == 2:
            assert batch.join([long]) == 1  # joins while the three decode
        if steps >= 2:
            assert [len(r.tokens) for r in short] == [n + 1 for n in before]  # one token each, every step
        batch.advance()
        if steps >= 2:
            prefilled.append(batch.prefilled)
        steps += 1
    whole = len(long_ids)
    period = 1 << min(((whole - 1) & -(whole - 1)).bit_length(), 10)
    chunks = [n for n in prefilled if n]
    assert all(n <= budget for n in chunks[:-1]) and chunks[-1] < budget + period
    assert sum(chunks) == whole and len(chunks) >= whole // budget - 1
    while batch:
        batch.sample()
        batch.advance()
    for r, prompt in zip([*short, long], ["Ships:", "Cargo: tea", "Port", long_ids]):
        assert_same(r, run(plain, prompt, None, len(r.tokens)))


def test_the_scheduler_keeps_decoding_while_a_long_prompt_comes_in(llama):
    """Through the Scheduler: two short requests decoding when a 200-token prompt arrives finish
    their 12 tokens before its first token (it comes in 8 tokens a step), all as alone."""
    _, plain = llama
    long_ids = plain.encode(TEXT)[:200]
    jobs = [("Ships:", 12), ("Cargo: tea", 12), (long_ids, 4)]
    alone = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in jobs]
    with Scheduler(plain, max_batch=4, prefill_budget=8) as scheduler:
        tickets = [scheduler.submit(p, max_new_tokens=n, stop_token_ids=[]) for p, n in jobs[:2]]
        for ticket in tickets:
            next(e for e in ticket.events() if e.token_ids)  # decoding
        tickets.append(scheduler.submit(long_ids, max_new_tokens=4, stop_token_ids=[]))
        assert [t.result().token_ids for t in tickets] == alone
    assert max(t.token_times[-1] for t in tickets[:2]) <= tickets[2].token_times[0]


@pytest.mark.slow
def test_the_default_model_chunked_is_bitwise_one_run(default_export, tmp_path):
    """The real default model (its attention's period is 128 rows) with a soft prompt and a
    prefix (PEFT checkpoints from demo/): prompts of 257, 300 and 385 tokens in chunks of 64 beside
    each other, each bitwise its one-run prefill alone."""
    from pathlib import Path

    from prefixport.adapters import convert_checkpoint

    engine = Engine.load(default_export, prompt_cache_bytes=0)
    demo = Path(__file__).parent.parent / "demo" / "adapters"
    for name in ("json-prompt", "date-prefix"):
        convert_checkpoint(demo / name, default_export, name=name, out=tmp_path / f"{name}.safetensors")
        engine.add_adapter(name, tmp_path / f"{name}.safetensors")
    ids = engine.encode(TEXT)
    plan = [(0, ids[:257], None, 4), (0, ids[:300], "json-prompt", 4), (1, ids[:385], "date-prefix", 4)]
    requests, _, _ = mixed_run(engine, plan, prefill_budget=64)
    for (_, prompt, adapter, n), got in zip(plan, requests):
        assert_same(got, run(engine, prompt, adapter, n))
    engine.close()


def test_default_chat_requests_without_max_tokens_are_all_served(tiny_export):
    """A server whose KV budget holds about 600 slots: 8 concurrent chat requests without
    max_tokens (each may reach the rest of the 256-position context) all run to the context's end,
    none refused for room: rows hold what they use and are preempted and resumed as they outgrow
    the budget; each answer equals the same request alone."""
    import concurrent.futures as cf

    import httpx

    from prefixport.runtime.kv_cache import slot_bytes
    from prefixport.server import ServerSettings, create_app

    from .helpers import running

    probe = Engine.load(tiny_export("llama"), prompt_cache_bytes=0)
    per_slot = slot_bytes(probe.manifest)
    probe.close()
    engine = Engine.load(tiny_export("llama"), cache_settings=CacheSettings(budget_mb=600 * per_slot / 2**20))
    questions = [f"Tell me about ship number {i} in the harbour ledger." for i in range(8)]

    def ask(url: str, question: str) -> dict:
        body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
                "ignore_eos": True}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with running(create_app(engine, ServerSettings(model_name="tiny", max_batch=8, prefill_budget=16))) as url:
        with cf.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda q: ask(url, q), questions))
        alone = [ask(url, q) for q in questions[:3]]
        preemptions = sum(c.preemptions for c in engine.stats().kv_cache.caches)
    engine.close()
    assert all(r["choices"][0]["finish_reason"] == "length" for r in together)
    assert all(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 256 for r in together)
    assert [r["choices"][0]["message"]["content"] for r in together[:3]] == [
        r["choices"][0]["message"]["content"] for r in alone]
    assert preemptions > 0
