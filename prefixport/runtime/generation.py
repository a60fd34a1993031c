"""The generation loop as plain functions over a backend: prefill, decode_step, generate_rows.

Layout of a prefill row (DESIGN.md): [virtual tokens | left padding | real tokens]. Virtual tokens
sit at positions 0..V-1 and real token i at V + i whatever the padding, and padding is masked,
so every row gives what it gives alone (batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import Backend
from .sampling import SamplingParams, choose


@dataclass
class DecodeState:
    """What a batch carries from one step to the next."""

    past: list[Any]  # backend handles, 2 per layer: [B, kv_heads, T, head_dim]
    attention_mask: np.ndarray  # [B, T] int64
    next_position: np.ndarray  # [B] int64: the position of each row's next token


def prefill_inputs(
    rows: Sequence[Sequence[int]],
    prompt_embeds: Any,  # [B, V, H], V may be 0: an array, or a backend's device copy (then pass `virtual`)
    pad_id: int = 0,
    past_len: int = 0,
    virtual: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Graph inputs for a prefill after `past_len` prefix positions, and each row's next position [B].

    A prefix adapter's KV occupies positions 0..P-1, a soft prompt the next V, real tokens follow.
    """
    batch = len(rows)
    virtual = prompt_embeds.shape[1] if virtual is None else virtual
    seq = max(len(r) for r in rows)
    start = past_len + virtual  # position of each row's first real token
    input_ids = np.full((batch, seq), pad_id, dtype=np.int64)
    mask = np.zeros((batch, start + seq), dtype=np.int64)
    positions = np.zeros((batch, virtual + seq), dtype=np.int64)
    mask[:, :start] = 1
    positions[:, :virtual] = np.arange(past_len, start)
    for b, row in enumerate(rows):
        n = len(row)
        if n:
            input_ids[b, seq - n :] = row
            mask[b, start + seq - n :] = 1
            positions[b, virtual + seq - n :] = np.arange(start, start + n)
    inputs = {
        "input_ids": input_ids,
        "prompt_embeds": prompt_embeds,
        "attention_mask": mask,
        "position_ids": positions,
    }
    return inputs, np.array([start + len(r) for r in rows], dtype=np.int64)


def prefill(
    backend: Backend,
    rows: Sequence[Sequence[int]],
    prompt_embeds: np.ndarray,  # [B, V, H], V may be 0
    pad_id: int = 0,
    past: list[Any] | None = None,  # a prefix adapter's KV: backend handles [B, kv_heads, P, head_dim]
    past_len: int = 0,
    virtual: int | None = None,  # V, where prompt_embeds is a device copy rather than an array
) -> tuple[np.ndarray, DecodeState]:
    """Run the prompts; returns last-position logits [B, vocab] and the state to decode from."""
    inputs, next_position = prefill_inputs(rows, prompt_embeds, pad_id, past_len, virtual)
    logits, present = backend.run(inputs, past if past is not None else backend.empty_past(len(rows)))
    return logits, DecodeState(present, inputs["attention_mask"], next_position)


def decode_step(backend: Backend, state: DecodeState, tokens: np.ndarray, hidden: int,
                dtype: np.dtype) -> np.ndarray:
    """Feed one token per row ([B] int64); updates `state`, returns logits [B, vocab]."""
    batch = tokens.shape[0]
    mask = np.concatenate([state.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
    inputs = {
        "input_ids": tokens.reshape(batch, 1).astype(np.int64),
        "prompt_embeds": np.zeros((batch, 0, hidden), dtype),
        "attention_mask": mask,
        "position_ids": state.next_position.reshape(batch, 1),
    }
    logits, state.past = backend.run(inputs, state.past)
    state.attention_mask = mask
    state.next_position = state.next_position + 1
    return logits


@dataclass
class AdapterFeed:
    """What an adapter adds to a row's prefill: a soft prompt, or a prefix past, both as the
    backend holds them (on its device)."""

    prompt_embeds: Any = None  # [1, V, H] (`Backend.upload`)
    virtual: int = 0  # V
    past: list[Any] | None = None  # 2 per layer: [1, kv_heads, P, head_dim]
    past_len: int = 0

    @property
    def n_virtual(self) -> int:
        return self.past_len if self.past is not None else self.virtual


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


def gather_rows(backend: Backend, states: Sequence[DecodeState], keeps: Sequence[Sequence[int]],
                pool: list[np.ndarray] | None = None) -> DecodeState:
    """The rows `keeps[i]` of each `states[i]`, in order, as one batch: rows prefilled apart merged,
    finished rows dropped, in one copy of the cache. Each row is right-aligned behind masked left
    padding (zeros), so its tokens stay contiguous (sliding-window masks work by cache slot), and
    the batch is as wide as its longest row.

    A backend with `gather_past` copies on its device; otherwise the copy goes through numpy, into
    `pool`: buffers (one per past tensor) reused from one call to the next instead of fresh memory
    (a fresh 400 MB cache costs more in page faults than in copying). Only for a state that is fed
    to one decode step and then dropped, as `DecodeBatch` does.
    """
    plan = []  # (state, row, first attended column, length) per output row
    for i, keep in enumerate(keeps):
        for j in keep:
            first = int(np.argmax(states[i].attention_mask[j]))
            plan.append((i, j, first, states[i].attention_mask.shape[1] - first))
    width = max(n for *_, n in plan)
    mask = np.zeros((len(plan), width), np.int64)
    for r, (i, j, f, n) in enumerate(plan):
        mask[r, width - n :] = states[i].attention_mask[j, f:]
    positions = np.array([states[i].next_position[j] for i, j, _, _ in plan], np.int64)
    device_gather = getattr(backend, "gather_past", None)
    if device_gather is not None:
        return DecodeState(device_gather([s.past for s in states], plan, width), mask, positions)
    pasts = [backend.past_to_numpy(s.past) for s in states]
    merged = []
    for layer in range(len(pasts[0])):
        _, heads, _, head_dim = pasts[0][layer].shape
        out = _buffer(pool, layer, (len(plan), heads, width, head_dim), pasts[0][layer].dtype)
        for r, (i, j, f, n) in enumerate(plan):
            out[r, :, : width - n] = 0
            out[r, :, width - n :] = pasts[i][layer][j, :, f:]
        merged.append(out)
    return DecodeState(backend.to_past(merged), mask, positions)


def _buffer(pool: list[np.ndarray] | None, index: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array of `shape`: a view of `pool[index]` (grown by half when too small)."""
    if pool is None:
        return np.empty(shape, dtype)
    size = int(np.prod(shape))
    while len(pool) <= index:
        pool.append(np.empty(0, dtype))
    if pool[index].size < size or pool[index].dtype != dtype:
        pool[index] = np.empty(size + size // 2, dtype)
    return pool[index][:size].reshape(shape)


class DecodeBatch:
    """Rows decoding together. A row joins at any step (prefilled alone with its adapter, merged
    in) and leaves once done; every row gives what it gives alone.

    One step: `join` the newcomers, `sample` a token for every row (from its prefill or last
    decode logits), then `advance` (drop the rows now done, run one decode step for the rest).
    """

    def __init__(self, backend: Backend, hidden: int, dtype: np.dtype, pad_id: int = 0) -> None:
        self.backend, self.hidden, self.dtype, self.pad_id = backend, hidden, dtype, pad_id
        self.rows: list[RowRequest] = []  # in cache order
        self._rngs: list[np.random.Generator] = []
        self._parts: list[DecodeState] = []  # consecutive groups of rows, merged by `advance`
        self._logits: list[np.ndarray] = []  # per part: [rows, vocab], not yet sampled
        self._pool: list[np.ndarray] = []  # cache buffers reused by `gather_rows`

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, request: RowRequest) -> None:
        """Prefill one request (its adapter's soft prompt or prefix included); it samples next step."""
        feed = request.feed or AdapterFeed()
        if feed.prompt_embeds is not None:
            embeds, virtual = feed.prompt_embeds, feed.virtual
        else:
            embeds, virtual = np.zeros((1, 0, self.hidden), self.dtype), 0
        logits, state = prefill(self.backend, [request.prompt_ids], embeds, self.pad_id, feed.past, feed.past_len,
                                virtual)
        self.rows.append(request)
        self._rngs.append(np.random.default_rng(request.params.seed))
        self._parts.append(state)
        self._logits.append(logits)

    def sample(self) -> list[RowRequest]:
        """Choose each row's next token (appended to its `tokens`; `done` set at a stop id or
        max_new_tokens). Returns the rows in order; the caller may set `done` before `advance`."""
        logits = np.concatenate(self._logits)  # [B, vocab]
        for row, rng, row_logits in zip(self.rows, self._rngs, logits):
            seen = row.prompt_ids + row.tokens if row.params.repetition_penalty != 1.0 else []
            token = choose(row_logits, seen, row.params, rng)
            row.tokens.append(token)
            row.done = row.done or token in row.stop_ids or len(row.tokens) >= row.max_new_tokens
        self._logits = []
        return list(self.rows)

    def advance(self) -> None:
        """Drop the rows that are done; one decode step for the others, fed their last token."""
        keeps, start = [], 0
        for state in self._parts:
            n = len(state.next_position)
            keeps.append([j for j in range(n) if not self.rows[start + j].done])
            start += n
        self._rngs = [g for r, g in zip(self.rows, self._rngs) if not r.done]
        self.rows = [r for r in self.rows if not r.done]
        if not self.rows:
            self._parts = []
            return
        whole = len(self._parts) == 1 and len(keeps[0]) == len(self._parts[0].next_position)
        state = self._parts[0] if whole else gather_rows(self.backend, self._parts, keeps, self._pool)
        tokens = np.array([r.tokens[-1] for r in self.rows], np.int64)
        self._logits = [decode_step(self.backend, state, tokens, self.hidden, self.dtype)]
        self._parts = [state]


def generate_rows(backend: Backend, requests: list[RowRequest], hidden: int, dtype: np.dtype,
                  pad_id: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (row index, token) as each row produces tokens; every row gives what it gives alone.

    Rows are prefilled one by one (each with its own adapter) and decoded together; a row leaves
    the batch once done (a stop id, max_new_tokens, or `done` set by the consumer).
    """
    batch = DecodeBatch(backend, hidden, dtype, pad_id)
    for r in requests:
        batch.join(r)
    index = {id(r): i for i, r in enumerate(requests)}
    while batch:
        for r in batch.sample():
            yield index[id(r)], r.tokens[-1]
        batch.advance()
