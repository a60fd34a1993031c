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
from .prompt_cache import Hit, PromptCache, next_cut
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
                prefix: list[Any] | None = None, extra: int = 64, every: bool = False,
                weights: AdapterFeed | None = None) -> tuple[np.ndarray, KVCache]:
    """A fresh cache with one row per prompt, prefilled in one run (after a prefix adapter's keys
    and values, for a single row; with a LoRA's or IA3's tables, `weights`, in every row); room for
    `extra` more tokens per row. Returns the logits as `prefill` does and the cache, for
    `decode_step`. For checks, tests and benchmarks."""
    m = backend.manifest
    dtype = np.dtype(m.dtype)
    embeds = np.zeros((len(rows), 0, m.hidden_size), dtype) if prompt_embeds is None else prompt_embeds
    virtual = int(embeds.shape[1])
    need = (prefix[0].shape[2] if prefix else 0) + virtual + max(len(r) for r in rows) + extra
    cache = KVCache(backend, m, CacheSettings(max_rows=len(rows), budget_mb=None), need)
    for _ in rows:
        row = cache.admit(need)
        assert row is not None  # the cache is sized for these rows
        cache.set_adapter(row, weights)
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
    cache.set_adapter(row, feed)
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
    arrival: float = field(default_factory=time.perf_counter)  # preemption takes the youngest row first
    swapped: Swapped | None = None  # preempted: its KV slots and generator, until it resumes

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


_NONE = object()  # a record a row lacks (`DecodeBatch._relabel`)
ADMIT_HEADROOM = 32  # slots of growth every row must have room for when a request joins (fewer preemptions)
IDLE_PREFILL_BUDGET = 512  # rows a step prefills while no row decodes (larger runs prefill faster per token)
BUDGET_ROWS = 4  # the prefill budget is per step of up to this many rows in the batch; fuller batches take more


@dataclass
class Swapped:
    """A preempted row: its filled slots in host memory (`KVCache.swap_out`) and its sampling
    generator, so that it resumes exactly where it stopped."""

    arrays: list[np.ndarray]
    rng: np.random.Generator


@dataclass
class _Fill:
    """A row whose prompt is being prefilled, in chunks where the batch has a prefill budget."""

    request: RowRequest
    hit: Hit | None  # the prompt cache's, stored from once the prompt is in
    prefix: int  # slots of a prefix adapter before the prompt
    ids: list[int]  # the prompt's tokens this row computes (after the hit's)
    virtual: int  # soft-prompt positions this row computes first (0: none, or the cache's)
    start: int  # rows of the prompt's one uncached run that the hit gave (virtual tokens included)
    whole: int  # rows of that run: the exactness rule's reference (prompt_cache.next_cut)
    deadline: float = 0.0  # its turn (earliest first): the step it joined plus its rows in budgets
    done: int = 0  # rows computed so far

    @property
    def at(self) -> int:
        """Rows of the uncached run in the cache now."""
        return self.start + self.done


class DecodeBatch:
    """Rows decoding together in one KV cache. Rows join at any step and leave once done.

    One step: `join` the newcomers, `sample` a token for every row whose prompt is in (from its
    prefill or last decode logits), then `advance`: free the rows now done, run one decode step
    for the others, and prefill joined prompts. With `prefill_budget` (chunked prefill, docs/design.md
    "Chunked prefill"), a step prefills at most about that many prompt rows, in chunks, so a long
    prompt joins over several steps while the running rows go on decoding; without it, `join`
    prefills each newcomer whole at once (fresh prompts of one soft-prompt length several per run).
    While at most `speculate_max_batch` rows decode and one of them has proposals (a row's `proposer`),
    each row runs alone instead, verifying its proposals (docs/design.md, "Speculative decoding").
    """

    def __init__(self, backend: Backend, cache: KVCache, hidden: int, dtype: np.dtype, pad_id: int = 0,
                 prompt_cache: PromptCache | None = None, speculate_max_batch: int = 1,
                 prefill_budget: int | None = None, headroom: int = ADMIT_HEADROOM) -> None:
        if prefill_budget is not None and prefill_budget < 1:
            raise PrefixportError(f"prefill_budget must be >= 1 token (or None: whole prompts), got {prefill_budget}")
        self.backend, self.cache, self.hidden, self.dtype, self.pad_id = backend, cache, hidden, dtype, pad_id
        self.prompt_cache, self.speculate_max_batch, self.prefill_budget = prompt_cache, speculate_max_batch, prefill_budget
        self.headroom = headroom
        self.preempted: list[RowRequest] = []  # swapped out for room: the caller queues them first
        self.rows: dict[int, RowRequest] = {}  # cache row -> request
        self._rngs: dict[int, np.random.Generator] = {}
        self._filling: dict[int, _Fill] = {}  # rows whose prompt is not in yet, in joining order
        self._logits: dict[int, np.ndarray] = {}  # cache row -> [vocab], not yet sampled
        # a row verifying proposals: its logits [1 + k, vocab], the k proposals, its length before
        self._verify: dict[int, tuple[np.ndarray, list[int], int]] = {}
        self.prefilled = 0  # prompt rows the last step computed (chunked prefill's bound, for tests and stats)
        self.steps = 0  # steps advanced (the prefill order's clock)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def filling(self) -> int:
        """Rows whose prompt is still being prefilled."""
        return len(self._filling)

    def close(self) -> None:
        """Free every row (the batch is abandoned, say after a failed step)."""
        for row, request in self.rows.items():
            self.cache.release(row)
            if request.proposer is not None:
                request.proposer.finished(request)
        self.rows, self._rngs, self._logits, self._verify, self._filling = {}, {}, {}, {}, {}

    def join(self, requests: Sequence[RowRequest]) -> int:
        """Take cache rows for requests in order while the cache has room; returns how many joined
        (the rest wait for rows to leave). With a prompt cache, each starts from its longest cached
        prefix and leaves its prompt's blocks cached. Without a prefill budget the prompts are
        prefilled now, consecutive fresh rows (no prefix, nothing cached) with equal soft-prompt
        lengths in consecutive cache rows in one run; with one, over the next steps (`advance`)."""
        placed: list[tuple[int, RowRequest]] = []
        for request in requests:
            row = self.cache.admit(request.need, self._holding(request), self.headroom)
            if row is None:
                break
            placed.append((row, request))
        hits: dict[int, Hit] = {}
        try:
            for row, request in placed:
                if request.swapped is not None:
                    self._resume(row, request)
                    continue
                if self.prompt_cache is not None:
                    hits[row] = self.prompt_cache.lookup(request.prompt_ids, request.feed, request.cache_salt)
                self._start(row, request, hits.get(row))
        except BaseException:
            for row, _ in placed:
                self._filling.pop(row, None)
                self.rows.pop(row, None)
                self._rngs.pop(row, None)
                self.cache.release(row)
            raise
        finally:
            for hit in hits.values():
                self.prompt_cache.release(hit)  # type: ignore[union-attr]  # hits only with a prompt cache
        if self.prefill_budget is None:
            self._fill()
        return len(placed)

    @staticmethod
    def _holding(request: RowRequest) -> int:
        """Slots a joining request takes: its prompt (after any prefix) and one token, or a
        preempted one's slots and one token."""
        if request.swapped is not None:
            return int(request.swapped.arrays[0].shape[1]) + 1
        return (request.feed.n_virtual if request.feed else 0) + len(request.prompt_ids) + 1

    def _resume(self, row: int, request: RowRequest) -> None:
        """A preempted request back in a row: its slots as they were; it decodes from its last token."""
        assert request.swapped is not None
        self.cache.swap_in(row, request.swapped.arrays)
        self.cache.set_adapter(row, request.feed)
        self.rows[row], self._rngs[row] = request, request.swapped.rng
        request.swapped = None

    def _preempt(self) -> None:
        """Free room for the rows in use to grow by a step: preempt the youngest row of the tenant
        holding the most slots (its slots to host memory, or, while its prompt is still going in,
        nothing: it starts again) until they fit; the rows left are packed from row 0."""
        for row, request in self.rows.items():
            if row not in self._filling:
                self.cache.hold(row, int(self.cache.lengths[row]) + 1)
        while len(self.rows) > 1 and not self.cache.room:
            held: dict[str, int] = {}
            for row, request in self.rows.items():
                held[request.tenant] = held.get(request.tenant, 0) + int(self.cache.lengths[row])
            tenant = max(held, key=held.__getitem__)
            row = max((r for r, q in self.rows.items() if q.tenant == tenant), key=lambda r: self.rows[r].arrival)
            request = self.rows.pop(row)
            rng = self._rngs.pop(row)
            if self._filling.pop(row, None) is not None:
                self.cache.release(row)
                request.cached_tokens = 0
            else:
                request.swapped = Swapped(self.cache.swap_out(row), rng)
            self.preempted.append(request)
            last = self.cache.active - 1
            if row < last:  # keep the rows packed: the last one moves down
                self.cache.move(last, row)
                self._relabel(last, row)

    def _pack(self) -> None:
        """Keep the decoding rows in cache rows [0, D), so that a decode step runs over them alone
        (rows still being prefilled would ride along, computing a dummy token each): a decoding row
        above moves down into a free row below D, or trades places with a row being prefilled there."""
        decoding = [r for r in self.rows if r not in self._filling]
        d = len(decoding)
        high = sorted((r for r in decoding if r >= d), reverse=True)
        holes = sorted(r for r in range(d) if r not in self.rows or r in self._filling)
        for src, dst in zip(high, holes):
            if dst in self.rows:
                self.cache.exchange(src, dst)
                self._relabel(src, dst, swap=True)
            else:
                self.cache.move(src, dst)
                self._relabel(src, dst)

    def _relabel(self, src: int, dst: int, swap: bool = False) -> None:
        """The batch's records of cache row `src` now belong to `dst` (and, with `swap`, `dst`'s to `src`)."""
        tables: tuple[dict[int, Any], ...] = (self.rows, self._rngs, self._filling, self._logits, self._verify)
        for records in tables:
            moved = records.pop(src, _NONE)
            back = records.pop(dst, _NONE) if swap else _NONE
            if moved is not _NONE:
                records[dst] = moved
            if back is not _NONE:
                records[src] = back

    def take_preempted(self) -> list[RowRequest]:
        """The requests preempted since the last call, oldest first: queue them before any other."""
        taken, self.preempted = sorted(self.preempted, key=lambda r: r.arrival), []
        return taken

    def _start(self, row: int, request: RowRequest, hit: Hit | None) -> None:
        """The row's prefix adapter and cached prompt start into its slots; the rest to prefill."""
        feed = request.feed or AdapterFeed()
        prefix = feed.past_len if feed.past is not None else 0
        self.cache.set_adapter(row, request.feed)  # a LoRA's or IA3's tables, where it has them
        if feed.past is not None:  # a prefix: its keys and values into the row's first slots
            self.cache.write(row, feed.past)
        if hit is not None and hit.slots:
            hit.copy_to(self.cache, row, prefix)
        skip = hit.tokens if hit is not None else 0
        soft = feed.virtual if feed.prompt_embeds is not None else 0
        in_run = soft if hit is None or hit.root is None else 0  # virtual tokens this row computes
        self.rows[row] = request
        self._rngs[row] = np.random.default_rng(request.params.seed)
        request.cached_tokens = skip
        fill = _Fill(request, hit if hit is not None and self.prompt_cache is not None else None, prefix,
                     request.prompt_ids[skip:], in_run, soft - in_run + skip, soft + len(request.prompt_ids))
        if self.prefill_budget is not None:
            fill.deadline = self.steps + (fill.whole - fill.start) / self.prefill_budget
        self._filling[row] = fill

    def _fill(self) -> None:
        """Prefill the joined prompts, earliest deadline first (a prompt's deadline: the step it
        joined plus its rows in budgets), within the budget (at least one chunk; the budget times
        N // BUDGET_ROWS with N rows in the batch, decoding or joining; at least IDLE_PREFILL_BUDGET
        rows while no row decodes): a chunk of each, alone (a past with several new positions runs
        at batch 1), or fresh whole prompts several per run, in cache-row order. A row whose
        prefill fails fails alone (`error` and `done` set)."""
        left, plan = self.prefill_budget, {}
        if left is not None and len(self._filling) == len(self.rows):  # nobody decodes: nobody to hold back
            left = max(left, IDLE_PREFILL_BUDGET)
        elif left is not None:  # a fuller batch takes a larger share: its waiting prompts, and its longer step
            left = left * max(1, len(self.rows) // BUDGET_ROWS)
        order = sorted(self._filling, key=lambda r: (self._filling[r].deadline, self._filling[r].request.arrival))
        for row in order:
            fill = self._filling[row]
            if left is not None and left <= 0:
                break
            least = fill.start + fill.virtual + 1 if fill.done == 0 and fill.virtual else 0
            plan[row] = fill.whole if left is None else next_cut(fill.at, fill.whole, left, least)
            if left is not None:
                left -= plan[row] - fill.at
        plan = dict(sorted(plan.items()))  # runs in cache-row order: consecutive fresh rows share one
        alone = {row for row, end in plan.items() if self._filling[row].at or end < self._filling[row].whole}
        self.prefilled = sum(end - self._filling[row].at for row, end in plan.items())
        for group in _groups([(row, self._filling[row].request) for row in plan], alone):
            try:
                self._chunk(group, plan)
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's alone
                if len(group) > 1:
                    for one in group:
                        self._try_chunk(one, plan)
                else:
                    self._failed(group[0][0], e)

    def _try_chunk(self, one: tuple[int, RowRequest], plan: dict[int, int]) -> None:
        try:
            self._chunk([one], plan)
        except Exception as e:  # noqa: BLE001 - this row alone
            self._failed(one[0], e)

    def _failed(self, row: int, error: Exception) -> None:
        request = self._filling.pop(row).request
        request.error, request.done = error, True

    def _chunk(self, group: list[tuple[int, RowRequest]], plan: dict[int, int]) -> None:
        """One prefill run: each row's rows of the uncached run up to its planned end."""
        start = group[0][0]
        fills = [self._filling[row] for row, _ in group]
        first = fills[0]
        if first.done == 0 and first.virtual and len(group) == 1:
            embeds, virtual = (first.request.feed or AdapterFeed()).prompt_embeds, first.virtual
        elif first.done == 0 and first.virtual:  # several soft prompts of one length (host arrays)
            embeds, virtual = np.concatenate([f.request.feed.prompt_embeds for f in fills]), first.virtual  # type: ignore[union-attr]
        else:
            embeds, virtual = np.zeros((len(group), 0, self.hidden), self.dtype), 0
        pieces = []
        for (row, _), fill in zip(group, fills):
            begin = max(fill.done - fill.virtual, 0)
            pieces.append(fill.ids[begin : fill.done - fill.virtual + plan[row] - fill.at])
        logits = prefill(self.backend, self.cache, start, pieces, embeds, virtual, self.pad_id)
        for (row, request), fill, row_logits in zip(group, fills, logits):
            fill.done = plan[row] - fill.start
            if fill.at < fill.whole:
                continue
            del self._filling[row]
            self._logits[row] = row_logits
            if fill.hit is not None:
                self.prompt_cache.store(fill.hit, self.cache, row, fill.prefix)  # type: ignore[union-attr]

    def sample(self) -> list[RowRequest]:
        """Choose each row's next token (appended to its `tokens`; `done` set at a stop id, a
        complete structured document or max_new_tokens; `error` and `done` where the row's grammar
        failed). A row that verified proposals chooses at each position as it would have without
        them, until its choice differs from the proposal there, so it may gain several tokens (a
        sampled row draws as many numbers from its generator as without speculation: the same
        tokens for a seed). Returns the rows whose prompt is in (and those that failed, or were
        ended by their consumer or deadline while being prefilled); the caller may set `done`
        before `advance`."""
        now = time.perf_counter()
        for row, fill in list(self._filling.items()):  # ended while its prompt was still going in
            if fill.request.done or fill.request.expired(now):
                if not fill.request.done:
                    fill.request.done, fill.request.ended = True, "timeout"
                del self._filling[row]
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
        chosen = set(self._logits) | set(self._verify)
        self._logits, self._verify = {}, {}
        return [request for r, request in sorted(self.rows.items()) if r in chosen or request.done]

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
        """Free the rows that are done; one decode step for the rows whose prompt is in, fed their
        last token (or, speculating, each row alone: its last token and its proposals, verified in
        one run); then, with a prefill budget, the next chunks of the prompts joining."""
        for row in [r for r, request in self.rows.items() if request.done]:
            request = self.rows.pop(row)
            del self._rngs[row]
            self._filling.pop(row, None)
            self.cache.release(row)
            if request.proposer is not None:
                request.proposer.finished(request)
        self.prefilled = 0
        self.steps += 1
        self._preempt()
        self._pack()
        decoding = [row for row in sorted(self.rows) if row not in self._filling]  # rows [0, D): packed
        if decoding and not (len(decoding) <= self.speculate_max_batch and self._speculate(decoding)):
            tokens = np.array([self.rows[row].tokens[-1] for row in decoding], np.int64)
            logits = decode_step(self.backend, self.cache, tokens, self.hidden, self.dtype)
            self._logits = {row: logits[row] for row in decoding}
        if self._filling:
            self._fill()

    def _speculate(self, rows: list[int]) -> bool:
        """Run each row alone: its last token and its proposer's proposals (logits at each), or
        its last token only where it has none (a multi-token run takes a past at batch 1 only).
        False, with nothing run, where no row has proposals. Proposals stay within the budget."""
        spare = {row: self.cache.spare(row) for row in rows}
        proposals = {row: r.proposer.propose(r, min(r.max_new_tokens - len(r.tokens) - 1, spare[row]))
                     if r.proposer and spare[row] > 0 else [] for row, r in ((row, self.rows[row]) for row in rows)}
        if not any(proposals.values()):
            return False
        none = np.zeros((1, 0, self.hidden), self.dtype)
        for row in rows:
            request = self.rows[row]
            start, guess = int(self.cache.lengths[row]), proposals[row]
            self.cache.hold(row, start + 1 + len(guess))
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
                  speculate_max_batch: int = 1) -> Iterator[tuple[int, int]]:
    """Yield (row index, token) as each row produces tokens; every row gives what it gives alone.

    Rows join as the cache has room (all at once unless its bounds say otherwise) and leave once
    done (a stop id, max_new_tokens, or `done` set by the consumer between yields). Rows with a
    proposer speculate while at most `speculate_max_batch` rows decode.
    """
    batch = DecodeBatch(backend, cache, hidden, dtype, pad_id, prompt_cache, speculate_max_batch)
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
            waiting = batch.take_preempted() + waiting
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
