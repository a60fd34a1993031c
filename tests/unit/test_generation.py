"""`Engine` generation paths against each other: a mixed batch and each row alone, scoring and
generation, a baked prefix and its soft prompt, speculation and plain decoding, deadlines."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.adapters.bundle import load_bundle
from prefixport.errors import InputError, PrefixportError
from prefixport.runtime import CacheSettings
from prefixport.runtime.generation import DecodeBatch, score_row
from prefixport.runtime.kv_cache import KVCache

from .runs import assert_same, run

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京", "Numbers: 0 1 2",
           "Where is parcel 12?", "Un café"]
MIX = [None, "soft", "soft6", "prefix", "prefix3", "soft"]


def test_a_mixed_batch_gives_each_row_what_it_gives_alone(engine):
    lengths = [3, 20, 1, 9, 14, 7]
    rows = [{"max_new_tokens": n} for n in lengths]
    batch = engine.generate_batch(PROMPTS, MIX, per_row=rows, stop_token_ids=[], logprobs=2)
    for prompt, adapter, n, got in zip(PROMPTS, MIX, lengths, batch):
        alone = engine.generate(prompt, adapter=adapter, max_new_tokens=n, stop_token_ids=[], logprobs=2)
        assert (got.token_ids, got.text, got.adapter) == (alone.token_ids, alone.text, adapter)
        assert got.finish_reason == alone.finish_reason == "length"
        assert [(x.logprob, x.top) for x in got.logprobs] == [(x.logprob, x.top) for x in alone.logprobs]
        assert len(got.token_ids) == n and got.prompt_tokens == len(engine.encode(prompt))
    assert len({tuple(r.token_ids[:1]) for r in batch}) > 3  # the rows really differ


def test_rows_leave_at_their_stop_ids(engine):
    alone = [engine.generate(p, adapter=a, max_new_tokens=15, stop_token_ids=[]).token_ids
             for p, a in zip(PROMPTS, MIX)]
    stop = alone[1][4]
    batch = engine.generate_batch(PROMPTS, MIX, max_new_tokens=15, stop_token_ids=[stop])
    for got, ref in zip(batch, alone):
        cut = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert got.token_ids == cut and got.finish_reason == ("stop" if stop in ref else "length")


@pytest.mark.parametrize("adapter", [None, "soft", "prefix"])
def test_scoring_a_generation_gives_its_logprobs(engine, adapter):
    """`Engine.score` (one prefill, logits at every position) over the prompt and the greedy
    continuation equals the logprobs generation recorded step by step."""
    prompt = "Where is parcel 12?"
    result = engine.generate(prompt, adapter=adapter, max_new_tokens=8, stop_token_ids=[], logprobs=3)
    score = engine.score(prompt, result.token_ids, adapter=adapter, top_logprobs=3)
    assert score.token_ids == engine.encode(prompt) + result.token_ids and score.greedy
    assert score.continuation_start == len(engine.encode(prompt)) and score.logprobs[0] is None
    tail = score.logprobs[score.continuation_start :]
    assert [(x.token, x.logprob, x.top) for x in tail] == [(x.token, x.logprob, x.top) for x in result.logprobs]
    assert score.continuation_logprob == pytest.approx(sum(x.logprob for x in result.logprobs))


@pytest.mark.parametrize("adapter", [None, "soft", "prefix"])
def test_scoring_in_chunks_equals_one_run(engine, adapter):
    """`score_row` in chunks of 5 tokens (each after the past of those before) equals one prefill."""
    ids = engine.encode("The quick brown fox jumps over the lazy dog. Where is parcel 12?")
    request = engine.prepare(ids, adapter=adapter, max_new_tokens=1)
    scores = []
    for chunk in (256, 5):
        cache = engine.new_cache()
        row = cache.admit(request.need)
        scores.append(score_row(engine.backend, cache, row, ids, request.feed, 3, chunk=chunk))
        assert cache.lengths[row] == request.need - 1  # every prompt position, virtual ones included
    assert len(scores[0]) == len(ids) and scores[0][0] is None
    assert [(x.logprob, x.top) for x in scores[1][1:]] == [(x.logprob, x.top) for x in scores[0][1:]]


def test_a_baked_prefix_gives_what_its_soft_prompt_gives(engine, toy):
    baked = engine.bake_prefix(load_bundle(toy[0] / "adapters" / "soft.safetensors"))
    assert baked.kind == "prefix" and baked.n_virtual == 4 and baked.metadata["baked_from"] == "prompt"
    engine.add_adapter("baked", bundle=baked)
    for prompt in PROMPTS[:3]:
        assert_same(run(engine, prompt, "baked", 10), run(engine, prompt, "soft", 10))
    with pytest.raises(PrefixportError, match="only a soft prompt"):
        engine.bake_prefix(baked)


@pytest.mark.parametrize("adapter", [None, "soft", "prefix"])
def test_prompt_lookup_speculation_gives_the_plain_tokens(engine, adapter):
    """The second speculating request finds the first one's output in the adapter's history: its
    proposals are accepted several per pass, and the tokens and logprobs stay plain decoding's."""
    prompt = "a b a b a b a b a b a b c a b a b"
    settings = dict(adapter=adapter, max_new_tokens=24, stop_token_ids=[], logprobs=1)
    plain = engine.generate(prompt, **settings)
    for _ in range(2):
        fast = engine.generate(prompt, speculative="prompt-lookup", **settings)
        assert fast.token_ids == plain.token_ids  # and on this model the very logprobs (ONNX Runtime rounds otherwise)
        assert [(x.logprob, x.top) for x in fast.logprobs] == [(x.logprob, x.top) for x in plain.logprobs]
    counters = engine.stats().speculative.prompt_lookup
    assert counters.accepted >= 12 and counters.passes < 2 * 24
    sampled = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.0, seed=4)
    assert (engine.generate(prompt, adapter=adapter, speculative="prompt-lookup", **sampled).token_ids
            == engine.generate(prompt, adapter=adapter, **sampled).token_ids)


def test_a_timeout_ends_the_row_at_its_next_token(engine):
    result = engine.generate(PROMPTS[0], max_new_tokens=50, stop_token_ids=[], timeout=1e-6)
    assert result.finish_reason == "timeout" and len(result.token_ids) == 1
    batch = engine.generate_batch(PROMPTS[:2], per_row=[{"timeout": 1e-6}, {}], max_new_tokens=10, stop_token_ids=[])
    assert [r.finish_reason for r in batch] == ["timeout", "length"] and len(batch[1].token_ids) == 10
    with pytest.raises(InputError, match="timeout must be > 0"):
        engine.generate(PROMPTS[0], timeout=0)


def test_bad_settings_and_a_closed_engine_are_refused(engine):
    with pytest.raises(InputError, match="'max_tokens' \\(did you mean 'max_new_tokens'\\?\\)"):
        engine.generate(PROMPTS[0], max_tokens=3)
    with pytest.raises(InputError, match="empty"):
        engine.generate("")
    with pytest.raises(InputError, match="out of range"):
        engine.generate([1, engine.manifest.vocab_size])
    with pytest.raises(InputError, match="a draft export"):
        engine.generate(PROMPTS[0], speculative="draft")
    assert engine.generate(PROMPTS[0], max_new_tokens=2, stop_token_ids=[]).token_ids  # still usable
    engine.close()
    with pytest.raises(PrefixportError, match="closed"):
        engine.generate(PROMPTS[0])


def test_chat_messages_go_through_the_template(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is parcel 12?"}]
    text = engine.tokenizer.apply_chat_template(messages)
    assert text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    assert engine.encode(messages) == engine.tokenizer.encode(text, add_special_tokens=False)
    assert engine.encode(messages, chat=False) == engine.encode("Where is parcel 12?")  # the last user message


def _first_token_steps(engine, joins: list[tuple[int, list[int], int]], budget: int) -> tuple[list[int], list]:
    """Requests ((step, prompt ids, max_new_tokens)) joining one DecodeBatch with a prefill budget:
    the step each got its first token at, and the finished requests."""
    m = engine.manifest
    batch = DecodeBatch(engine.backend, KVCache(engine.backend, m, CacheSettings(), engine.context_limit),
                        m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0, prefill_budget=budget)
    requests = [engine.prepare(ids, max_new_tokens=n, stop_token_ids=[]) for _, ids, n in joins]
    for r in requests:
        r.logits = []
    first: dict[int, int] = {}
    step = 0
    while len(first) < len(requests) or batch:
        batch.join([r for (at, _, _), r in zip(joins, requests) if at == step])
        batch.sample()
        first.update({i: step for i, r in enumerate(requests) if r.tokens and i not in first})
        batch.advance()
        step += 1
    return [first[i] for i in range(len(requests))], requests


def test_prompts_are_prefilled_earliest_deadline_first(engine):
    """The prefill order (docs/design.md, "Chunked prefill"): a prompt's deadline is the step it
    joined plus its rows in budgets, and the earliest goes first. Short prompts that join after a
    long one come in before it, one every other step, while a row decodes; the long one, overtaken by every
    short one until its deadline, still comes in within twice the steps it takes alone; every row
    gives what it gives alone."""
    ids = engine.encode("Ships sail at dawn from the old harbour; cargo: tea, silk, salt. " * 4)[:160]
    budget = 8
    joins = [(0, engine.encode("Port"), 60), (2, ids, 2)] + [(3 + 2 * i, engine.encode(p), 1)
                                                            for i, p in enumerate(PROMPTS * 4)]
    steps, requests = _first_token_steps(engine, joins, budget)
    long_alone = -(-len(ids) // budget)  # steps its prefill takes with the budget to itself
    shorts = steps[2:]
    assert all(s < steps[1] for s in shorts[:10])  # joined after it, in before it
    assert all(s - at <= 3 for (at, _, _), s in zip(joins[2:12], shorts[:10]))  # each within a few steps
    assert steps[1] - 2 <= 2 * long_alone + 2  # not starved
    assert max(shorts) > steps[1]  # the later short ones waited for it
    for (_, prompt, n), got in zip(joins, requests):
        assert_same(got, run(engine, prompt, None, n))
