"""Continuous batching (`runtime/scheduler.py`): requests join a running batch and leave it, each
giving what `Engine.generate` gives alone; the batch bound, the prefill budget, cancellation,
deadlines, bad requests, closing, the waiting bound and the asyncio front.

Where a test needs the scheduler thread at a known step, its `on_step` hook waits on an event the
test sets: no sleeps, no timing assumptions."""

from __future__ import annotations

import asyncio
import threading

import pytest

from prefixport.errors import AdapterError, BusyError, ContextLengthError, InputError
from prefixport.runtime import AsyncEngine, CacheSettings, Scheduler
from prefixport.runtime.kv_cache import slot_bytes

from .runs import stop_string_in

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京", "Numbers: 0 1 2",
           "Where is parcel 12?", "Un café"]
MIX = [None, "soft", "prefix", "soft6", "prefix3", "prefix"]
FREE = dict(stop_token_ids=[])


class Gate:
    """An `on_step` hook recording batch sizes; at step `at` it waits until `open()` is called."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.sizes, self._open = at, [], threading.Event()

    def __call__(self, size: int) -> None:
        self.sizes.append(size)
        if len(self.sizes) == self.at:
            assert self._open.wait(20), "the test never opened the gate"

    def open(self) -> None:
        self._open.set()


def _tokens_until(ticket, n: int) -> list:
    """A ticket's events until it has produced n tokens (or ended)."""
    seen = []
    for event in ticket.events():
        seen.append(event)
        if sum(len(e.token_ids) for e in seen) >= n or event.final:
            break
    return seen


def test_requests_join_a_running_batch_and_match_alone(engine):
    lengths = [40, 12, 25, 5, 18, 30]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, **FREE) for p, a, n in zip(PROMPTS, MIX, lengths)]
    gate = Gate(at=2)
    with Scheduler(engine, max_batch=8, prefill_budget=512, on_step=gate) as scheduler:  # all five in one step
        first = scheduler.submit(PROMPTS[0], adapter=MIX[0], max_new_tokens=lengths[0], **FREE)
        head = _tokens_until(first, 2)  # the first request is decoding (held after its 2nd step)...
        later = [scheduler.submit(p, adapter=a, max_new_tokens=n, **FREE)
                 for p, a, n in zip(PROMPTS[1:], MIX[1:], lengths[1:])]  # ...when the others arrive
        gate.open()
        results = [first.result()] + [t.result() for t in later]
    for got, want in zip(results, alone):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "length")
    assert "".join(e.text for e in head) == alone[0].text[: len("".join(e.text for e in head))]
    assert gate.sizes[:4] == [1, 1, 1, 6]  # prefilled in the next step (after its decode), sampled in the one after
    assert max(t.token_times[-1] for t in later[:4]) < first.token_times[-1]  # and left it before it ended


def test_max_batch_bounds_the_batch_and_queues_the_rest(engine):
    jobs = [(PROMPTS[i % 6], MIX[(i * 5) % 6], 3 + (i * 7) % 11) for i in range(10)]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, **FREE).token_ids for p, a, n in jobs]
    gate = Gate()
    with Scheduler(engine, max_batch=3, on_step=gate) as scheduler:
        tickets = [scheduler.submit(p, adapter=a, max_new_tokens=n, **FREE) for p, a, n in jobs]
        assert [t.result().token_ids for t in tickets] == alone
    assert max(gate.sizes) == 3 and scheduler.steps == len(gate.sizes)


def test_a_tiny_prefill_budget_prefills_prompts_a_chunk_per_step(engine):
    """Budget 1: while a row decodes, each step prefills one chunk of two rows, so the prompts
    that arrive come in one after the other over several steps each, and every request still
    gives what it gives alone. (The first came in whole: no row was decoding.)"""
    gate = Gate(at=2)
    alone = [engine.generate(p, adapter=a, max_new_tokens=24, **FREE).token_ids for p, a in zip(PROMPTS, MIX)]
    with Scheduler(engine, max_batch=8, prefill_budget=1, on_step=gate) as scheduler:
        first = scheduler.submit(PROMPTS[0], adapter=MIX[0], max_new_tokens=24, **FREE)
        _tokens_until(first, 2)  # decoding (held after its 2nd step) when the others arrive
        tickets = [first] + [scheduler.submit(p, adapter=a, max_new_tokens=24, **FREE)
                             for p, a in zip(PROMPTS[1:], MIX[1:])]
        gate.open()
        assert [t.result().token_ids for t in tickets] == alone
    sizes = gate.sizes
    assert all(b - a <= 1 for a, b in zip(sizes, sizes[1:])) and max(sizes) > 1
    assert sizes.count(1) > 3  # the second prompt took several steps to come in


def test_per_request_sampling_settings_match_alone(engine):
    settings = [dict(temperature=0.9, seed=1), dict(temperature=1.2, top_k=20, seed=2),
                dict(temperature=0.7, top_p=0.8, seed=3), dict(repetition_penalty=1.4), dict(logprobs=2)]
    alone = [engine.generate(PROMPTS[i], adapter=MIX[i], max_new_tokens=16, **FREE, **kw)
             for i, kw in enumerate(settings)]
    with Scheduler(engine) as scheduler:
        tickets = [scheduler.submit(PROMPTS[i], adapter=MIX[i], max_new_tokens=16, **FREE, **kw)
                   for i, kw in enumerate(settings)]
        got = [t.result() for t in tickets]
    assert [g.token_ids for g in got] == [a.token_ids for a in alone]
    assert [(x.logprob, x.top) for x in got[4].logprobs] == [(x.logprob, x.top) for x in alone[4].logprobs]


def test_stop_strings_and_stop_ids_end_a_row(engine):
    full = engine.generate(PROMPTS[4], max_new_tokens=30, **FREE)
    stop = stop_string_in(full.text)
    stop_id = full.token_ids[6]
    with Scheduler(engine) as scheduler:
        by_text = scheduler.submit(PROMPTS[4], max_new_tokens=30, stop=[stop], **FREE)
        by_id = scheduler.submit(PROMPTS[4], max_new_tokens=30, stop_token_ids=[stop_id])
        events = list(by_text.events())
        text = events[-1].result
        assert text.text == full.text[: full.text.index(stop)] == "".join(e.text for e in events)
        assert text.finish_reason == "stop" and [t for e in events for t in e.token_ids] == text.token_ids
        ids = by_id.result()
    assert ids.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1] and ids.finish_reason == "stop"


def test_a_cancelled_request_leaves_and_the_others_go_on(engine):
    expected = engine.generate(PROMPTS[1], adapter="prefix", max_new_tokens=30, **FREE).token_ids
    doomed_alone = engine.generate(PROMPTS[0], max_new_tokens=200, **FREE).token_ids
    gate = Gate(at=3)
    with Scheduler(engine, on_step=gate) as scheduler:
        doomed = scheduler.submit(PROMPTS[0], max_new_tokens=200, **FREE)
        other = scheduler.submit(PROMPTS[1], adapter="prefix", max_new_tokens=30, **FREE)
        _tokens_until(doomed, 2)
        doomed.cancel()
        gate.open()
        result = doomed.result()
        assert result.finish_reason == "cancelled" and result.token_ids == doomed_alone[: len(result.token_ids)]
        assert 2 <= len(result.token_ids) <= 4  # the step after the cancel is its last
        assert other.result().token_ids == expected
    assert scheduler.cancelled == 1


def test_a_request_cancelled_or_out_of_time_while_queued_never_runs(engine):
    gate = Gate(at=1)
    with Scheduler(engine, max_batch=1, on_step=gate) as scheduler:
        running = scheduler.submit(PROMPTS[0], max_new_tokens=20, **FREE)
        _tokens_until(running, 1)  # it holds the one row; the scheduler waits at its first step
        cancelled = scheduler.submit(PROMPTS[1], max_new_tokens=20, **FREE)
        late = scheduler.submit(PROMPTS[2], max_new_tokens=20, timeout=1e-6, **FREE)
        after = scheduler.submit(PROMPTS[3], max_new_tokens=5, **FREE)
        cancelled.cancel()
        calls = len(engine.backend.calls)
        gate.open()
        assert (cancelled.result().finish_reason, cancelled.result().token_ids) == ("cancelled", [])
        assert (late.result().finish_reason, late.result().token_ids) == ("timeout", [])
        assert len(running.result().token_ids) == 20 and len(after.result().token_ids) == 5
    prefills = [c for c in engine.backend.calls[calls:] if c.seq > 1]
    assert len(prefills) == 1  # `after` alone was prefilled
    assert scheduler.cancelled == 1


def test_a_deadline_ends_a_running_request(engine):
    with Scheduler(engine) as scheduler:
        slow = scheduler.submit(PROMPTS[0], max_new_tokens=50, timeout=1e-6, **FREE)
        fine = scheduler.submit(PROMPTS[1], max_new_tokens=8, timeout=60, **FREE)
        assert slow.result().finish_reason == "timeout" and len(slow.result().token_ids) <= 1
        assert fine.result().finish_reason == "length" and len(fine.result().token_ids) == 8


def test_bad_requests_fail_at_submit_and_nothing_else(engine):
    with Scheduler(engine) as scheduler:
        good = scheduler.submit(PROMPTS[0], adapter="soft", max_new_tokens=20, **FREE)
        with pytest.raises(AdapterError, match="no adapter named 'nope'"):
            scheduler.submit(PROMPTS[0], adapter="nope")
        with pytest.raises(ContextLengthError, match="exceed the model's context"):
            scheduler.submit(PROMPTS[0], max_new_tokens=engine.manifest.max_positions)
        with pytest.raises(InputError, match="top_p"):
            scheduler.submit(PROMPTS[0], top_p=0.0)
        with pytest.raises(InputError, match="set per scheduler"):
            scheduler.submit(PROMPTS[0], speculative="prompt-lookup")
        want = engine.generate(PROMPTS[0], adapter="soft", max_new_tokens=20, **FREE)
        assert good.result().token_ids == want.token_ids


def test_closing_fails_what_is_queued_or_running(engine):
    gate = Gate(at=2)
    scheduler = Scheduler(engine, max_batch=1, on_step=gate)
    running = scheduler.submit(PROMPTS[0], max_new_tokens=200, **FREE)
    queued = scheduler.submit(PROMPTS[1], max_new_tokens=5, **FREE)
    _tokens_until(running, 1)
    closer = threading.Thread(target=scheduler.close)
    closer.start()  # it waits for the scheduler thread, held at step 2 until the gate opens
    gate.open()
    closer.join(20)
    for ticket in (running, queued):
        with pytest.raises(Exception, match="shutting down"):
            ticket.result(timeout=20)
    with pytest.raises(Exception, match="closed"):
        scheduler.submit(PROMPTS[0])
    assert not scheduler.alive


def test_max_waiting_refuses_more_at_submit(engine):
    gate = Gate(at=1)
    with Scheduler(engine, max_batch=1, max_waiting=1, on_step=gate) as scheduler:
        running = scheduler.submit(PROMPTS[0], max_new_tokens=10, **FREE)
        _tokens_until(running, 1)
        queued = scheduler.submit(PROMPTS[1], max_new_tokens=5, **FREE)
        with pytest.raises(BusyError, match="busy"):
            scheduler.submit(PROMPTS[2], max_new_tokens=5)
        gate.open()
        assert len(running.result().token_ids) == 10 and len(queued.result().token_ids) == 5


def test_many_threads_submit_at_once(engine):
    jobs = [(PROMPTS[i % 6], MIX[(i * 5) % 6], 2 + i % 9) for i in range(16)]
    alone = [engine.generate(p, adapter=a, max_new_tokens=n, **FREE).token_ids for p, a, n in jobs]
    got: list = [None] * len(jobs)
    with Scheduler(engine, max_batch=5) as scheduler:
        def client(i: int) -> None:
            p, a, n = jobs[i]
            got[i] = scheduler.generate(p, adapter=a, max_new_tokens=n, **FREE).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == alone


def test_the_asyncio_front_gives_the_same_and_cancels_a_dropped_request(engine):
    alone = [engine.generate(p, adapter=a, max_new_tokens=10, **FREE) for p, a in zip(PROMPTS[:4], MIX[:4])]

    async def main(front: AsyncEngine) -> list:
        results = await asyncio.gather(*(front.generate(p, adapter=a, max_new_tokens=10, **FREE)
                                         for p, a in zip(PROMPTS[:4], MIX[:4])))
        stream = front.stream(PROMPTS[0], max_new_tokens=200, **FREE)
        async with stream:
            async for _ in stream:
                break  # leaving the block cancels it
        return [*results, stream]

    with AsyncEngine(engine, max_batch=4) as front:
        *results, stream = asyncio.run(main(front))
        assert [r.token_ids for r in results] == [a.token_ids for a in alone]
        assert [r.text for r in results] == [a.text for a in alone]
        assert stream.ticket.result(timeout=20).finish_reason == "cancelled"


def test_a_scheduler_out_of_kv_room_preempts_and_every_request_matches_alone(make_engine):
    """A cache of 100 slots: rows join holding what they use, outgrow the budget, and are
    preempted to host memory and resumed; nothing is refused and every result equals the request
    alone."""
    probe = make_engine(adapters=False)
    engine = make_engine(cache_settings=CacheSettings(budget_mb=100 * slot_bytes(probe.manifest) / 2**20))
    jobs = [(PROMPTS[i], f"tenant{i % 2}") for i in range(5)]
    alone = [engine.generate(p, max_new_tokens=60, **FREE).token_ids for p, _ in jobs]
    with Scheduler(engine, max_batch=8) as scheduler:
        tickets = [scheduler.submit(p, max_new_tokens=60, tenant=t, **FREE) for p, t in jobs]
        assert [t.result().token_ids for t in tickets] == alone
    stats = scheduler.cache.stats()
    assert stats.preemptions > 0 and stats.reallocations < 12  # not one per step near the budget


def test_the_cli_default_prefill_budget_is_the_schedulers():
    """`prefixport serve --prefill-budget` states the scheduler's default (the CLI does not import the runtime to start)."""
    from prefixport.cli import serve
    from prefixport.runtime.scheduler import DEFAULT_PREFILL_BUDGET

    option = next(p for p in serve.params if p.name == "prefill_budget")
    assert option.default == DEFAULT_PREFILL_BUDGET
