"""LoRA and IA3 fed per row at run time (`export --lora`) on tiny models: PEFT's own forward is the
reference; a row without an adapter is bit for bit the export without --lora; a batch mixing every
adapter kind gives each row what it gives alone."""

from __future__ import annotations

import numpy as np
import pytest
from peft import IA3Config, LoraConfig
from transformers import AutoModelForCausalLM

from prefixport.adapters import convert_checkpoint
from prefixport.errors import AdapterError
from prefixport.runtime import CacheSettings, Engine

from . import peft_helpers as ph
from .conftest import ADAPTER_VARIANTS
from .unit.runs import assert_same, run

LOGITS_ATOL = 1e-4  # float32, tiny models: ONNX Runtime's kernels against PyTorch's
PROMPTS = ["The quick brown fox jumps over", "def add(a, b):", "Numbers: 0 1 2 3"]
LORAS = {  # name -> (config, architectures)
    "lora-all": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    "lora-qv-rs": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                     init_lora_weights=False),
    "lora-pattern": lambda: LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                       rank_pattern={"down_proj": 16}, alpha_pattern={"down_proj": 32},
                                       init_lora_weights=False),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
}


@pytest.fixture(scope="module")
def lora_llama(tmp_path_factory, tiny_model, tiny_export, tiny_adapters):
    """(engine on the tiny Llama exported with --lora, engine on the plain export, folder of the PEFT
    checkpoints, base model folder); every LORAS adapter and every prompt/prefix variant registered."""
    from prefixport.exporter import LoraOptions, export_model

    folder = tiny_model("llama")
    out = tmp_path_factory.mktemp("lora-llama") / "export"
    export_model(out, model=str(folder), lora=LoraOptions())
    work = tmp_path_factory.mktemp("lora-peft")
    engine, plain = Engine.load(out), Engine.load(tiny_export("llama"))
    for name, config in LORAS.items():
        ph.random_checkpoint(AutoModelForCausalLM.from_pretrained(folder), config(), work / name)
        _, path = convert_checkpoint(work / name, out, name=name, out=work / f"{name}.safetensors")
        engine.add_adapter(name, path)
    for name in ADAPTER_VARIANTS:  # the soft prompts and prefixes of the plain export fit this one too
        engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
        plain.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield engine, plain, work, folder
    engine.close()
    plain.close()


@pytest.mark.parametrize("name", list(LORAS))
def test_lora_and_ia3_equal_peft(lora_llama, name):
    engine, _, work, folder = lora_llama
    reference = ph.load_reference(AutoModelForCausalLM.from_pretrained(folder), work / name)
    for prompt in PROMPTS:
        ids = engine.encode(prompt, chat=False)
        np.testing.assert_allclose(ph.runtime_adapter_logits(engine, name, ids), ph.peft_logits(reference, ids),
                                   atol=LOGITS_ATOL, rtol=0)
        ours = engine.generate(ids, adapter=name, max_new_tokens=12, stop_token_ids=[]).token_ids
        assert ours == ph.peft_greedy_choices(reference, ids, ours)
        base = engine.generate(ids, max_new_tokens=12, stop_token_ids=[]).token_ids
        assert ours != base  # the adapter changes what the model says


def test_rows_without_an_adapter_are_the_plain_export_bit_for_bit(lora_llama, tiny_adapters):
    """No adapter, a soft prompt, a prefix: tokens and every step's logits equal the export without
    --lora, through the graph with the LoRA inputs (rank 0, IA3 ones) as through the plain graph the
    export ships beside it, which the engine runs for them."""
    engine, plain, _, _ = lora_llama
    lora_graph = Engine.load(engine.folder, plain_graph=False)
    for name in ("prompt", "prefix"):
        lora_graph.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    assert engine.backend.runs_plain and not lora_graph.backend.runs_plain
    before = engine.backend.plain_runs
    for adapter in (None, "prompt", "prefix"):
        for prompt in PROMPTS:
            want = run(plain, prompt, adapter, n=8)
            assert_same(run(engine, prompt, adapter, n=8), want)
            assert_same(run(lora_graph, prompt, adapter, n=8), want)
    assert engine.backend.plain_runs >= before + 9 * 8  # every prefill and decode step of those rows
    assert lora_graph.backend.plain_runs == 0
    lora_graph.close()


def test_the_plain_graph_is_the_export_without_lora_inputs(lora_llama):
    """The export writes plain.onnx: the same graph with no LoRA or IA3 input, recorded in the manifest."""
    import onnxruntime as ort

    from prefixport import manifest as mf

    engine, _, _, _ = lora_llama
    assert engine.manifest.plain_graph == mf.PLAIN_MODEL_NAME
    names = {i.name for i in ort.InferenceSession(str(engine.folder / mf.PLAIN_MODEL_NAME)).get_inputs()}
    weights = set(engine.manifest.weights.input_names(engine.manifest.num_layers))
    assert names == set(engine.manifest.inputs) - weights and weights <= set(engine.manifest.inputs)


def test_a_folder_without_its_plain_graph_runs_the_one_graph(lora_llama, tmp_path):
    """Removing plain.onnx (one copy of the weights, for a server) leaves the graph with the inputs,
    which gives the same bits."""
    import shutil

    from prefixport import manifest as mf

    engine, _, _, _ = lora_llama
    folder = tmp_path / "export"
    shutil.copytree(engine.folder, folder, ignore=shutil.ignore_patterns(mf.PLAIN_MODEL_NAME, "adapters"))
    one = Engine.load(folder)
    assert not one.backend.runs_plain
    for prompt in PROMPTS:
        assert_same(run(one, prompt, None, n=6), run(engine, prompt, None, n=6))
    one.close()


def test_a_batch_goes_to_the_plain_graph_when_its_adapted_rows_leave(lora_llama):
    """Rows with a LoRA and an IA3 that finish early beside rows without: the steps after they leave
    run the plain graph, the steps before the LoRA graph, and every row equals itself alone."""
    engine, _, _, _ = lora_llama
    plan = [(None, 10), ("lora-all", 3), ("prompt", 10), ("ia3", 4)]
    alone = [run(engine, PROMPTS[i % len(PROMPTS)], kind, n=n) for i, (kind, n) in enumerate(plan)]
    requests = [engine.prepare(PROMPTS[i % len(PROMPTS)], adapter=kind, max_new_tokens=n, stop_token_ids=[])
                for i, (kind, n) in enumerate(plan)]
    for request in requests:
        request.logits = []
    before = engine.backend.plain_runs
    for _ in engine.run_rows(requests):
        pass
    for got, want in zip(requests, alone, strict=True):
        assert_same(got, want)
    assert engine.backend.plain_runs - before >= 5  # the last decode steps, after the IA3 row's 4th token


def test_a_batch_mixing_every_kind_gives_each_row_what_it_gives_alone(lora_llama):
    """Rows of no adapter, prompt, p-tuning, prefix, three LoRAs and an IA3 in one batch (prefilled
    together and in chunks, decoding together): each row's tokens and logits bitwise as alone."""
    engine, _, _, _ = lora_llama
    kinds = [None, "prompt", "ptuning-lstm", "prefix", *LORAS, "lora-all", None]
    alone = [run(engine, PROMPTS[i % len(PROMPTS)], kind, n=10) for i, kind in enumerate(kinds)]
    requests = [engine.prepare(PROMPTS[i % len(PROMPTS)], adapter=kind, max_new_tokens=10, stop_token_ids=[])
                for i, kind in enumerate(kinds)]
    for request in requests:
        request.logits = []
    for _ in engine.run_rows(requests):
        pass
    for got, want in zip(requests, alone, strict=True):
        assert_same(got, want)


def test_rows_keep_their_lora_when_preempted_and_packed(lora_llama, tiny_export):
    """A KV budget so small that rows are swapped out and the rest packed down: each LoRA row's
    tables move with it, and every row still equals itself alone."""
    engine, _, work, _ = lora_llama
    from prefixport.runtime.generation import DecodeBatch
    from prefixport.runtime.kv_cache import KVCache, row_bytes

    m = engine.manifest
    kinds = ["lora-all", None, "ia3", "lora-qv-rs", "lora-pattern", "lora-all"]
    alone = [run(engine, PROMPTS[i % 3], kind, n=24) for i, kind in enumerate(kinds)]
    budget = row_bytes(m, 100) / 2**20  # about three rows' worth of what they reach
    cache = KVCache(engine.backend, m, CacheSettings(budget_mb=budget), m.max_positions)
    batch = DecodeBatch(engine.backend, cache, m.hidden_size, np.dtype(m.dtype), prefill_budget=8, headroom=0)
    requests = [engine.prepare(PROMPTS[i % 3], adapter=kind, max_new_tokens=24, stop_token_ids=[])
                for i, kind in enumerate(kinds)]
    for request in requests:
        request.logits = []
    waiting = list(requests)
    while waiting or len(batch):
        waiting = waiting[batch.join(waiting):]
        batch.sample()
        batch.advance()
        waiting = batch.take_preempted() + waiting
    assert cache.swaps > 0  # rows were preempted and resumed
    for got, want in zip(requests, alone, strict=True):
        assert_same(got, want)


def test_prompt_cache_keys_a_lora_by_its_digest(lora_llama):
    """A LoRA row never starts from the base model's cached blocks of the same prompt (its keys and
    values differ in every layer); its own repeat hits, with the same output."""
    engine, _, _, _ = lora_llama
    prompt = "Prefix tuning learns keys and values for every layer; prompt tuning learns input embeddings. " * 3
    base = engine.generate(prompt, max_new_tokens=6, stop_token_ids=[], chat=False)
    first = engine.generate(prompt, adapter="lora-all", max_new_tokens=6, stop_token_ids=[], chat=False)
    again = engine.generate(prompt, adapter="lora-all", max_new_tokens=6, stop_token_ids=[], chat=False)
    assert first.cached_tokens == 0 and again.cached_tokens > 0
    assert first.token_ids == again.token_ids != base.token_ids


def test_speculative_decoding_and_scoring_with_a_lora(lora_llama):
    engine, _, work, folder = lora_llama
    prompt = "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Numbers: 0 1 2 3"
    want = engine.generate(prompt, adapter="lora-all", max_new_tokens=16, stop_token_ids=[], chat=False)
    got = engine.generate(prompt, adapter="lora-all", max_new_tokens=16, stop_token_ids=[], chat=False,
                          speculative="prompt-lookup")
    assert got.token_ids == want.token_ids
    ids = engine.encode(prompt, chat=False)
    scores = engine.score(ids, adapter="lora-all")
    reference = ph.peft_forward(ph.load_reference(AutoModelForCausalLM.from_pretrained(folder), work / "lora-all"),
                                ids)
    shifted = reference - reference.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose([s.logprob for s in scores.logprobs[1:]], expected, atol=1e-3)


def test_a_lora_on_an_export_without_lora_inputs_is_refused(lora_llama, tiny_export):
    _, plain, work, _ = lora_llama
    with pytest.raises(AdapterError, match="--lora"):
        plain.add_adapter("lora-all", work / "lora-all.safetensors")


def test_gpt2_conv1d_lora_equals_peft(tmp_path_factory, tiny_model):
    """GPT-2's Conv1D modules (fan_in_fan_out) with LoRA on c_attn and the MLP, and IA3."""
    from prefixport.exporter import LoraOptions, export_model

    folder = tiny_model("gpt2")
    out = tmp_path_factory.mktemp("lora-gpt2") / "export"
    export_model(out, model=str(folder), lora=LoraOptions())
    work = tmp_path_factory.mktemp("lora-gpt2-peft")
    engine = Engine.load(out)
    configs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                  init_lora_weights=False),
               "ia3": IA3Config(init_ia3_weights=False)}
    for name, config in configs.items():
        ph.random_checkpoint(AutoModelForCausalLM.from_pretrained(folder), config, work / name)
        _, path = convert_checkpoint(work / name, out, name=name, out=work / f"{name}.safetensors")
        engine.add_adapter(name, path)
        reference = ph.load_reference(AutoModelForCausalLM.from_pretrained(folder), work / name)
        ids = engine.encode(PROMPTS[0], chat=False)
        np.testing.assert_allclose(ph.runtime_adapter_logits(engine, name, ids), ph.peft_logits(reference, ids),
                                   atol=LOGITS_ATOL, rtol=0)
        ours = engine.generate(ids, adapter=name, max_new_tokens=8, stop_token_ids=[]).token_ids
        assert ours == ph.peft_greedy_choices(reference, ids, ours)
    engine.close()


def test_server_loads_and_serves_loras_mixed_with_other_adapters(lora_llama):
    """The server's adapter admin registers a LoRA bundle from its folder (kind "lora"), and
    concurrent completions through a LoRA, an IA3, a prefix and the base model each give what the
    engine gives alone."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    from prefixport.server import ServerSettings, create_app
    from prefixport.server.tenants import Access

    from .helpers import running

    engine, _, work, _ = lora_llama
    app = create_app(engine, ServerSettings(model_name="tiny", adapters_dir=work, max_batch=8),
                     access=Access(adapter_admin=True))
    with running(app) as url:
        r = httpx.post(url + "/v1/adapters", json={"name": "served-lora", "path": "lora-pattern.safetensors"})
        assert r.status_code == 200 and r.json()["kind"] == "lora", r.text
        jobs = [("served-lora", PROMPTS[0]), ("ia3", PROMPTS[1]), ("prefix", PROMPTS[2]), ("tiny", PROMPTS[0]),
                ("lora-all", PROMPTS[1]), ("lora-qv-rs", PROMPTS[2])]

        def complete(job):
            body = {"model": job[0], "prompt": job[1], "max_tokens": 8, "temperature": 0}
            return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(complete, jobs))
        for (model, prompt), text in zip(jobs, texts):
            adapter = None if model == "tiny" else model
            assert text == engine.generate(prompt, adapter=adapter, max_new_tokens=8, chat=False).text, model
        assert httpx.delete(url + "/v1/adapters/served-lora").status_code == 200
