"""Log-probabilities of chosen tokens and of the likeliest alternatives, from raw logits.

They are the model's own distribution (log-softmax of the logits), taken before any sampling
transform (temperature, top-k/top-p, repetition penalty, a grammar's mask), as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import InputError

MAX_TOP = 20  # the most alternatives one position reports (OpenAI's limit)


def check_top(top: int | None, name: str) -> None:
    """InputError unless `top` (alternatives per token; None: not asked) is within 0..MAX_TOP."""
    if top is not None and not 0 <= top <= MAX_TOP:
        raise InputError(f"{name} must be between 0 and {MAX_TOP} (alternatives per token), got {top}")


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability, and the `top` likeliest tokens (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., vocab] -> log-probabilities in float32 (computed stably)."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))


def token_logprobs(logits: np.ndarray, tokens: Sequence[int] | np.ndarray, top: int = 0) -> list[TokenLogprob]:
    """logits [N, vocab] and the token chosen at each of the N positions -> one TokenLogprob each,
    with the `top` (0..MAX_TOP) likeliest tokens."""
    logp = log_softmax(np.atleast_2d(logits))
    ids = np.asarray(tokens, np.int64).reshape(-1)
    chosen = logp[np.arange(len(ids)), ids]
    out = []
    for row, token, value in zip(logp, ids, chosen):
        best: list[tuple[int, float]] = []
        if top:
            likeliest = np.argpartition(-row, top - 1)[:top]
            likeliest = likeliest[np.argsort(-row[likeliest], kind="stable")]
            best = [(int(i), float(row[i])) for i in likeliest]
        out.append(TokenLogprob(int(token), float(value), best))
    return out
