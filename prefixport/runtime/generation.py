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
    prompt_embeds: np.ndarray,  # [B, V, H], V may be 0
    pad_id: int = 0,
    past_len: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Graph inputs for a prefill after `past_len` prefix positions, and each row's next position [B].

    A prefix adapter's KV occupies positions 0..P-1, a soft prompt the next V, real tokens follow.
    """
    batch, virtual = len(rows), prompt_embeds.shape[1]
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
) -> tuple[np.ndarray, DecodeState]:
    """Run the prompts; returns last-position logits [B, vocab] and the state to decode from."""
    inputs, next_position = prefill_inputs(rows, prompt_embeds, pad_id, past_len)
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
    """What an adapter adds to a row's prefill: a soft prompt, or a prefix past (backend handles)."""

    prompt_embeds: np.ndarray | None = None  # [1, V, H]
    past: list[Any] | None = None  # 2 per layer: [1, kv_heads, P, head_dim]
    past_len: int = 0

    @property
    def n_virtual(self) -> int:
        return self.past_len if self.past is not None else len(self.prompt_embeds[0])


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


def merge_states(backend: Backend, states: list[DecodeState]) -> DecodeState:
    """Rows prefilled apart -> one batch. Each row's cache is right-aligned behind masked left
    padding, so its tokens stay contiguous (sliding-window masks work by cache slot)."""
    if len(states) == 1:
        return states[0]
    width = max(s.attention_mask.shape[1] for s in states)
    pasts = [backend.past_to_numpy(s.past) for s in states]
    merged = []
    for layer in range(len(pasts[0])):
        parts = [p[layer] for p in pasts]
        merged.append(np.concatenate(
            [np.pad(a, ((0, 0), (0, 0), (width - a.shape[2], 0), (0, 0))) for a in parts], axis=0))
    mask = np.concatenate([np.pad(s.attention_mask, ((0, 0), (width - s.attention_mask.shape[1], 0)))
                           for s in states])
    return DecodeState(backend.to_past(merged), mask, np.concatenate([s.next_position for s in states]))


def select_rows(backend: Backend, state: DecodeState, keep: list[int]) -> DecodeState:
    """Only the `keep` rows, and no leading column that none of them attends to."""
    mask = state.attention_mask[keep]
    first = int(np.argmax(mask.any(axis=0)))
    past = [a[keep][:, :, first:] for a in backend.past_to_numpy(state.past)]
    return DecodeState(backend.to_past(past), mask[:, first:], state.next_position[keep])


def generate_rows(backend: Backend, requests: list[RowRequest], hidden: int, dtype: np.dtype,
                  pad_id: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (row index, token) as each row produces tokens; every row gives what it gives alone.

    Rows are prefilled one by one (each with its own adapter) and decoded together; a row leaves
    the batch once done (a stop id, max_new_tokens, or `done` set by the consumer).
    """
    rngs = [np.random.default_rng(r.params.seed) for r in requests]
    states, logits = [], []
    for r in requests:
        feed = r.feed or AdapterFeed()
        embeds = feed.prompt_embeds if feed.prompt_embeds is not None else np.zeros((1, 0, hidden), dtype)
        row_logits, state = prefill(backend, [r.prompt_ids], embeds, pad_id, feed.past, feed.past_len)
        logits.append(row_logits)
        states.append(state)
    active = list(range(len(requests)))
    batch_logits = np.concatenate(logits)  # [B, vocab]
    state = merge_states(backend, states)
    while True:
        tokens = []
        for j, i in enumerate(active):
            r = requests[i]
            seen = r.prompt_ids + r.tokens if r.params.repetition_penalty != 1.0 else []
            token = choose(batch_logits[j], seen, r.params, rngs[i])
            r.tokens.append(token)
            r.done = token in r.stop_ids or len(r.tokens) >= r.max_new_tokens
            tokens.append(token)
            yield i, token
        keep = [j for j, i in enumerate(active) if not requests[i].done]
        if not keep:
            return
        if len(keep) < len(active):
            state = select_rows(backend, state, keep)
            tokens, active = [tokens[j] for j in keep], [active[j] for j in keep]
        batch_logits = decode_step(backend, state, np.array(tokens, np.int64), hidden, dtype)
