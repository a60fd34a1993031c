"""The runtime for services: mixed batches, the adapter store, sampling features, threads."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixport.errors import AdapterError, PrefixportError
from prefixport.runtime import Engine

from .conftest import ADAPTER_VARIANTS

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京", "Numbers: 0 1 2",
           "Prefix tuning learns keys", "Un café", "The lazy dog jumps over the quick brown fox again", "1000"]


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])  # gemma3: sliding-window layers
def served(request, tiny_export, tiny_adapters):
    """An engine with soft prompts and prefixes of different lengths registered."""
    arch = request.param
    work = tiny_adapters(arch)
    engine = Engine.load(tiny_export(arch))
    for variant in ADAPTER_VARIANTS:
        engine.add_adapter(variant, work / f"{variant}.safetensors")
    yield engine, work
    engine.close()


MIX = [None, "prompt", "prefix", "ptuning-lstm", "prefix-projection", None, "prefix", "prompt"]


def test_mixed_batch_rows_equal_rows_alone(served):
    engine, _ = served
    kwargs = dict(max_new_tokens=20, stop_token_ids=[])
    batch = engine.generate_batch(PROMPTS, adapters=MIX, **kwargs)
    for prompt, adapter, got in zip(PROMPTS, MIX, batch):
        alone = engine.generate(prompt, adapter=adapter, **kwargs)
        assert got.token_ids == alone.token_ids and got.text == alone.text and got.adapter == adapter
    assert len({tuple(r.token_ids) for r in batch}) > 4  # the adapters really differ


def test_rows_leave_the_batch_at_different_lengths(served):
    engine, _ = served
    lengths = [3, 20, 1, 9, 14, 2, 20, 7]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[]).token_ids
             for p, a, n in zip(PROMPTS, MIX, lengths)]
    stop = alone[1][5]  # row 1 also stops early, at a stop token
    batch = engine.generate_batch(PROMPTS, adapters=MIX, max_new_tokens=20, stop_token_ids=[stop])
    for got, ref, n in zip(batch, alone, lengths):
        cut = ref[: ref.index(stop) + 1] if stop in ref[:20] else ref
        assert got.token_ids[: len(cut)] == cut[: len(got.token_ids)]
    assert batch[1].finish_reason == "stop" and batch[1].token_ids[-1] == stop


def test_threads_with_mixed_adapters_equal_sequential_results(served):
    engine, _ = served
    jobs = [(PROMPTS[i % 8], MIX[(i * 3) % 8], dict(max_new_tokens=12, temperature=0.8, seed=i, stop_token_ids=[]))
            for i in range(24)]
    sequential = [engine.generate(p, adapter=a, **kw).token_ids for p, a, kw in jobs]
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=8) as pool:
            threaded = list(pool.map(lambda job: engine.generate(job[0], adapter=job[1], **job[2]).token_ids, jobs))
        assert threaded == sequential


def test_register_and_unregister_while_generating(served):
    engine, work = served
    stop = threading.Event()
    errors: list[Exception] = []

    def churn():
        i = 0
        while not stop.is_set():
            name = f"temp{i % 3}"
            engine.add_adapter(name, work / "prefix.safetensors")
            engine.remove_adapter(name)
            i += 1

    reference = engine.generate(PROMPTS[0], adapter="prefix", max_new_tokens=10, stop_token_ids=[]).token_ids
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: engine.generate(PROMPTS[0], adapter="prefix", max_new_tokens=10,
                                                              stop_token_ids=[]).token_ids, range(12)))
    finally:
        stop.set()
        thread.join()
    assert not errors and all(r == reference for r in results)


def test_request_keeps_its_adapter_when_unregistered_in_flight(served):
    engine, work = served
    engine.add_adapter("short-lived", work / "prompt.safetensors")
    expected = engine.generate(PROMPTS[2], adapter="short-lived", max_new_tokens=15, stop_token_ids=[]).text
    stream = engine.stream(PROMPTS[2], adapter="short-lived", max_new_tokens=15, stop_token_ids=[])
    pieces = iter(stream)
    first = next(pieces)
    engine.remove_adapter("short-lived")
    assert first + "".join(pieces) == expected
    with pytest.raises(AdapterError, match="no adapter named 'short-lived'"):
        engine.generate(PROMPTS[2], adapter="short-lived")


def test_eviction_under_a_small_budget_gives_the_same_results(served, tiny_export):
    engine, work = served
    expected = engine.generate_batch(PROMPTS, adapters=MIX, max_new_tokens=10, stop_token_ids=[])
    names = [a for a in MIX if a]
    smallest = min(engine.stats().adapters.adapters[n].bytes for n in names)
    small = Engine.load(engine.folder, adapter_budget_bytes=smallest)  # room for one adapter at most
    for name in set(names):
        small.add_adapter(name, work / f"{name}.safetensors")
    for _ in range(2):
        got = small.generate_batch(PROMPTS, adapters=MIX, max_new_tokens=10, stop_token_ids=[])
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    stats = small.stats()
    store = stats.adapters
    assert store.evictions > 0 and store.misses > 0 and store.hits >= 0
    assert store.resident <= 1 + sum(a.pinned for a in store.adapters.values())
    assert store.resident_bytes <= max(smallest, max(a.bytes for a in store.adapters.values()))
    assert {"rss_bytes", "peak_rss_bytes"} <= set(stats.memory)
    as_json = json.loads(json.dumps(stats.to_dict()))  # the typed counters serialise as plain JSON
    assert as_json["adapters"]["adapters"][names[0]]["bytes"] == store.adapters[names[0]].bytes
    assert as_json["speculative"]["draft"] is None and as_json["kv_cache"]["caches"]


def test_seeded_sampling_in_a_batch_is_reproducible(served):
    engine, _ = served
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=3, stop_token_ids=[])
    a = engine.generate_batch(PROMPTS, adapters=MIX, **kw)
    b = engine.generate_batch(PROMPTS, adapters=MIX, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids == engine.generate(PROMPTS[0], **kw).token_ids


def test_stop_strings_cut_exactly(served):
    engine, _ = served
    full = engine.generate(PROMPTS[3], max_new_tokens=30, stop_token_ids=[]).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    stream = engine.stream(PROMPTS[3], max_new_tokens=30, stop_token_ids=[], stop=[stop, "never-there"])
    deltas = list(stream)
    r = stream.result
    assert r.text == full[: full.index(stop)] and "".join(deltas) == r.text
    assert r.finish_reason == "stop" and len(r.token_ids) < 30
    [b] = engine.generate_batch([PROMPTS[3]], max_new_tokens=30, stop_token_ids=[], stop=[stop])
    assert b.text == r.text and b.token_ids == r.token_ids


def test_repetition_penalty_matches_transformers(served, tiny_model):
    engine, _ = served
    arch = engine.manifest.architecture
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch)).eval()
    model.generation_config.eos_token_id = None
    ids = engine.encode(PROMPTS[0])
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, repetition_penalty=1.5, pad_token_id=0)
    ours = engine.generate(ids, max_new_tokens=24, repetition_penalty=1.5, stop_token_ids=[]).token_ids
    assert ours == ref[0, len(ids):].tolist()
    if arch == "llama":  # (the tiny Gemma 3 repeats one token whatever the penalty)
        assert ours != engine.generate(ids, max_new_tokens=24, stop_token_ids=[]).token_ids


def test_cuda_device_needs_a_gpu(tiny_export):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present: covered by test_cuda_engine_matches_cpu")
    with pytest.raises(PrefixportError, match="needs onnxruntime-gpu and an NVIDIA GPU"):
        Engine.load(tiny_export("llama"), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and an NVIDIA GPU (none on this machine)")
def test_cuda_engine_matches_cpu(served):
    engine, work = served
    gpu = Engine.load(engine.folder, device="cuda")
    for name in ("prompt", "prefix"):
        gpu.add_adapter(name, work / f"{name}.safetensors")
    kw = dict(max_new_tokens=16, stop_token_ids=[])
    adapters = [None, "prompt", "prefix"]
    assert [r.token_ids for r in gpu.generate_batch(PROMPTS[:3], adapters=adapters, **kw)] == \
        [r.token_ids for r in engine.generate_batch(PROMPTS[:3], adapters=adapters, **kw)]
