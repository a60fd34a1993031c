"""The generation loop as plain functions over a backend and a KV cache: prefill, decode_step,
and `DecodeBatch`, the rows decoding together, on top.

A row's slots hold, from slot 0, its prefix adapter's keys and values, its soft prompt and its
tokens (slot index = position; docs/design.md, "The KV cache"). A row joins by a prefill into a
free row of the cache and leaves by freeing it: no other row is copied or re-aligned, and every
row computes exactly what it computes alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Protocol, Sequence

import numpy as np

from ..errors import NumericsError, PrefixportError
from .backends import Backend
from .feed import AdapterFeed
from .grammar import Matcher
from .kv_cache import CacheSettings, KVCache
from .logprobs import TokenLogprob, token_logprobs
from .prompt_cache import Hit, PromptCache
from .sampling import SamplingParams, choose


def graph_inputs(rows: Sequence[Sequence[int]], prompt_embeds: Any, virtual: int, past_lengths: np.ndarray,
                 pad_id: int = 0, every: bool = False) -> dict[str, Any]:
    """The graph's inputs for token rows (right-padded) after `past_lengths` filled slots, each row
    with `virtual` soft-prompt positions first (`prompt_embeds` [B, V, H]). Logits come back for
    each row's last position, or with `every` for all V + S positions (a short row's padding
    positions repeat its last one)."""
    input_ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, np.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = row
    input_lengths = np.array([virtual + len(r) for r in rows], np.int64)
    last = (input_lengths - 1)[:, None]
    index = np.minimum(np.arange(virtual + input_ids.shape[1])[None, :], last) if every else last
    return {"input_ids": input_ids, "prompt_embeds": prompt_embeds, "past_lengths": np.asarray(past_lengths, np.int64),
            "input_lengths": input_lengths, "logits_index": index}


def prefill(backend: Backend, cache: KVCache, start: int, rows: Sequence[Sequence[int]], prompt_embeds: Any,
            virtual: int, pad_id: int = 0, every: bool = False) -> np.ndarray:
    """Run prompts into cache rows [start, start + len(rows)) after what each row holds already
    (a prefix adapter's keys and values, or an earlier chunk; then one row alone: ONNX Runtime's
    attention takes a past with several new positions only at batch 1). `prompt_embeds` is
    [B, V, H] (V = `virtual`, maybe 0), an array or the backend's device copy. Returns each row's
    last-position logits [B, vocab], or with `every` those of all V + S positions [B, V + S, vocab]."""
    stop = start + len(rows)
    past_lengths = cache.lengths[start:stop].copy()
    inputs = graph_inputs(rows, prompt_embeds, virtual, past_lengths, pad_id, every)
    input_lengths = inputs["input_lengths"]
    cache.reserve(stop, int(past_lengths.max()) + virtual + inputs["input_ids"].shape[1])
    logits = backend.run(inputs, *cache.bind(start, stop))
    cache.lengths[start:stop] = past_lengths + input_lengths
    cache.commit(start, stop)
    return logits if every else logits[:, 0]


def decode_step(backend: Backend, cache: KVCache, tokens: np.ndarray, hidden: int, dtype: np.dtype) -> np.ndarray:
    """Feed one token to each of the cache's rows [0, len(tokens)) ([B] int64); returns logits
    [B, vocab]. A free row among them takes any token at slot 0 and stays empty: its result is
    ignored and its length stays 0, so it never needs capacity."""
    batch = len(tokens)
    used = cache.used(batch)
    past_lengths = np.where(used, cache.lengths[:batch], 0)
    cache.reserve(batch, int(past_lengths.max()) + 1)
    inputs = {"input_ids": tokens.reshape(batch, 1).astype(np.int64), "prompt_embeds": np.zeros((batch, 0, hidden), dtype),
              "past_lengths": past_lengths, "input_lengths": np.ones(batch, np.int64),
              "logits_index": np.zeros((batch, 1), np.int64)}
    logits = backend.run(inputs, *cache.bind(0, batch))
    cache.lengths[:batch] = np.where(used, past_lengths + 1, 0)
    cache.commit(0, batch)
    return logits[:, -1]


def prefill_new(backend: Backend, rows: Sequence[Sequence[int]], prompt_embeds: Any = None,
                prefix: list[Any] | None = None, extra: int = 64, every: bool = False) -> tuple[np.ndarray, KVCache]:
    """A fresh cache with one row per prompt, prefilled in one run (after a prefix adapter's keys
    and values, for a single row); room for `extra` more tokens per row. Returns the logits as
    `prefill` does and the cache, for `decode_step`. For checks, tests and benchmarks."""
    m = backend.manifest
    dtype = np.dtype(m.dtype)
    embeds = np.zeros((len(rows), 0, m.hidden_size), dtype) if prompt_embeds is None else prompt_embeds
    virtual = int(embeds.shape[1])
    need = (prefix[0].shape[2] if prefix else 0) + virtual + max(len(r) for r in rows) + extra
    cache = KVCache(backend, m, CacheSettings(max_rows=len(rows), budget_mb=None), need)
    for _ in rows:
        cache.admit(need)
    if prefix is not None:
        cache.write(0, prefix)
    return prefill(backend, cache, 0, rows, embeds, virtual, m.pad_token_id or 0, every), cache


def score_row(backend: Backend, cache: KVCache, row: int, ids: Sequence[int], feed: AdapterFeed | None,
              top: int = 0, pad_id: int = 0, chunk: int = 256) -> list[TokenLogprob | None]:
    """Each token of `ids` scored given those before it (and the adapter): its logprob and the
    `top` likeliest tokens at its position; None for the first token. Runs into cache row `row`
    (admitted, empty) in chunks of `chunk` tokens, so the logits held never exceed chunk x vocab."""
    feed = feed or AdapterFeed()
    m = backend.manifest
    none = np.zeros((1, 0, m.hidden_size), np.dtype(m.dtype))
    if feed.past is not None:
        cache.write(row, feed.past)
    scores: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids), chunk):
        piece = list(ids[start : start + chunk])
        first = start == 0 and feed.prompt_embeds is not None
        embeds, virtual = (feed.prompt_embeds, feed.virtual) if first else (none, 0)
        logits = prefill(backend, cache, row, [piece], embeds, virtual, pad_id, every=True)[0, virtual:]
        targets = list(ids[start + 1 : start + len(piece) + 1])  # logits[i] predicts ids[start + i + 1]
        scores += token_logprobs(logits[: len(targets)], targets, top)
    return scores


class Proposer(Protocol):
    """Speculative decoding: proposes tokens for a row (`speculative.PromptLookup`, `speculative.DraftModel`)."""

    def propose(self, request: RowRequest, limit: int) -> list[int]:
        """At most `limit` tokens likely to follow the row's prompt and tokens so far (maybe none)."""
        ...

    def count(self, proposed: int, accepted: int) -> None:
        """One verification: `proposed` tokens checked, `accepted` of them kept."""
        ...

    def finished(self, request: RowRequest) -> None:
        """The row left the batch (done, failed or abandoned): forget or remember it."""
        ...


@dataclass
class RowRequest:
    """One row of a batch: its prompt, adapter, settings, and the tokens generated so far."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop_ids: set[int]
    feed: AdapterFeed | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False  # set by the loop, or by the consumer between yields (a stop string, say)
    logits: list[np.ndarray] | None = None  # a list: the logits [vocab] each token was chosen from
    top_logprobs: int | None = None  # record each token's logprob and this many alternatives
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when top_logprobs is set
    grammar: Matcher | None = None  # structured output: each token chosen among those it allows
    error: Exception | None = None  # set (with done) when this row failed alone; the others go on
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prompt cache
    proposer: Proposer | None = None  # speculative decoding, while the batch is small enough
    yielded: int = 0  # tokens handed to the consumer so far (generate_rows)
    deadline: float | None = None  # time.perf_counter() after which the row ends ("timeout")
    ended: Literal["cancelled", "timeout"] | None = None  # why a consumer ended the row early
    adapter: str | None = None  # the adapter's registered name (reported in the result)
    stop: tuple[str, ...] = ()  # stop strings: the consumer's RowText ends the row at one
    cache_salt: str = ""  # the prompt cache and prompt lookup share only between requests of one salt
    tenant: str = ""  # whose request: bounded caches (prompt lookup's history) share fairly between tenants

    def expired(self, now: float) -> bool:
        """Whether the row's deadline has passed while it still had tokens to make."""
        return (self.deadline is not None and now >= self.deadline and not self.completed
                and len(self.tokens) < self.max_new_tokens)

    def truncate(self, n: int) -> None:
        """Keep the first `n` tokens (a consumer stopped the row after them; later ones go)."""
        del self.tokens[n:], self.logprobs[n:]
        if self.logits is not None:
            del self.logits[n:]

    @property
    def completed(self) -> bool:
        """Whether the row ended on its own: a stop id, or a structured document complete."""
        return bool(self.tokens) and self.tokens[-1] in self.stop_ids or (
            self.grammar is not None and self.grammar.finished)

    @property
    def need(self) -> int:
        """Slots the row may reach: virtual tokens, prompt, new tokens."""
        return (self.feed.n_virtual if self.feed else 0) + len(self.prompt_ids) + self.max_new_tokens


class DecodeBatch:
    """Rows decoding together in one KV cache. Rows join at any step (prefilled into free cache
    rows, fresh prompts without a prefix several in one run) and leave once done.

    One step: `join` the newcomers, `sample` a token for every row (from its prefill or last
    decode logits), then `advance` (free the rows now done, run one decode step for the rest).
    While at most `speculate_rows` rows decode and one of them has proposals (a row's `proposer`),
    each row runs alone instead, verifying its proposals (docs/design.md, "Speculative decoding").
    """

    def __init__(self, backend: Backend, cache: KVCache, hidden: int, dtype: np.dtype, pad_id: int = 0,
                 prompt_cache: PromptCache | None = None, speculate_rows: int = 1) -> None:
        self.backend, self.cache, self.hidden, self.dtype, self.pad_id = backend, cache, hidden, dtype, pad_id
        self.prompt_cache, self.speculate_rows = prompt_cache, speculate_rows
        self.rows: dict[int, RowRequest] = {}  # cache row -> request
        self._rngs: dict[int, np.random.Generator] = {}
        self._logits: dict[int, np.ndarray] = {}  # cache row -> [vocab], not yet sampled
        # a row verifying proposals: its logits [1 + k, vocab], the k proposals, its length before
        self._verify: dict[int, tuple[np.ndarray, list[int], int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        """Free every row (the batch is abandoned, say after a failed step)."""
        for row, request in self.rows.items():
            self.cache.release(row)
            if request.proposer is not None:
                request.proposer.finished(request)
        self.rows, self._rngs, self._logits, self._verify = {}, {}, {}, {}

    def join(self, requests: Sequence[RowRequest]) -> int:
        """Prefill requests in order while the cache has room; returns how many joined (the rest
        wait for rows to leave). With a prompt cache, each starts from its longest cached prefix
        (prefilled alone) and leaves its prompt's blocks cached. Consecutive fresh rows (no
        prefix, nothing cached) with equal soft-prompt lengths in consecutive cache rows share one
        prefill run."""
        placed: list[tuple[int, RowRequest]] = []
        for request in requests:
            row = self.cache.admit(request.need)
            if row is None:
                break
            placed.append((row, request))
        hits: dict[int, Hit] = {}
        try:
            if self.prompt_cache is not None:
                for row, request in placed:
                    hits[row] = self.prompt_cache.lookup(request.prompt_ids, request.feed, request.cache_salt)
            for group in _groups(placed, {row for row, hit in hits.items() if hit.slots}):
                self._prefill(group, hits)
        except BaseException:
            for row, _ in placed:
                if row not in self.rows:
                    self.cache.release(row)
            raise
        finally:
            for hit in hits.values():
                self.prompt_cache.release(hit)  # type: ignore[union-attr]  # hits only with a prompt cache
        return len(placed)

    def _prefill(self, group: list[tuple[int, RowRequest]], hits: dict[int, Hit]) -> None:
        start = group[0][0]
        feed = group[0][1].feed or AdapterFeed()
        prefix = feed.past_len if feed.past is not None else 0
        if feed.past is not None:  # a prefix: its keys and values into the row's first slots
            self.cache.write(start, feed.past)
        hit = hits.get(start)
        if hit is not None and hit.slots:  # then the group is this row alone
            hit.copy_to(self.cache, start, prefix)
        skip = hit.tokens if hit is not None else 0
        soft = feed.prompt_embeds is not None and (hit is None or hit.root is None)
        if soft and len(group) == 1:
            embeds, virtual = feed.prompt_embeds, feed.virtual
        elif soft:  # several soft prompts of one length (host arrays)
            embeds, virtual = np.concatenate([(r.feed or feed).prompt_embeds for _, r in group]), feed.virtual
        else:
            embeds, virtual = np.zeros((len(group), 0, self.hidden), self.dtype), 0
        logits = prefill(self.backend, self.cache, start, [r.prompt_ids[skip:] for _, r in group], embeds, virtual,
                         self.pad_id)
        for (row, request), row_logits in zip(group, logits):
            self.rows[row] = request
            self._rngs[row] = np.random.default_rng(request.params.seed)
            self._logits[row] = row_logits
            request.cached_tokens = skip
            if self.prompt_cache is not None:
                self.prompt_cache.store(hits[row], self.cache, row, prefix)

    def sample(self) -> list[RowRequest]:
        """Choose each row's next token (appended to its `tokens`; `done` set at a stop id, a
        complete structured document or max_new_tokens; `error` and `done` where the row's grammar
        failed). A row that verified proposals chooses at each position as it would have without
        them, until its choice differs from the proposal there, so it may gain several tokens (a
        sampled row draws as many numbers from its generator as without speculation: the same
        tokens for a seed). Returns the rows; the caller may set `done` before `advance`."""
        for row, logits in self._logits.items():
            self._choose(self.rows[row], row, logits)
        for row, (logits, proposals, start) in self._verify.items():
            request, matched = self.rows[row], 0
            for i, position in enumerate(logits):
                if not self._choose(request, row, position) or request.done:
                    break
                if i == len(proposals) or request.tokens[-1] != proposals[i]:
                    break
                matched += 1
            self.cache.lengths[row] = start + 1 + matched  # the rejected proposals' slots are dropped
            if request.proposer is not None:
                request.proposer.count(len(proposals), matched)
        self._logits, self._verify = {}, {}
        return [self.rows[r] for r in sorted(self.rows)]

    def _choose(self, request: RowRequest, row: int, logits: np.ndarray) -> bool:
        """Append the row's token chosen from `logits`; False if choosing failed for this row alone
        (non-finite logits, its grammar, any error while sampling): then it is done with `error`
        set, and the other rows go on."""
        seen = request.prompt_ids + request.tokens if request.params.repetition_penalty != 1.0 else []
        try:
            if not np.isfinite(logits).all():
                raise NumericsError("the model's logits for this request are not finite (NaN or Inf): its adapter "
                                    "or prompt drove the model out of float range")
            allowed = request.grammar.mask(logits) if request.grammar is not None else logits
            token = choose(allowed, seen, request.params, self._rngs[row])
            if request.grammar is not None:
                request.grammar.advance(token)
            entries = token_logprobs(logits, [token], request.top_logprobs) if request.top_logprobs is not None else []
        except Exception as e:  # noqa: BLE001 - one row's failure is that row's alone: it leaves, the others go on
            request.error, request.done = e, True
            return False
        if request.logits is not None:
            request.logits.append(logits)
        request.logprobs += entries
        request.tokens.append(token)
        request.done = request.done or request.completed or len(request.tokens) >= request.max_new_tokens
        if not request.done and request.expired(time.perf_counter()):  # every consumer's deadline, here once
            request.done, request.ended = True, "timeout"
        return True

    def advance(self) -> None:
        """Free the rows that are done; one decode step for the others, fed their last token (or,
        speculating, each row alone: its last token and its proposals, verified in one run)."""
        for row in [r for r, request in self.rows.items() if request.done]:
            request = self.rows.pop(row)
            del self._rngs[row]
            self.cache.release(row)
            if request.proposer is not None:
                request.proposer.finished(request)
        if not self.rows:
            return
        if len(self.rows) <= self.speculate_rows and self._speculate():
            return
        tokens = np.full(self.cache.active, self.pad_id, np.int64)
        for row, request in self.rows.items():
            tokens[row] = request.tokens[-1]
        logits = decode_step(self.backend, self.cache, tokens, self.hidden, self.dtype)
        self._logits = {row: logits[row] for row in sorted(self.rows)}

    def _speculate(self) -> bool:
        """Run each row alone: its last token and its proposer's proposals (logits at each), or
        its last token only where it has none (a multi-token run takes a past at batch 1 only).
        False, with nothing run, where no row has proposals."""
        proposals = {row: r.proposer.propose(r, r.max_new_tokens - len(r.tokens) - 1) if r.proposer else []
                     for row, r in self.rows.items()}
        if not any(proposals.values()):
            return False
        none = np.zeros((1, 0, self.hidden), self.dtype)
        for row, request in self.rows.items():
            start, guess = int(self.cache.lengths[row]), proposals[row]
            logits = prefill(self.backend, self.cache, row, [[request.tokens[-1], *guess]], none, 0, self.pad_id,
                             every=bool(guess))
            if guess:
                self._verify[row] = (logits[0], guess, start)
            else:
                self._logits[row] = logits[0]
        return True


def _groups(placed: list[tuple[int, RowRequest]], alone: set[int]) -> Iterator[list[tuple[int, RowRequest]]]:
    """Runs of requests that may share one prefill: consecutive cache rows, no prefix, nothing
    from the prompt cache (rows in `alone`), the same number of virtual tokens, soft prompts as
    host arrays, and each row's last position computed as alone: a row shorter than the run
    (padded) must have an even length, since the last row of a run of kP + 1 rows takes the
    attention's one-row path (docs/design.md, "The prompt cache")."""
    group: list[tuple[int, RowRequest]] = []
    for row, request in placed:
        if (group and row not in alone and group[-1][0] not in alone and _joins(group[-1], (row, request))
                and _ends_alike([r for _, r in group] + [request])):
            group.append((row, request))
            continue
        if group:
            yield group
        group = [(row, request)]
    if group:
        yield group


def _joins(last: tuple[int, RowRequest], new: tuple[int, RowRequest]) -> bool:
    a, b = last[1].feed or AdapterFeed(), new[1].feed or AdapterFeed()
    if new[0] != last[0] + 1 or a.past is not None or b.past is not None or a.virtual != b.virtual:
        return False
    return a.prompt_embeds is None or (isinstance(a.prompt_embeds, np.ndarray) and isinstance(b.prompt_embeds, np.ndarray))


def _ends_alike(requests: list[RowRequest]) -> bool:
    """Whether each row's last position is computed in a run of these rows as in its own run."""
    lengths = [(r.feed.virtual if r.feed else 0) + len(r.prompt_ids) for r in requests]
    return all(n % 2 == 0 or n == max(lengths) for n in lengths)


def generate_rows(backend: Backend, cache: KVCache, requests: list[RowRequest], hidden: int, dtype: np.dtype,
                  pad_id: int = 0, prompt_cache: PromptCache | None = None,
                  speculate_rows: int = 1) -> Iterator[tuple[int, int]]:
    """Yield (row index, token) as each row produces tokens; every row gives what it gives alone.

    Rows join as the cache has room (all at once unless its bounds say otherwise) and leave once
    done (a stop id, max_new_tokens, or `done` set by the consumer between yields). Rows with a
    proposer speculate while at most `speculate_rows` rows decode.
    """
    batch = DecodeBatch(backend, cache, hidden, dtype, pad_id, prompt_cache, speculate_rows)
    index = {id(r): i for i, r in enumerate(requests)}
    waiting = list(requests)
    try:
        while waiting or batch:
            if waiting:
                joined = batch.join(waiting)
                if not joined and not batch:
                    raise PrefixportError(f"a request needing {waiting[0].need} slots does not fit the KV cache")
                waiting = waiting[joined:]
            for r in batch.sample():
                if r.error is not None:
                    raise r.error
                yield from _new_tokens(r, index[id(r)])
            batch.advance()
    finally:
        batch.close()


def _new_tokens(request: RowRequest, index: int) -> Iterator[tuple[int, int]]:
    """(index, token) for each token the row gained this step (several after a verified
    speculation); where the consumer sets `done` after one of them, the later ones are dropped.
    The consumer sees `done` as the loop set it with the last of them."""
    finished, stop = request.done, len(request.tokens)
    request.done = False
    for i in range(request.yielded, stop):
        if i == stop - 1:
            request.done = request.done or finished
        request.yielded = i + 1
        yield index, request.tokens[i]
        if request.done and i < stop - 1:  # stopped by the consumer (a stop string)
            request.truncate(i + 1)
            return
    request.done = request.done or finished
