"""Continuous batching: one thread runs a `DecodeBatch` that requests join and leave at any step.

`Scheduler.submit` checks a request completely in the caller's thread (bad input raises there,
before any work) and queues it; the scheduler thread prefills it between two decode steps and
merges it into the running batch, so a new request never waits for the others to finish. Each
row keeps its own adapter, sampling settings and length, and gives what it gives alone.
Results come back as `Event`s on a `Ticket`, to iterate from a thread or from asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence, Unpack

import numpy as np

from ..errors import BusyError, InputError, PrefixportError
from .engine import Engine
from .generation import DecodeBatch, RowRequest
from .logprobs import TokenLogprob
from .requests import Prompt, check_settings
from .results import GenerationResult
from .settings import GenerationSettings, Speculative
from .text import RowText

log = logging.getLogger(__name__)

# prompt tokens a step prefills (per BUDGET_ROWS rows in the batch): measured on 2 cores, the int8 export at
# 4 concurrent users keeps its inter-token p99 under 250 ms (docs/design.md, "Chunked prefill")
DEFAULT_PREFILL_BUDGET = 32


@dataclass
class Event:
    """What one step produced for one request: new text (maybe empty: text that could still become
    a stop string is held back), its tokens (one; several where the server speculates) and, when
    asked for, their logprobs; the last event carries the result or the error."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerationResult | None = None
    error: Exception | None = None

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


class Ticket:
    """A submitted request. Iterate `events()` (blocking) or `aevents()` (asyncio); `cancel()`
    makes it leave the batch at the next step."""

    def __init__(self, request: RowRequest, text: RowText) -> None:
        self.request, self.adapter, self._text = request, request.adapter, text
        self.submitted = time.perf_counter()
        self.token_times: list[float] = []  # perf_counter() when each token was produced
        self.cancelled = False
        self.finish_reason: str | None = None  # set when the final result is sent
        self._queue: deque[Event] = deque()
        self._final: Event | None = None
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Event]]] = []  # `aresult`'s

    def cancel(self) -> None:
        """Make the request leave the batch at the next step (finish reason "cancelled")."""
        self.cancelled = True

    def events(self) -> Iterator[Event]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                event = self._queue.popleft()
            yield event
            if event.final:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for asyncio. A consumer that stops early (its task cancelled, say under
        `asyncio.wait_for`, or the iterator closed) cancels the request."""
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # from here on, `_put` wakes this loop
        finished = False
        try:
            while True:
                self._ready.clear()
                with self._cond:
                    pending = list(self._queue)
                    self._queue.clear()
                for event in pending:
                    yield event
                    if event.final:
                        finished = True
                        return
                if not pending:
                    await self._ready.wait()
        finally:
            if not finished:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until done (at most `timeout` seconds: then `TimeoutError`, and the request goes
        on; `cancel()` stops it); the result, or the request's error raised. (Independent of `events`.)"""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout):
                raise TimeoutError(f"no result within {timeout} s; the request goes on (Ticket.cancel() stops it)")
        final = self._final
        assert final is not None
        return _outcome(final)

    async def aresult(self) -> GenerationResult:
        """`result` for asyncio: wait for the end without blocking the loop (independent of
        `aevents`; cancelling the waiting task does not cancel the request)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Event] = loop.create_future()
        with self._cond:
            final = self._final
            if final is None:
                self._waiters.append((loop, future))
        return _outcome(final if final is not None else await future)

    # --- called by the scheduler thread -----------------------------------------------------

    def _put(self, event: Event) -> None:
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Event]]] = []
        with self._cond:
            self._queue.append(event)
            if event.final:
                self._final = event
                waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for waiter_loop, future in waiters:
            try:
                waiter_loop.call_soon_threadsafe(_settle, future, event)
            except RuntimeError:  # that loop is closed
                pass
        loop, ready = self._loop, self._ready
        if loop is not None and ready is not None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def _tokens(self, now: float) -> None:
        """Send what the row gained this step: a token, or several after a verified speculation (a
        stop string or a cancel among them drops the later ones)."""
        request, delta, tokens = self.request, "", []
        for i in range(request.yielded, len(request.tokens)):
            tokens.append(request.tokens[i])
            self.token_times.append(now)
            delta += self._text.push(tokens[-1])
            request.yielded = i + 1
            if self._text.stopped or self.cancelled:
                if self.cancelled and not self._text.stopped:
                    request.ended = "cancelled"
                request.truncate(i + 1)
                request.done = True
                break
        logprobs = request.logprobs[len(request.logprobs) - len(tokens):] if request.top_logprobs is not None else []
        if request.done:
            self._finish(delta, tokens, now, logprobs)
        else:
            self._put(Event(delta, tokens, logprobs))

    def _finish(self, delta: str = "", tokens: Sequence[int] = (), now: float | None = None,
                logprobs: Sequence[TokenLogprob] = ()) -> None:
        end = now or time.perf_counter()
        delta += self._text.finish()
        first = self.token_times[0] if self.token_times else end
        result = self._text.result(self.request, self.submitted, first, end)
        self.finish_reason = result.finish_reason
        self._put(Event(delta, list(tokens), list(logprobs), result=result))

    def _fail(self, error: Exception) -> None:
        self._put(Event(error=error))


def _outcome(final: Event) -> GenerationResult:
    """A final event's result, or its error raised."""
    if final.error is not None:
        raise final.error
    assert final.result is not None  # the last event carries the result or the error
    return final.result


def _settle(future: asyncio.Future[Event], event: Event) -> None:
    if not future.done():  # not cancelled meanwhile
        future.set_result(event)


class Scheduler:
    """Continuous batching over one Engine, at most `max_batch` rows decoding at once.

    At most `max_waiting` requests wait for a place (more raise `BusyError` at submit).
    Waiting requests join in arrival order as rows and KV room allow (KV is taken as used: a
    row holds its prompt and what it has generated, and when the rows outgrow the cache's budget
    the youngest row of the tenant holding the most is preempted to host memory and queued first,
    to resume exactly where it stopped; docs/design.md, "The KV cache"); each step runs one token
    for every decoding row and then prefills joining prompts, in chunks, earliest deadline first, up
    to about `prefill_budget` prompt tokens per 4 rows in the batch (chunked prefill: docs/design.md,
    "Chunked prefill"; the prompt cache's tokens are free), so a long prompt or a burst of arrivals
    delays the running rows by a bounded amount per step instead of stalling them until all are in.
    With `speculative` (a method of `Engine.prepare`), every request speculates while at most
    `speculate_max_batch` rows decode; above that the batch decodes normally.
    `on_step(batch_size)` is called after every decode step (metrics). Thread-safe; `close()`
    stops the thread and fails what is still queued or running.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, prefill_budget: int = DEFAULT_PREFILL_BUDGET, max_waiting: int | None = None,
                 on_step: Callable[[int], None] | None = None, speculative: Speculative | None = None,
                 speculate_max_batch: int | None = None) -> None:
        if max_batch < 1:
            raise PrefixportError(f"max_batch must be >= 1, got {max_batch}")
        if engine.max_batch is not None and max_batch > engine.max_batch:
            raise PrefixportError(f"max_batch {max_batch} exceeds the TensorRT engine's {engine.max_batch} rows; "
                                  "lower it or rebuild the engine with a larger --max-batch")
        if max_waiting is not None and max_waiting < 1:
            raise PrefixportError(f"max_waiting must be >= 1 (or None: unbounded), got {max_waiting}")
        if prefill_budget < 1:
            raise PrefixportError(f"prefill_budget must be >= 1 token, got {prefill_budget}")
        self.engine, self.max_batch, self.prefill_budget, self.on_step = engine, max_batch, prefill_budget, on_step
        engine.proposer(speculative)  # refuses an unknown method, or "draft" without a draft export
        self.speculative = speculative
        self.speculate_max_batch = engine.speculate_max_batch if speculate_max_batch is None else speculate_max_batch
        self.max_waiting = max_waiting  # None: unbounded
        self._waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0  # rows in the batch now
        self.steps = 0  # decode steps run
        self.cancelled = 0  # requests that left because their consumer cancelled them
        self.cache = engine.new_cache()  # one KV cache for the scheduler's life, rows reused
        self._thread = threading.Thread(target=self._run, name="prefixport-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> Ticket:
        """Queue a request (settings as `Engine.generate`); raises at once if it is invalid."""
        if settings.get("speculative") is not None:
            raise InputError("speculative decoding is set per scheduler (Scheduler(speculative=...), prefixport serve "
                             "--speculative), not per request")
        settings["speculative"] = self.speculative
        request = self.engine.prepare(prompt, **check_settings(settings))
        ticket = Ticket(request, RowText(self.engine.tokenizer, request.stop))
        with self._cond:
            if self._closed:
                raise PrefixportError("the scheduler is closed")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise BusyError(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                f"(max_waiting {self.max_waiting}); retry later")
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def generate(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> GenerationResult:
        """Submit and wait: `Engine.generate`, sharing decode steps with whatever else runs."""
        return self.submit(prompt, **settings).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the scheduler thread -----------------------------------------------------------------

    def _new_batch(self) -> DecodeBatch:
        m = self.engine.manifest
        return DecodeBatch(self.engine.backend, self.cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0,
                           self.engine.prompt_cache, self.speculate_max_batch, self.prefill_budget)

    def _admit(self, batch: DecodeBatch, tickets: dict[int, Ticket]) -> bool:
        """Wait for work; prefill newcomers into the batch. False once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or len(batch) or self._closed)
            if self._closed:
                return False
            new: list[Ticket] = []
            gone: list[Ticket] = []
            now = time.perf_counter()
            for ticket in [t for t in self._waiting if t.cancelled or t.request.expired(now)]:
                self._waiting.remove(ticket)  # cancelled or out of time while queued: costs nothing
                ticket.request.ended = "cancelled" if ticket.cancelled else "timeout"
                gone.append(ticket)
            while self._waiting and len(batch) + len(new) < self.max_batch:
                new.append(self._waiting.popleft())
        for ticket in gone:
            ticket.request.done = True
            ticket._finish()
            self.cancelled += ticket.cancelled
        joined = self._join(batch, new)
        for ticket in new[:joined]:
            if not ticket.request.done:
                tickets[id(ticket.request)] = ticket
        if joined < len(new):  # the KV cache has no room for them yet: they wait, first in line
            with self._cond:
                self._waiting.extendleft(reversed(new[joined:]))
        return True

    def _join(self, batch: DecodeBatch, new: list[Ticket]) -> int:
        """Prefill `new` (fresh prompts several per run); returns how many were taken, in order.
        Where a prefill fails, each request is tried alone so that only the bad one fails."""
        try:
            return batch.join([t.request for t in new])
        except Exception:
            log.exception("prefill failed; trying the requests one by one")
        joined = set(map(id, batch.rows.values()))
        for i, ticket in enumerate(new):
            if id(ticket.request) in joined:
                continue
            try:
                if not batch.join([ticket.request]):
                    return i
            except Exception as e:  # this request's prefill failed; the others go on
                log.exception("prefill failed")
                ticket.request.done = True
                ticket._fail(e)
        return len(new)

    def _step(self, batch: DecodeBatch, tickets: dict[int, Ticket]) -> None:
        for ticket in tickets.values():  # a cancel before the first token (its prompt still going in)
            if ticket.cancelled and not ticket.request.tokens and not ticket.request.done:
                ticket.request.done, ticket.request.ended = True, "cancelled"
        rows = batch.sample()
        now = time.perf_counter()
        for row in rows:
            ticket = tickets[id(row)]
            if row.error is None:
                try:
                    ticket._tokens(now)
                except Exception as e:  # noqa: BLE001 - its text handling failed: this row alone
                    row.error, row.done = e, True
            if row.error is not None:  # this row alone failed (its logits, sampling, grammar or text)
                if not isinstance(row.error, PrefixportError):
                    log.error("request failed while choosing its token", exc_info=row.error)
                ticket._fail(row.error)
        if rows:  # a step that only prefilled counts no batch
            self.steps += 1
            if self.on_step is not None:
                self.on_step(len(rows))
        for row in rows:
            if row.done:
                self.cancelled += tickets.pop(id(row)).finish_reason == "cancelled"
        batch.advance()
        preempted = [tickets.pop(id(request)) for request in batch.take_preempted()]
        if preempted:  # out of KV room: they wait first in line, and resume exactly where they stopped
            with self._cond:
                self._waiting.extendleft(reversed(preempted))

    def _run(self) -> None:
        batch, tickets = self._new_batch(), dict[int, Ticket]()
        try:
            while self._admit(batch, tickets):
                self.running = len(batch)
                if not batch:
                    continue
                try:
                    self._step(batch, tickets)
                except Exception as e:  # a failed step fails the rows in it, not the scheduler
                    log.exception("decode step failed")
                    for ticket in tickets.values():
                        ticket._fail(e)
                    batch.close()
                    batch, tickets = self._new_batch(), dict[int, Ticket]()
                self.running = len(batch)
        finally:
            error = PrefixportError("the server is shutting down")
            with self._cond:
                self._closed = True
                leftover = list(self._waiting)
                self._waiting.clear()
            for ticket in leftover + list(tickets.values()):
                ticket._fail(error)
