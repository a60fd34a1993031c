"""Logprobs of generated tokens and scoring of prompts (`Engine.score`), against PEFT's forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixport.errors import AdapterError, InputError
from prefixport.runtime import Engine
from prefixport.runtime.generation import score_row
from prefixport.runtime.logprobs import log_softmax

from . import peft_helpers as ph
from .conftest import ADAPTER_VARIANTS

PROMPT = "The quick brown fox jumps over"
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_export, tiny_adapters):
    """The tiny Llama export with every adapter variant registered, and PEFT's models (None: base)."""
    folder, adapters = tiny_model("llama"), tiny_adapters("llama")
    engine = Engine.load(tiny_export("llama"))
    refs = {None: AutoModelForCausalLM.from_pretrained(folder).eval()}
    for variant in ADAPTER_VARIANTS:
        engine.add_adapter(variant, adapters / f"{variant}.safetensors")
        refs[variant] = ph.load_reference(AutoModelForCausalLM.from_pretrained(folder), adapters / "peft" / variant)
    yield engine, refs
    engine.close()


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax of the reference's logits at each of the tokens' positions [len(ids), vocab]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # PEFT prepends virtual positions
    return log_softmax(logits.float().numpy())


@pytest.mark.parametrize("adapter", [None, *ADAPTER_VARIANTS])
def test_score_equals_peft_at_every_position(setup, adapter):
    engine, refs = setup
    score = engine.score(PROMPT, " the lazy dog", adapter=adapter, top_logprobs=3)
    ids = score.token_ids
    assert ids == engine.encode(PROMPT) + engine.tokenizer.encode(" the lazy dog", add_special_tokens=False)
    assert score.continuation_start == len(engine.encode(PROMPT)) and score.logprobs[0] is None
    ref = reference_logprobs(refs[adapter], ids)
    for i in range(1, len(ids)):
        lp = score.logprobs[i]
        assert lp.token == ids[i]
        np.testing.assert_allclose(lp.logprob, ref[i - 1, ids[i]], atol=ATOL)
        assert [t for t, _ in lp.top] == list(np.argsort(-ref[i - 1], kind="stable")[:3])
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref[i - 1])[::-1][:3], atol=ATOL)
    tail = range(score.continuation_start, len(ids))
    np.testing.assert_allclose(score.continuation_logprob, sum(ref[i - 1, ids[i]] for i in tail), atol=1e-3)
    assert score.greedy == all(ref[i - 1].argmax() == ids[i] for i in tail)


def test_score_in_chunks_equals_one_run(setup):
    """A long text is scored in chunks (each a prefill after the ones before): the same values."""
    engine, _ = setup
    ids = engine.encode(PROMPT * 6)
    feed = engine.store.acquire("prefix")
    results = []
    for chunk in (256, 5):
        cache = engine.new_cache()
        row = cache.admit(len(ids) + feed.n_virtual)
        results.append(score_row(engine.backend, cache, row, ids, feed, top=2, chunk=chunk))
    assert len(results[0]) == len(ids) and results[0][0] is None is results[1][0]
    for a, b in zip(results[0][1:], results[1][1:]):
        assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-5)


@pytest.mark.parametrize("adapter", [None, "prompt", "prefix"])
def test_generated_tokens_carry_peft_logprobs(setup, adapter):
    engine, refs = setup
    ids = engine.encode(PROMPT)
    result = engine.generate(ids, adapter=adapter, max_new_tokens=8, stop_token_ids=[], logprobs=5)
    assert [lp.token for lp in result.logprobs] == result.token_ids
    for i, lp in enumerate(result.logprobs):
        ref = reference_logprobs(refs[adapter], ids + result.token_ids[:i])[-1]
        np.testing.assert_allclose(lp.logprob, ref[lp.token], atol=ATOL)
        assert lp.top[0][0] == lp.token  # greedy: the chosen token is the likeliest
        assert len(lp.top) == 5 and all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
    assert engine.generate(ids, adapter=adapter, max_new_tokens=2).logprobs is None


def test_logprobs_in_a_mixed_batch_equal_rows_alone(setup):
    engine, _ = setup
    adapters = [None, "prompt", "prefix", "ptuning-lstm"]
    prompts = [PROMPT, "Hello", "A much longer prompt than the others in this batch", "x"]
    batch = engine.generate_batch(prompts, adapters, max_new_tokens=6, stop_token_ids=[], logprobs=2,
                                  temperature=0.8, seed=3)
    for prompt, adapter, got in zip(prompts, adapters, batch):
        alone = engine.generate(prompt, adapter=adapter, max_new_tokens=6, stop_token_ids=[], logprobs=2,
                                temperature=0.8, seed=3)
        assert got.token_ids == alone.token_ids
        assert [(lp.token, lp.logprob, lp.top) for lp in got.logprobs] == \
               [(lp.token, lp.logprob, lp.top) for lp in alone.logprobs]


def test_bad_logprob_counts_are_refused(setup):
    engine, _ = setup
    for bad in (-1, 21):
        with pytest.raises(InputError, match="between 0 and 20"):
            engine.generate(PROMPT, logprobs=bad)
        with pytest.raises(InputError, match="between 0 and 20"):
            engine.score(PROMPT, top_logprobs=bad)
    with pytest.raises(AdapterError, match="no-such-adapter"):
        engine.score(PROMPT, " x", adapter="no-such-adapter")


def test_token_bytes_join_to_the_text_even_inside_characters(setup):
    """A token may hold part of a multi-byte character (its text alone is U+FFFD); its bytes are
    its own, so the bytes of a text's tokens join to the text's UTF-8 (chat logprobs' `bytes`)."""
    tokenizer = setup[0].tokenizer
    for text in ["Grüße aus München! 東京", "emoji 😀 ok", "plain ascii"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(t) for t in ids) == text.encode("utf-8")
    partial = [t for t in tokenizer.encode("東京", add_special_tokens=False) if "\ufffd" in tokenizer.decode([t])]
    assert partial, "the tiny tokenizer splits CJK characters into byte tokens"
