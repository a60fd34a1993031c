"""A row's text: `RowText` (incremental detokenization, then stop strings) and `TextStream` (the
text deltas of one direct request, `Engine.stream`)."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

from .generation import RowRequest
from .results import GenerationResult, make_result
from .tokenizer import IncrementalDecoder, Tokenizer


class RowText:
    """One row's text: incremental detokenization, then stop strings.

    Text that could still turn into a stop string is held back, so the deltas never contain
    (part of) a stop string and always join to `.text`.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self.stopped = False  # a stop string was found
        self._emitted = 0

    def push(self, token: int) -> str:
        if not self.stopped:
            self._add(self._decoder.push(token))
        return self._flush(final=self.stopped)

    def finish(self) -> str:
        if not self.stopped:
            self._add(self._decoder.finish())
        return self._flush(final=True)

    def result(self, request: RowRequest, start: float, first: float, end: float) -> GenerationResult:
        """The finished row's result with this text (`make_result`; timings as it takes them)."""
        return make_result(request, self.text, self.stopped, start, first, end)

    def _add(self, new: str) -> None:
        """Append new text and cut at the first stop string. Only a stop ending in the new text can
        be new, so each stop is searched in the new text and the `_hold` characters before it: a
        token costs O(stops x (new text + longest stop)), never the text so far."""
        if not new:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        delta, self._emitted = self.text[self._emitted : end], end
        return delta


class TextStream:
    """Iterates text deltas as tokens are produced; `.result` is set once it is exhausted."""

    def __init__(self, events: Iterator[tuple[int, int]], request: RowRequest, text: RowText) -> None:
        self._events, self._request, self._text = events, request, text
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        first = None
        request = self._request
        for _, token in self._events:
            first = first or time.perf_counter()
            delta = self._text.push(token)
            if self._text.stopped:
                request.done = True
            if delta:
                yield delta
        end = time.perf_counter()
        tail = self._text.finish()
        if tail:
            yield tail
        self.result = self._text.result(request, start, first or end, end)

    def close(self) -> None:
        """Stop generating (finish reason "cancelled"): the row leaves at once, its KV cache row
        freed. `.result` then holds what was generated; iterating again yields nothing."""
        if self.result is None:
            self._request.done, self._request.ended = True, self._request.ended or "cancelled"
            self._events.close()  # type: ignore[attr-defined]  # a generator: returns the cache now
            end = time.perf_counter()
            self._text.finish()
            self.result = self._text.result(self._request, end, end, end)

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
