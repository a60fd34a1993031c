"""Every adapter type on the real default model: prefixport equals PEFT's own forward."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.adapters import bundle_path, convert_checkpoint, convert_for_export, save_bundle
from prefixport.runtime import Engine, Scheduler

from . import peft_helpers as ph

pytestmark = pytest.mark.slow

PROMPTS = ["Extract the city: Alice lives in Paris.", "The history of the Roman Empire"]
LOGITS_ATOL = 5e-4  # as for the base model (tests/test_default_model.py)


@pytest.fixture(scope="module")
def setup(default_export, default_hf, default_quantized, tmp_path_factory):
    model, tok = default_hf
    work = tmp_path_factory.mktemp("peft-default")
    for variant in ph.VARIANTS:
        ph.train(model, variant, tok, work / variant, steps=3, lr=0.01)
    engine = Engine.load(default_export, draft=default_quantized("int8")[0])  # int8 weights: a draft
    yield model, engine, work
    engine.close()


@pytest.mark.parametrize("variant,bake", [(v, False) for v in ph.VARIANTS] + [("prompt", True)])
def test_default_model_equals_peft(setup, variant, bake):
    model, engine, work = setup
    task = 2 if variant == "multitask" else None
    name = f"{variant}{'-baked' if bake else ''}"
    if bake:
        baked = engine.bake_prefix(convert_for_export(work / variant, engine.folder, name=name, task=task))
        path = save_bundle(baked, bundle_path(engine.folder, name))
    else:
        _, path = convert_checkpoint(work / variant, engine.folder, name=name, task=task)
    engine.add_adapter(name, path)
    reference = ph.load_reference(model, work / variant)  # prompt learning leaves the base untouched
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        np.testing.assert_allclose(ph.runtime_adapter_logits(engine, name, ids),
                                   ph.peft_logits(reference, ids, task), atol=LOGITS_ATOL, rtol=0)
        ours = engine.generate(ids, adapter=name, max_new_tokens=32, stop_token_ids=[]).token_ids
        assert ours == ph.peft_greedy_choices(reference, ids, ours, task)
        for method in ("prompt-lookup", "draft") if prompt == PROMPTS[0] else ():  # speculative: the same tokens
            assert engine.generate(ids, adapter=name, max_new_tokens=32, stop_token_ids=[],
                                   speculative=method).token_ids == ours, method


def test_default_model_mixed_batch_rows_equal_rows_alone(setup):
    """11 rows on the real model: no adapter, soft prompts and prefixes of different lengths, two
    LoRAs and an IA3."""
    _, engine, work = setup
    for variant in ("prompt", "ptuning-lstm", "prefix", "prefix-projection", "lora-all", "lora-qv-rs", "ia3"):
        _, path = convert_checkpoint(work / variant, engine.folder, name=f"mix-{variant}",
                                     out=work / f"mix-{variant}.safetensors")
        engine.add_adapter(f"mix-{variant}", path)
    prompts = ["Extract the city: Alice lives in Paris.", "def fibonacci(n):", "The history of the Roman Empire",
               "Hi", "Here is a list of fruits:\n1.", "Translate to French: good morning", "Q: 2+2=?\nA:",
               "Once upon a time, in a small village by the sea, there lived", "Write a haiku about the sea.",
               "List three colours:", "The capital of Japan is"]
    adapters = [None, "mix-prompt", "mix-prefix", "mix-ptuning-lstm", "mix-prefix-projection", None,
                "mix-prefix", "mix-prompt", "mix-lora-all", "mix-ia3", "mix-lora-qv-rs"]
    batch = engine.generate_batch(prompts, adapters=adapters, max_new_tokens=24, stop_token_ids=[])
    for prompt, adapter, got in zip(prompts, adapters, batch):
        assert got.token_ids == engine.generate(prompt, adapter=adapter, max_new_tokens=24,
                                                stop_token_ids=[]).token_ids


def test_default_model_continuous_batching_equals_alone_and_peft(setup):
    """Requests arriving while others decode join their batch; each row still equals itself alone,
    and the adapter rows equal PEFT's forward."""
    model, engine, work = setup
    for variant in ("prompt", "prefix"):
        _, path = convert_checkpoint(work / variant, engine.folder, name=f"cb-{variant}",
                                     out=work / f"cb-{variant}.safetensors")
        engine.add_adapter(f"cb-{variant}", path)
    jobs = [("The history of the Roman Empire", None, 28), ("Extract the city: Alice lives in Paris.", "cb-prompt", 20),
            ("def fibonacci(n):", "cb-prefix", 16), ("Q: 2+2=?\nA:", "cb-prompt", 12)]
    sizes: list[int] = []
    with Scheduler(engine, max_batch=4, on_step=sizes.append) as scheduler:
        first = scheduler.submit(jobs[0][0], adapter=jobs[0][1], max_new_tokens=jobs[0][2], stop_token_ids=[])
        next(iter(first.events()))  # the first request is decoding when the others arrive
        later = [scheduler.submit(p, adapter=a, max_new_tokens=n, stop_token_ids=[]) for p, a, n in jobs[1:]]
        results = [first.result()] + [t.result() for t in later]
    assert max(sizes) == 4 and sizes[0] == 1
    for (prompt, adapter, n), got in zip(jobs, results):
        assert got.token_ids == engine.generate(prompt, adapter=adapter, max_new_tokens=n,
                                                stop_token_ids=[]).token_ids
    for (prompt, adapter, n), got in list(zip(jobs, results))[1:3]:
        reference = ph.load_reference(model, work / adapter.removeprefix("cb-"))
        assert got.token_ids == ph.peft_greedy_choices(reference, engine.encode(prompt), got.token_ids)
