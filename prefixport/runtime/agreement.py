"""How far one graph strays from another on real prompts: greedy-token agreement.

Used to judge a quantised export against the float one it came from (`prefixport export
--quantize`, with and without adapters), and by the tests. Two measures over the same prompts:

- teacher-forced top-1 agreement: the reference's greedy continuation is fed to the candidate,
  and at each position the candidate's argmax is compared with the reference token (every
  position counts, however early the texts would have parted);
- free-running: both generate greedily on their own; the index of the first differing token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .backends import Backend
from .generation import decode_step, prefill_new

# The bar for calling a quantised export fit to use: the teacher-forced top-1 agreement the tests
# hold int8 and int4 weights to on the default model (measured 93-94.5%; round-to-nearest int4, at
# 65.6%, broke the demo adapters: docs/export.md, "Quantisation").
MIN_TOP1 = 0.90
# What the figures mean, as `prefixport export` prints it under them.
MEANING = ("top-1 agreement: how often the quantised graph picks the float graph's next token, given the float "
           "text; greedy texts of a quantised model part early on long free text, one different token changing "
           "all after it: expected, not a fault")

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works, step by step.",
    "List five uses for a paperclip.",
    "What is the capital of Australia, and why was it chosen?",
)


@dataclass
class Agreement:
    prompts: int
    tokens: int  # generated per prompt
    top1: float  # teacher-forced top-1 agreement, 0..1
    first_divergence: list[int | None]  # per prompt; None = identical for all `tokens`

    @property
    def identical(self) -> int:
        return sum(d is None for d in self.first_divergence)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "identical": self.identical}

    def summary(self) -> str:
        diverged = [d for d in self.first_divergence if d is not None]
        return (f"top-1 agreement {self.top1:.1%} over {self.prompts} prompts x {self.tokens} tokens; "
                f"{self.identical}/{self.prompts} greedy continuations identical"
                + (f", the others part at token {', '.join(map(str, diverged))} (of {self.tokens})"
                   if diverged else ""))


def verdict(agreements: dict[str, Agreement], threshold: float = MIN_TOP1) -> str:
    """Whether a quantised export is fit to use, by its agreements (a label -> Agreement: plain and
    through each adapter) against `threshold`."""
    low = [f"{name} {a.top1:.1%}" for name, a in agreements.items() if a.top1 < threshold]
    if not low:
        return f"fit to use: top-1 agreement >= {threshold:.0%} (the bar the tests hold int8 and int4 to)"
    return (f"below the {threshold:.0%} bar ({', '.join(low)}): measure your task's accuracy on this export "
            "before using it")


def _greedy(backend: Backend, ids: list[int], n: int, hidden: int, dtype: np.dtype,
            forced: Sequence[int] | None = None) -> list[int]:
    """n argmax tokens; with `forced`, the forced token is fed at each step instead of the argmax."""
    logits, cache = prefill_new(backend, [ids], extra=n)
    out: list[int] = []
    for i in range(n):
        out.append(int(np.argmax(logits[0])))
        if i + 1 < n:
            fed = forced[i] if forced is not None else out[-1]
            logits = decode_step(backend, cache, np.array([fed], np.int64), hidden, dtype)
    return out


def agreement(reference: Backend, candidate: Backend, prompts: Sequence[list[int]], tokens: int,
              hidden: int, dtype: np.dtype) -> Agreement:
    """Compare `candidate` with `reference` on tokenised `prompts`, `tokens` greedy tokens each."""
    matches, firsts = 0, []
    for ids in prompts:
        ref = _greedy(reference, ids, tokens, hidden, dtype)
        forced = _greedy(candidate, ids, tokens, hidden, dtype, forced=ref)
        matches += sum(a == b for a, b in zip(ref, forced))
        firsts.append(_first_difference(ref, _greedy(candidate, ids, tokens, hidden, dtype)))
    return Agreement(len(prompts), tokens, matches / (len(prompts) * tokens), firsts)


def adapter_agreement(reference: Any, candidate: Any, adapter: str, prompts: Sequence[str],
                      tokens: int) -> Agreement:
    """`agreement` through an adapter registered under `adapter` on both Engines: the prompts in
    the adapter's prompt format; the candidate is teacher-forced by scoring the reference's
    greedy continuation (which may end early, at a stop token) in one pass."""
    matches = total = 0
    firsts: list[int | None] = []
    for prompt in prompts:
        ids = reference.encode(prompt, adapter=adapter)
        ref = reference.generate(ids, adapter=adapter, max_new_tokens=tokens).token_ids
        scored = candidate.score(ids, ref, adapter=adapter).logprobs[len(ids):]
        matches += sum(lp.top[0][0] == lp.token for lp in scored)
        total += len(ref)
        free = candidate.generate(ids, adapter=adapter, max_new_tokens=tokens).token_ids
        firsts.append(_first_difference(ref, free))
    return Agreement(len(prompts), tokens, matches / max(total, 1), firsts)


def _first_difference(ref: Sequence[int], free: Sequence[int]) -> int | None:
    """Index of the first token where two greedy texts part (one ending early counts); None if equal."""
    return next((i for i, (a, b) in enumerate(zip(ref, free)) if a != b),
                None if len(ref) == len(free) else min(len(ref), len(free)))
