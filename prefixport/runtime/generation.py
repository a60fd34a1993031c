"""The generation loop as plain functions over a backend: prefill, decode_step, generate_tokens.

Layout of a prefill row (DESIGN.md): [virtual tokens | left padding | real tokens]. Virtual tokens
sit at positions 0..V-1 and real token i at V + i whatever the padding, and padding is masked,
so every row gives what it gives alone (batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import Backend
from .sampling import SamplingParams, sample


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


def generate_tokens(
    backend: Backend,
    prompt_ids: Sequence[int],
    prompt_embeds: np.ndarray,  # [1, V, H]
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int],
    pad_id: int = 0,
    past: list[Any] | None = None,
    past_len: int = 0,
) -> Iterator[int]:
    """Yield new token ids for one prompt until a stop id (yielded too) or max_new_tokens."""
    rng = np.random.default_rng(params.seed)
    hidden, dtype = prompt_embeds.shape[2], prompt_embeds.dtype
    logits, state = prefill(backend, [prompt_ids], prompt_embeds, pad_id, past, past_len)
    for i in range(max_new_tokens):
        token = sample(logits, params, rng)
        yield int(token[0])
        if int(token[0]) in stop_ids or i + 1 == max_new_tokens:
            return
        logits = decode_step(backend, state, token, hidden, dtype)
