"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Processing order follows transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


# Bounds that keep every step's math finite (float64 scores, float32 logits of magnitude < 1e3):
MIN_TEMPERATURE = 0.01  # below it sampling is greedy to float precision (use 0), and logits / T can overflow
MAX_TEMPERATURE = 100.0  # above it the distribution is uniform to float precision
PENALTY_RANGE = (0.01, 100.0)  # a penalty scales seen tokens' logits by at most 100x either way
MAX_TOP_K = 2**31 - 1  # a 32-bit count; any k >= the vocabulary is off
MAX_SEED = 2**63 - 1  # a 64-bit seed, as OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean off; seed makes sampling reproducible.
    Each setting is checked against bounds that keep the step's math finite (the constants above)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output

    def __post_init__(self) -> None:
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise InputError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {t}: "
                             "below that sampling is greedy in all but name, above it uniform")
        if not (isinstance(self.top_k, (int, np.integer)) and 0 <= self.top_k <= MAX_TOP_K):
            raise InputError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed <= MAX_SEED):
            raise InputError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        low, high = PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise InputError(f"repetition_penalty must be in [{low}, {high:g}] (1 = off), got "
                             f"{self.repetition_penalty}: it divides or multiplies seen tokens' logits, and beyond "
                             "100x either way they leave the range where sampling is defined")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits: [B, vocab] -> next token ids [B] (int64)."""
    if params.greedy:
        return np.asarray(logits.argmax(axis=-1), np.int64)
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def penalize_repetition(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty on one row: logits [vocab], seen = token ids so far."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.copy()
    scores = logits[seen]
    logits[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def choose(logits: np.ndarray, seen: list[int], params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token of one row: logits [vocab], `seen` = prompt + generated ids."""
    row = penalize_repetition(logits, np.asarray(seen, dtype=np.int64), params.repetition_penalty)
    return int(sample(row[None], params, rng)[0])
