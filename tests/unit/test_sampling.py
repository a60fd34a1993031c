"""Choosing tokens (`runtime/sampling.py`): greedy, temperature, top-k, top-p, repetition penalty,
seeds; and seeded rows in a batch drawing what they draw alone."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport.errors import InputError
from prefixport.runtime import SamplingParams
from prefixport.runtime.sampling import choose, penalize_repetition, sample

LOGITS = np.array([[0.5, 2.0, -1.0, 1.9, 0.0, 3.0, -4.0, 2.0]])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(params: SamplingParams, n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([int(sample(LOGITS, params, rng)[0]) for _ in range(n)])


def test_greedy_takes_the_first_largest_logit_and_draws_nothing():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, -1.0, 5.0, 5.0]])
    assert sample(logits, SamplingParams(), rng).tolist() == [1, 0]
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_the_softmax(temperature):
    draws = _draws(SamplingParams(temperature=temperature))
    freq = np.bincount(draws, minlength=LOGITS.shape[1]) / len(draws)
    expected = _softmax(LOGITS[0] / temperature)
    assert np.abs(freq - expected).max() < 4 * np.sqrt(expected.max() / len(draws))  # within 4 sigma


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_top_k_keeps_the_k_largest_and_their_ties(k):
    """As transformers: every logit >= the k-th largest stays (1 and 7 tie at 2.0)."""
    kth = np.sort(LOGITS[0])[::-1][k - 1]
    kept = set(_draws(SamplingParams(temperature=1.0, top_k=k), 800).tolist())
    assert kept == set(np.flatnonzero(LOGITS[0] >= kth).tolist())
    assert len(kept) == k + (k == 2)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.8, 0.95])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    probs = _softmax(LOGITS[0])
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    expected = set(order[: int(np.searchsorted(mass, p) + 1)].tolist())
    assert set(_draws(SamplingParams(temperature=1.0, top_p=p), 800)) == expected


def test_a_seed_gives_the_same_draws_and_another_seed_others():
    params = SamplingParams(temperature=1.0, top_p=0.95)
    assert (_draws(params, 200, seed=3) == _draws(params, 200, seed=3)).all()
    assert (_draws(params, 200, seed=3) != _draws(params, 200, seed=4)).any()


def test_repetition_penalty_is_transformers_rule_on_seen_tokens_only():
    logits = np.array([2.0, -2.0, 1.0, -0.5])
    out = penalize_repetition(logits, np.array([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -0.5] and logits.tolist() == [2.0, -2.0, 1.0, -0.5]
    assert choose(np.array([3.0, 2.0]), [0], SamplingParams(repetition_penalty=2.0), np.random.default_rng()) == 1


@pytest.mark.parametrize("bad,field", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("inf")), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(seed=-3), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(repetition_penalty=1e300), "repetition_penalty"), (dict(temperature=1e-300), "temperature"),
    (dict(temperature=1e3), "temperature"), (dict(top_k=2**40), "top_k"), (dict(seed=2**64), "seed"),
    (dict(top_p=float("nan")), "top_p"), (dict(repetition_penalty=float("nan")), "repetition_penalty")])
def test_bad_settings_are_refused_naming_the_field(bad, field):
    with pytest.raises(InputError, match=field):
        SamplingParams(**bad)


def test_seeded_rows_in_a_batch_draw_what_they_draw_alone(engine):
    prompts = ["The quick brown fox", "Where is parcel 12?", "Un café", "Numbers: 0 1 2"]
    adapters = [None, "soft", "prefix", "soft6"]
    rows = [dict(temperature=1.0, seed=1), dict(temperature=0.8, top_k=20, seed=2),
            dict(temperature=1.3, top_p=0.9, seed=3), dict(temperature=1.0, seed=1, repetition_penalty=1.3)]
    batch = engine.generate_batch(prompts, adapters, per_row=rows, max_new_tokens=16, stop_token_ids=[])
    for prompt, adapter, settings, got in zip(prompts, adapters, rows, batch):
        alone = engine.generate(prompt, adapter=adapter, max_new_tokens=16, stop_token_ids=[], **settings)
        assert got.token_ids == alone.token_ids
    again = engine.generate(prompts[0], max_new_tokens=16, stop_token_ids=[], temperature=1.0, seed=1)
    other = [engine.generate(prompts[0], max_new_tokens=16, stop_token_ids=[], temperature=1.0, seed=s).token_ids
             for s in (5, 6)]
    assert again.token_ids == batch[0].token_ids and any(o != again.token_ids for o in other)
