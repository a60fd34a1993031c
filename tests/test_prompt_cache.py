"""The prompt cache: hits and misses bitwise equal to the same requests without it, for every
adapter kind; the byte budget; adapters re-registered; threads and the server."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from prefixport.adapters import convert_checkpoint, load_bundle, save_bundle
from prefixport.adapters.bundle import make_bundle
from prefixport.runtime import Engine
from prefixport.runtime.prompt_cache import BLOCK_TOKENS, MIN_REST

from .conftest import ADAPTER_VARIANTS
from .helpers import hf_greedy
from .unit.runs import assert_same, batch_twice_as_plain, run

SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, name the "
          "parcel's city when you know it, and never invent tracking numbers. Customers write in English, "
          "French or German; answer in their language. ")  # 179 tokens on the tiny models' tokenizer
QUESTIONS = ["Where is parcel 12?", "Wo ist mein Paket?", "Où est le colis 7 ?", "Where is parcel 12?"]


@pytest.fixture(scope="module")
def pair(llama_cache_pair):
    """The tiny Llama export twice, with and without a prompt cache (conftest.py)."""
    return llama_cache_pair


@pytest.mark.parametrize("adapter", [None, *ADAPTER_VARIANTS])
def test_hits_and_misses_equal_no_cache_bitwise(pair, adapter):
    cached, plain = pair
    before = cached.stats().prompt_cache.cached_tokens
    found = []
    for question in QUESTIONS:
        got = run(cached, SYSTEM + question, adapter)
        assert_same(got, run(plain, SYSTEM + question, adapter))
        found.append(got.cached_tokens)
    system_blocks = len(cached.encode(SYSTEM)) // BLOCK_TOKENS * BLOCK_TOKENS
    assert found[0] == 0 or adapter is None  # the first use of this adapter misses (None: an earlier test ran)
    assert all(n >= system_blocks for n in found[1:]), found
    assert found[3] > found[1] or found[3] == len(cached.encode(SYSTEM + QUESTIONS[3])) - MIN_REST
    assert cached.stats().prompt_cache.cached_tokens - before == sum(found)
    assert plain.stats().prompt_cache is None


def test_every_prompt_length_is_exact(pair):
    """Prompts of every length from 30 to 140 tokens, sharing their starts: whatever the cache
    holds, the rest's prefill ends as the uncached one does (a run of 32k + 1 rows rounds its last
    row otherwise on these models), leaves at least two tokens, and each output is bitwise plain."""
    cached, plain = pair
    base = cached.encode(SYSTEM)[:140]
    for adapter in (None, "prompt", "prefix"):
        found = []
        for length in range(30, 141):
            got = run(cached, base[:length], adapter, 3)
            assert_same(got, run(plain, base[:length], adapter, 3))
            assert length - got.cached_tokens >= MIN_REST
            found.append(got.cached_tokens)
        assert sum(n > 0 for n in found) > 80, found


def test_a_batch_of_hits_and_misses_equals_no_cache(pair):
    """One generate_batch: repeated and new prompts over every adapter, all rows bitwise plain."""
    cached, plain = pair
    prompts = [SYSTEM + q for q in ("Hello?", "Bonjour ?", "Hello?", "Hallo?", "Bonjour ?")]
    adapters = [None, "prompt", "prefix", "ptuning-lstm", "prompt"]
    got = batch_twice_as_plain(cached, plain, prompts, adapters)
    assert all(g.cached_tokens > 0 for g in got)


def test_a_re_registered_adapter_never_hits_its_old_entries(pair, tiny_adapters, tmp_path):
    cached, plain = pair
    prompt = SYSTEM + "Which city?"
    first = run(cached, prompt, "prefix")
    assert run(cached, prompt, "prefix").cached_tokens > 0
    # the same name, other tensors (same kind and length): a fresh chain, then hits on that one
    file = tiny_adapters("llama") / "prefix.safetensors"
    old = load_bundle(file)
    other = make_bundle(name="prefix", kind="prefix", fingerprint=old.metadata["fingerprint"],
                        peft_type=old.metadata["peft_type"],
                        tensors={k: v * 0.5 for k, v in old.tensors.items()})
    path = save_bundle(other, tmp_path / "prefix-2.safetensors")
    assert cached.stats().prompt_cache.by_adapter["prefix"] > 0
    cached.add_adapter("prefix", path)
    assert "prefix" not in cached.stats().prompt_cache.by_adapter  # the old chain was dropped
    plain.add_adapter("prefix-2", path)
    got = run(cached, prompt, "prefix")
    assert got.cached_tokens == 0
    assert_same(got, run(plain, prompt, "prefix-2"))
    assert got.tokens != first.tokens or any(not np.array_equal(a, b) for a, b in zip(got.logits, first.logits))
    assert run(cached, prompt, "prefix").cached_tokens > 0
    cached.remove_adapter("prefix")
    assert "prefix" not in cached.stats().prompt_cache.by_adapter
    cached.add_adapter("prefix", file)
    plain.remove_adapter("prefix-2")


def test_eviction_keeps_the_budget_and_the_outputs(tiny_export, pair):
    _, plain = pair
    engine = Engine.load(tiny_export("llama"), prompt_cache_bytes=3 * _block_bytes(plain))
    prompts = [f"{i}. {SYSTEM}" for i in range(4)]  # different from the first token: nothing shared
    for prompt in prompts * 2:
        assert_same(run(engine, prompt, None), run(plain, prompt, None))
        stats = engine.stats().prompt_cache
        assert 0 < stats.bytes <= stats.budget_bytes
    assert stats.evicted_blocks > 0 and stats.blocks == 3
    engine.close()


def test_blocks_a_request_holds_are_not_evicted(tiny_export, pair):
    engine = Engine.load(tiny_export("llama"), prompt_cache_bytes=2 * _block_bytes(pair[1]))
    cache = engine.prompt_cache
    a, b = (engine.encode(f"{i}. {SYSTEM}")[: 2 * BLOCK_TOKENS + MIN_REST] for i in (1, 2))
    run(engine, a, None)
    assert cache.peek(a, None) == 2 * BLOCK_TOKENS
    hit = cache.lookup(a, None)  # as a request does between its lookup and its copy: a's blocks pinned
    run(engine, b, None)  # b's blocks go over the budget: b's own are evicted, not a's
    assert cache.peek(a, None) == 2 * BLOCK_TOKENS and cache.peek(b, None) == 0
    cache.release(hit)
    run(engine, b, None)
    assert cache.peek(b, None) == 2 * BLOCK_TOKENS and cache.peek(a, None) == 0
    assert cache.stats().bytes <= cache.budget_bytes
    engine.close()


def test_threads_share_one_cache(pair):
    cached, plain = pair
    jobs = [(SYSTEM + q, a) for q in QUESTIONS for a in (None, "prompt", "prefix-projection")] * 2
    with cf.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda job: run(cached, *job), jobs))
    for (prompt, adapter), g in zip(jobs, got):
        assert_same(g, run(plain, prompt, adapter))
    assert sum(g.cached_tokens > 0 for g in got) >= len(jobs) // 2


@pytest.mark.parametrize("adapter", [None, "soft", "prefix"])
def test_the_sliding_window_model_is_exact(tiny_export, tiny_adapters, adapter):
    """Mistral's window (8) is far shorter than the cached prefix."""
    engines = [Engine.load(tiny_export("mistral"), prompt_cache_bytes=size) for size in (2**26, 0)]
    for engine in engines:
        engine.add_adapter("soft", tiny_adapters("mistral") / "prompt.safetensors")
        engine.add_adapter("prefix", tiny_adapters("mistral") / "prefix.safetensors")
    cached, plain = engines
    for question in QUESTIONS:
        assert_same(run(cached, SYSTEM + question, adapter, 12), run(plain, SYSTEM + question, adapter, 12))
    assert cached.stats().prompt_cache.cached_tokens > 0
    for engine in engines:
        engine.close()


def test_a_copy_mode_export_is_exact(plain_export):
    """`--no-optimize` graphs copy their present back after each run: cached blocks go in the same way."""
    cached, plain = Engine.load(plain_export), Engine.load(plain_export, prompt_cache_bytes=0)
    assert cached.manifest.cache == "copy"
    for question in QUESTIONS:
        assert_same(run(cached, SYSTEM + question, None), run(plain, SYSTEM + question, None))
    assert cached.stats().prompt_cache.hits == 3


def test_the_server_reports_cached_tokens(served, pair):
    engine, url, _, _ = served
    _, plain = pair
    body = {"model": "prompt", "prompt": SYSTEM + "Where is parcel 9?", "max_tokens": 6, "temperature": 0}
    want = plain.generate(body["prompt"], adapter="prompt", max_new_tokens=6).text
    with httpx.Client(base_url=url, timeout=60) as client:
        first = client.post("/v1/completions", json=body).json()
        with cf.ThreadPoolExecutor(4) as pool:
            again = list(pool.map(lambda _: client.post("/v1/completions", json=body).json(), range(4)))
        streamed = client.post("/v1/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
        chats = [client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                            "messages": messages})
                 for _ in range(2)]
        metrics = client.get("/metrics").text
    assert first["choices"][0]["text"] == want
    assert all(r["choices"][0]["text"] == want for r in again)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert all(0 < r["usage"]["prompt_tokens_details"]["cached_tokens"] <= prompt_tokens - MIN_REST for r in again)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert chats[1].json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(engine.encode(SYSTEM)) // 2
    assert chats[1].json()["choices"] == chats[0].json()["choices"]
    for name in ("prefixport_prompt_cache_cached_tokens_total", "prefixport_prompt_cache_hit_rate",
                 "prefixport_prompt_cache_bytes", "prefixport_prompt_cache_evicted_blocks_total"):
        assert name in metrics


def _block_bytes(engine: Engine) -> int:
    from prefixport.runtime.kv_cache import slot_bytes

    return BLOCK_TOKENS * slot_bytes(engine.manifest)


@pytest.mark.slow
def test_the_default_model_is_exact_and_equals_peft(default_export, default_hf, tmp_path):
    """The real default model with the demo's PEFT checkpoints (a soft prompt and a prefix): hits
    bitwise equal to no cache, and their greedy tokens equal to PEFT's own."""
    from . import peft_helpers as ph

    demo = Path(__file__).parent.parent / "demo" / "adapters"
    engines = [Engine.load(default_export, prompt_cache_bytes=size) for size in (2**28, 0)]
    for name in ("json-prompt", "date-prefix"):
        convert_checkpoint(demo / name, default_export, name=name, out=tmp_path / f"{name}.safetensors")
        for engine in engines:
            engine.add_adapter(name, tmp_path / f"{name}.safetensors")
    cached, plain = engines
    model, _ = default_hf
    for adapter in (None, "json-prompt", "date-prefix"):
        for question in QUESTIONS[:3]:
            ids = cached.encode(SYSTEM * 3 + question)
            got = run(cached, ids, adapter, 8)
            assert_same(got, run(plain, ids, adapter, 8))
        assert got.cached_tokens >= len(cached.encode(SYSTEM * 3)) - BLOCK_TOKENS
        want = (ph.peft_greedy_choices(ph.load_reference(model, demo / adapter), ids, got.tokens) if adapter
                else hf_greedy(model, ids, 8, stop_at_eos=False))
        assert got.tokens == want, adapter


@pytest.mark.gpu
def test_device_copies_with_offsets():
    """cuda.copy_slots (the GPU backends' copy_into) at slot offsets, both ways, against numpy."""
    from prefixport.errors import PrefixportError
    from prefixport.runtime import cuda

    try:
        buffers = cuda.DeviceBuffers()
    except PrefixportError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((3, 2, 40, 8)).astype(np.float32)
    block = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    device = buffers.from_numpy(cache)
    buffers.copy_into(device, block, row=1, at=30)  # host -> device at slot 30 of row 1
    want = cache.copy()
    want[1, :, 30:37] = block[0]
    np.testing.assert_array_equal(device.to_numpy(), want)
    out = buffers.zeros((4, 2, 7, 8), np.dtype(np.float32))
    buffers.copy_into(out, device[1:2], row=2, slots=7, src_at=30)  # device -> device from slot 30
    np.testing.assert_array_equal(out.to_numpy()[2], want[1, :, 30:37])
    np.testing.assert_array_equal(out.to_numpy()[[0, 1, 3]], 0)


def test_rows_sharing_a_prefill_end_as_alone(pair):
    """Padded prefill runs: rows of 33 positions, and 6 virtual + 59 (32k + 1, which round their
    last row otherwise in a longer run on this model), beside longer ones still give what they
    give alone."""
    _, plain = pair
    ids = plain.encode(SYSTEM)
    prompts = [ids[:33], ids[:40], ids[:59], ids[:50], ids[:64]]
    adapters = [None, None, "prompt", "prompt", None]
    requests = [plain.prepare(p, adapter=a, max_new_tokens=3, stop_token_ids=[]) for p, a in zip(prompts, adapters)]
    for r in requests:
        r.logits = []
    for _ in plain.run_rows(requests):
        pass
    for prompt, adapter, got in zip(prompts, adapters, requests):
        assert_same(got, run(plain, prompt, adapter, 3))
