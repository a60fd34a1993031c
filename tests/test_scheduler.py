"""Continuous batching: requests join a running decode batch and leave it, each as if alone."""

from __future__ import annotations

import threading

import pytest

from prefixport.errors import AdapterError, BusyError, InputError
from prefixport.runtime import Scheduler

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京", "Numbers: 0 1 2",
           "Prefix tuning learns keys", "Un café"]
MIX = [None, "prompt", "prefix", "ptuning-lstm", "prefix-projection", "prefix"]


@pytest.fixture(scope="module")
def engine(llama_engine):
    return llama_engine


def _tokens_until(ticket, n: int) -> list:
    """Consume a ticket's events until it has produced n tokens; returns those events."""
    seen = []
    for event in ticket.events():
        seen.append(event)
        if sum(len(e.token_ids) for e in seen) >= n or event.final:
            return seen
    return seen


def test_requests_join_a_running_batch_and_match_alone(engine):
    """A request submitted while others decode joins their batch at once (it does not wait for
    them) and gives exactly the tokens and text it gives alone, with its own adapter and length."""
    lengths = [40, 12, 25, 5, 18, 30]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[])
             for p, a, n in zip(PROMPTS, MIX, lengths)]
    sizes: list[int] = []
    submitted = threading.Event()

    def step(size: int) -> None:  # the 5th step waits for the late requests (a loaded machine may
        sizes.append(size)  # starve this thread while the first request decodes to its end)
        if len(sizes) == 5:
            submitted.wait(60)

    with Scheduler(engine, max_batch=8, on_step=step) as scheduler:
        first = scheduler.submit(PROMPTS[0], adapter=MIX[0], max_new_tokens=lengths[0], stop_token_ids=[])
        head = _tokens_until(first, 5)  # the first request is decoding...
        later = [scheduler.submit(p, adapter=a, max_new_tokens=n, stop_token_ids=[])
                 for p, a, n in zip(PROMPTS[1:], MIX[1:], lengths[1:])]  # ...when the others arrive
        submitted.set()
        results = [first.result()] + [t.result() for t in later]
    assert "".join(e.text for e in head) == alone[0].text[: len("".join(e.text for e in head))]
    for got, ref in zip(results, alone):
        assert got.token_ids == ref.token_ids and got.text == ref.text and got.finish_reason == "length"
    # the late requests finished while the first was still decoding: they joined its batch
    assert max(t.token_times[-1] for t in later[:2]) < first.token_times[-1]
    assert max(sizes) > 1 and sizes[0] == 1


def test_max_batch_bounds_the_batch_and_queues_the_rest(engine):
    jobs = [(PROMPTS[i % 6], MIX[(i * 5) % 6], 3 + (i * 7) % 11) for i in range(10)]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[]).token_ids for p, a, n in jobs]
    sizes: list[int] = []
    with Scheduler(engine, max_batch=3, on_step=sizes.append) as scheduler:
        tickets = [scheduler.submit(p, adapter=a, max_new_tokens=n, stop_token_ids=[]) for p, a, n in jobs]
        got = [t.result().token_ids for t in tickets]
    assert got == alone
    assert max(sizes) == 3


def test_prefill_budget_admits_a_burst_a_few_at_a_time(engine):
    """With a budget of one token, one newcomer is prefilled per step (always at least one)."""
    jobs = [(PROMPTS[i], MIX[i], 12) for i in range(6)]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[]).token_ids for p, a, n in jobs]
    sizes: list[int] = []
    with Scheduler(engine, max_batch=8, prefill_budget=1, on_step=sizes.append) as scheduler:
        tickets = [scheduler.submit(p, adapter=a, max_new_tokens=n, stop_token_ids=[]) for p, a, n in jobs]
        assert [t.result().token_ids for t in tickets] == alone
    assert all(b - a <= 1 for a, b in zip(sizes, sizes[1:])) and max(sizes) > 1


def test_sampling_settings_per_request_match_alone(engine):
    settings = [dict(temperature=0.9, seed=1), dict(temperature=1.2, top_k=20, seed=2),
                dict(temperature=0.7, top_p=0.8, seed=3), dict(repetition_penalty=1.4), dict()]
    alone = [engine.generate(PROMPTS[i], adapter=MIX[i], max_new_tokens=16, stop_token_ids=[], **kw).token_ids
             for i, kw in enumerate(settings)]
    with Scheduler(engine, max_batch=8) as scheduler:
        tickets = [scheduler.submit(PROMPTS[i], adapter=MIX[i], max_new_tokens=16, stop_token_ids=[], **kw)
                   for i, kw in enumerate(settings)]
        assert [t.result().token_ids for t in tickets] == alone


def test_stop_strings_and_stop_ids_end_a_row_early(engine):
    full = engine.generate(PROMPTS[3], max_new_tokens=30, stop_token_ids=[])
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    stop_id = full.token_ids[6]
    with Scheduler(engine) as scheduler:
        by_text = scheduler.submit(PROMPTS[3], max_new_tokens=30, stop_token_ids=[], stop=[stop])
        by_id = scheduler.submit(PROMPTS[3], max_new_tokens=30, stop_token_ids=[stop_id])
        events = list(by_text.events())
        r = events[-1].result
        assert by_text.result() is r  # after the events were read, too
        assert r.text == full.text[: full.text.index(stop)] == "".join(e.text for e in events)
        assert r.finish_reason == "stop" and len(r.token_ids) < 30
        r2 = by_id.result()
        assert r2.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1] and r2.finish_reason == "stop"


def test_cancel_leaves_the_batch_and_others_go_on(engine):
    expected = engine.generate(PROMPTS[1], adapter="prefix", max_new_tokens=30, stop_token_ids=[]).token_ids
    with Scheduler(engine) as scheduler:
        doomed = scheduler.submit(PROMPTS[0], max_new_tokens=200, stop_token_ids=[])
        other = scheduler.submit(PROMPTS[1], adapter="prefix", max_new_tokens=30, stop_token_ids=[])
        _tokens_until(doomed, 3)
        doomed.cancel()
        last = list(doomed.events())[-1]
        assert last.result.finish_reason == "cancelled" and len(last.result.token_ids) < 200
        assert other.result().token_ids == expected


def test_a_request_cancelled_while_queued_never_runs(engine):
    with Scheduler(engine, max_batch=1) as scheduler:
        running = scheduler.submit(PROMPTS[0], max_new_tokens=60, stop_token_ids=[])
        queued = scheduler.submit(PROMPTS[1], max_new_tokens=60, stop_token_ids=[])
        queued.cancel()
        after = scheduler.submit(PROMPTS[2], max_new_tokens=5, stop_token_ids=[])
        assert queued.result().finish_reason == "cancelled" and queued.result().token_ids == []
        assert len(running.result().token_ids) == 60 and len(after.result().token_ids) == 5
        assert scheduler.cancelled == 1


def test_bad_requests_fail_at_submit_and_nothing_else(engine):
    with Scheduler(engine) as scheduler:
        good = scheduler.submit(PROMPTS[0], adapter="prompt", max_new_tokens=20, stop_token_ids=[])
        with pytest.raises(AdapterError, match="no adapter named 'nope'"):
            scheduler.submit(PROMPTS[0], adapter="nope")
        with pytest.raises(InputError, match="exceed the model's context"):
            scheduler.submit(PROMPTS[0], max_new_tokens=engine.manifest.max_positions)
        with pytest.raises(InputError, match="top_p"):
            scheduler.submit(PROMPTS[0], top_p=0.0)
        assert good.result().token_ids == engine.generate(PROMPTS[0], adapter="prompt", max_new_tokens=20,
                                                          stop_token_ids=[]).token_ids


def test_many_threads_submit_at_once(engine):
    jobs = [(PROMPTS[i % 6], MIX[(i * 5) % 6], 2 + i % 9) for i in range(24)]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[]).token_ids for p, a, n in jobs]
    got: list = [None] * len(jobs)
    with Scheduler(engine, max_batch=6) as scheduler:
        def client(i: int) -> None:
            p, a, n = jobs[i]
            got[i] = scheduler.generate(p, adapter=a, max_new_tokens=n, stop_token_ids=[]).token_ids
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == alone


def test_closing_fails_what_is_queued(engine):
    scheduler = Scheduler(engine, max_batch=1)
    running = scheduler.submit(PROMPTS[0], max_new_tokens=200, stop_token_ids=[])
    queued = scheduler.submit(PROMPTS[1], max_new_tokens=5, stop_token_ids=[])
    _tokens_until(running, 2)
    scheduler.close()
    for ticket in (running, queued):
        with pytest.raises(Exception, match="shutting down"):
            ticket.result()
    with pytest.raises(Exception, match="closed"):
        scheduler.submit(PROMPTS[0])


def test_max_waiting_refuses_more_at_submit(engine):
    with Scheduler(engine, max_batch=1, max_waiting=1) as scheduler:
        running = scheduler.submit(PROMPTS[0], max_new_tokens=200, stop_token_ids=[])
        _tokens_until(running, 1)
        queued = scheduler.submit(PROMPTS[1], max_new_tokens=5, stop_token_ids=[])
        with pytest.raises(BusyError, match="busy"):
            scheduler.submit(PROMPTS[2], max_new_tokens=5)
        assert len(running.result().token_ids) == 200 and len(queued.result().token_ids) == 5
    with pytest.raises(Exception, match="max_waiting must be >= 1"):
        Scheduler(engine, max_waiting=0)
