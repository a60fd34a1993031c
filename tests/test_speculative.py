"""Speculative decoding by prompt lookup: the same greedy tokens as plain decoding, in fewer passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixport.errors import InputError
from prefixport.runtime import Engine, Scheduler
from prefixport.runtime.speculative import PromptLookup

from .conftest import ADAPTER_VARIANTS

# Repetitive prompts, so that n-gram lookup proposes often (and is often wrong on a random model).
PROMPTS = ["one two three four one two three four one two three", "The quick brown fox. The quick brown fox. The",
           "a b c d e f a b c d e f a b", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Numbers: 0 1 2"]


@pytest.fixture(scope="module")
def engine(tiny_export, tiny_adapters):
    engine = Engine.load(tiny_export("llama"), prompt_cache_bytes=0)
    for name in ADAPTER_VARIANTS:
        engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield engine
    engine.close()


@pytest.mark.parametrize("adapter", [None, *ADAPTER_VARIANTS])
def test_greedy_tokens_equal_plain_decoding(engine, adapter):
    before = engine.stats()["speculative"]["passes"]
    for prompt in PROMPTS:
        plain = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], logprobs=2)
        spec = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], logprobs=2,
                               speculative="prompt-lookup")
        assert spec.token_ids == plain.token_ids
        assert [lp.token for lp in spec.logprobs] == spec.token_ids
        assert spec.finish_reason == plain.finish_reason == "length"
    assert engine.stats()["speculative"]["passes"] > before  # it did verify proposals


def test_stops_and_limits_cut_an_accepted_run(engine):
    """A stop string or stop id inside a run of accepted proposals ends the row there, as plain
    decoding does; max_new_tokens is never exceeded. (A first speculative run leaves its output in
    the lookup's history, so the next runs accept whole runs of proposals.)"""
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=30, stop_token_ids=[])
        assert engine.generate(prompt, max_new_tokens=30, stop_token_ids=[],
                               speculative="prompt-lookup").token_ids == plain.token_ids
        ids = plain.token_ids
        stop_text = engine.tokenizer.decode(ids[5:8])
        for kwargs in ({"stop": [stop_text]}, {"stop_token_ids": [ids[6]]}, {"max_new_tokens": 7}):
            kwargs = {"max_new_tokens": 30, "stop_token_ids": [], **kwargs}
            want = engine.generate(prompt, **kwargs)
            got = engine.generate(prompt, speculative="prompt-lookup", **kwargs)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


def test_structured_and_batched_requests(engine):
    """A grammar-constrained row speculates too; rows in a batch of several decode normally."""
    schema = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]}}}
    plain = engine.generate(PROMPTS[0], max_new_tokens=40, response_format=schema)
    assert engine.generate(PROMPTS[0], max_new_tokens=40, response_format=schema,
                           speculative="prompt-lookup").token_ids == plain.token_ids
    many = engine.generate_batch(PROMPTS, max_new_tokens=12, stop_token_ids=[], speculative="prompt-lookup")
    assert [r.token_ids for r in many] == [engine.generate(p, max_new_tokens=12, stop_token_ids=[]).token_ids
                                           for p in PROMPTS]


def test_sampled_rows_decode_normally_and_bad_values_are_refused(engine):
    a = engine.generate(PROMPTS[0], max_new_tokens=20, temperature=0.8, seed=3, speculative="prompt-lookup")
    b = engine.generate(PROMPTS[0], max_new_tokens=20, temperature=0.8, seed=3)
    assert a.token_ids == b.token_ids
    with pytest.raises(InputError, match="speculative"):
        engine.generate(PROMPTS[0], speculative="draft")
    with Scheduler(engine) as scheduler, pytest.raises(InputError, match="scheduler"):
        scheduler.submit(PROMPTS[0], speculative="prompt-lookup")


def test_lookup_proposes_from_the_prompt_the_output_and_the_adapters_history():
    from prefixport.runtime.generation import RowRequest
    from prefixport.runtime.sampling import SamplingParams

    lookup = PromptLookup(tokens=3, max_ngram=2)
    request = RowRequest([1, 2, 3, 4, 5, 1, 2], 10, SamplingParams(), set())
    assert lookup.propose(request, 10) == [3, 4, 5]  # "1 2" was followed by "3 4 5"
    assert lookup.propose(request, 2) == [3, 4]
    request.tokens = [9]
    assert lookup.propose(request, 10) == []  # "2 9" and "9" never occurred before
    done = RowRequest([7], 10, SamplingParams(), set(), tokens=[9, 8, 6, 5])
    lookup.finished(done)  # the same (no) adapter's output is remembered
    assert lookup.propose(request, 10) == [8, 6, 5]


@pytest.mark.slow
def test_the_default_model_gives_the_same_tokens(default_export, tmp_path):
    """The real default model with the demo's PEFT soft prompt and prefix, and none: extraction
    prompts (where lookup pays) and free text, 48 greedy tokens each."""
    from prefixport.adapters import convert_checkpoint

    demo = Path(__file__).parent.parent / "demo" / "adapters"
    engine = Engine.load(default_export)
    for name in ("json-prompt", "date-prefix"):
        convert_checkpoint(demo / name, default_export, name=name, out=tmp_path / f"{name}.safetensors")
        engine.add_adapter(name, tmp_path / f"{name}.safetensors")
    prompts = ["Text: Maya is 27 and lives in Lima.\nJSON:", "Date: 4 August 2008\nISO:", "def fibonacci(n):",
               "Text: Omar Haddad, 45, moved to Oslo.\nJSON:"]
    for adapter in (None, "json-prompt", "date-prefix"):
        for prompt in prompts:
            plain = engine.generate(prompt, adapter=adapter, max_new_tokens=48, stop_token_ids=[])
            spec = engine.generate(prompt, adapter=adapter, max_new_tokens=48, stop_token_ids=[],
                                   speculative="prompt-lookup")
            assert spec.token_ids == plain.token_ids, (adapter, prompt)
    assert engine.stats()["speculative"]["accepted"] > 0
    engine.close()
