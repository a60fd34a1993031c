"""What a request gives back: `GenerationResult` (made by `make_result` from a finished row) and
`Score` (`Engine.score`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .generation import RowRequest
from .logprobs import TokenLogprob

# "stop": a stop token, stop string or finished structured document; "length": max_new_tokens;
# "cancelled": the consumer cancelled or closed it; "timeout": its `timeout` passed
FinishReason = Literal["stop", "length", "cancelled", "timeout"]


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only (a final stop token included)
    text: str  # decoded new tokens, special tokens skipped, cut before a stop string
    prompt_tokens: int
    finish_reason: FinishReason  # see FinishReason
    adapter: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds; and decode tokens/s
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    cached_tokens: int = 0  # prompt tokens served from the prompt cache (no prefill)


@dataclass
class Score:
    """A text scored by the model (`Engine.score`): each token's logprob given those before it."""

    token_ids: list[int]  # the prompt's tokens, then the continuation's
    logprobs: list[TokenLogprob | None]  # one per token; None for the first (nothing predicts it)
    continuation_start: int  # index of the continuation's first token (len(token_ids): none)

    @property
    def continuation_logprob(self) -> float:
        """log P(continuation | prompt): the sum over the continuation's tokens."""
        return float(sum(lp.logprob for lp in self.logprobs[self.continuation_start:] if lp is not None))

    @property
    def greedy(self) -> bool:
        """Whether greedy decoding from the prompt would have produced the continuation."""
        return all(lp is not None and lp.top[0][0] == lp.token for lp in self.logprobs[self.continuation_start:])


def make_result(request: RowRequest, text: str, stopped: bool, start: float, first: float,
                end: float) -> GenerationResult:
    """The result of a finished row: its tokens, its `text` (`stopped`: cut at a stop string; a
    `RowText`'s), why it stopped, and its timings (perf_counter seconds: submitted at `start`,
    first token at `first`, last at `end`)."""
    ids = request.tokens
    n_decode, decode_s = max(len(ids) - 1, 0), end - first
    # a stop string beats a consumer's end (the text ended on its own); a cancel beats a stop id
    reason: FinishReason = "stop" if stopped else request.ended or ("stop" if request.completed else "length")
    return GenerationResult(
        token_ids=list(ids), text=text, prompt_tokens=len(request.prompt_ids),
        finish_reason=reason, adapter=request.adapter,
        logprobs=list(request.logprobs) if request.top_logprobs is not None else None,
        cached_tokens=request.cached_tokens,
        timings={"prefill_s": first - start, "decode_s": decode_s,
                 "decode_tokens_per_s": n_decode / decode_s if decode_s > 0 else 0.0},
    )
