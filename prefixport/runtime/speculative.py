"""Speculative decoding by prompt lookup (docs/design.md, "Speculative decoding").

For a row decoding alone, `PromptLookup` proposes the tokens that followed the latest earlier
occurrence of the row's last n tokens (n from `max_ngram` down to 1), searched in the row's own
prompt and output, then in the recent outputs of the same adapter: extraction adapters repeat
their output's structure from one request to the next. `DecodeBatch.advance` feeds the row's last
token and the proposals in one run of the graph (logits at every position) and `sample` keeps
the row's own choice at each position while it equals the proposal there, so a greedy row gives
the tokens it gives without speculation, in fewer passes over the weights.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generation import RowRequest


class PromptLookup:
    """Proposes up to `tokens` tokens per pass from n-gram matches (n <= `max_ngram`) in the
    row's prompt and output and in the last `history` outputs of its adapter. Thread-safe."""

    def __init__(self, tokens: int = 5, max_ngram: int = 3, history: int = 16) -> None:
        self.tokens, self.max_ngram, self.history = tokens, max_ngram, history
        self._outputs: dict[str, deque[list[int]]] = {}  # adapter identity -> its recent outputs
        self._lock = threading.Lock()
        self.counters = {"passes": 0, "proposed": 0, "accepted": 0}

    def propose(self, request: RowRequest, limit: int) -> list[int]:
        """At most `limit` tokens likely to follow the row's tokens so far (maybe none)."""
        limit = min(limit, self.tokens)
        if limit < 1:
            return []
        seq = request.prompt_ids + request.tokens
        with self._lock:
            sources = [seq, *reversed(self._outputs.get(_identity(request), ()))]
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for source in sources:
                found = _follows(source, tail, limit, own=source is seq)
                if found:
                    return found
        return []

    def count(self, proposed: int, accepted: int) -> None:
        """One verification pass: `proposed` tokens checked, `accepted` of them kept."""
        with self._lock:
            self.counters["passes"] += 1
            self.counters["proposed"] += proposed
            self.counters["accepted"] += accepted

    def finished(self, request: RowRequest) -> None:
        """Remember a finished row's output under its adapter."""
        if request.tokens:
            with self._lock:
                self._outputs.setdefault(_identity(request), deque(maxlen=self.history)).append(list(request.tokens))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self.counters)
        return {**c, "acceptance_rate": c["accepted"] / c["proposed"] if c["proposed"] else 0.0,
                "mean_accepted": c["accepted"] / c["passes"] if c["passes"] else 0.0}


def _identity(request: RowRequest) -> str:
    feed = request.feed
    return feed.identity if feed is not None and feed.name is not None else ""


def _follows(source: list[int], tail: list[int], limit: int, own: bool) -> list[int]:
    """What follows the latest occurrence of `tail` in `source` (in the row's own sequence, not the
    occurrence that ends it), up to `limit` tokens; [] if none."""
    n = len(tail)
    last = len(source) - n - (1 if own else 0)
    first = tail[0]
    for i in range(last, -1, -1):
        if source[i] == first and source[i : i + n] == tail:
            found = source[i + n : i + n + limit]
            if found:
                return found
    return []
