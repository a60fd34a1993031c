"""Running prepared requests and comparing two runs exactly (tokens and the logits behind them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from prefixport.runtime import Engine
from prefixport.runtime.generation import RowRequest


def run(engine: Engine, prompt: Any, adapter: str | None = None, n: int = 6, **settings: Any) -> RowRequest:
    """A finished request alone (greedy, no stop ids by default) with the logits each token was chosen from."""
    request = engine.prepare(prompt, adapter=adapter, max_new_tokens=n, **{"stop_token_ids": [], **settings})
    request.logits = []
    for _ in engine.run_rows([request]):
        pass
    return request


def assert_same(got: RowRequest, want: RowRequest) -> None:
    """Same tokens, and bitwise the same logits at every step."""
    assert got.tokens == want.tokens
    assert got.logits is not None and want.logits is not None
    for a, b in zip(got.logits, want.logits, strict=True):
        np.testing.assert_array_equal(a, b)


def stop_string_in(text: str) -> str:
    """A 3-character piece of `text` (from its middle where it can), without a replacement
    character: a stop string that generation will meet (first where `text.index` says)."""
    starts = [*range(len(text) // 3, len(text) - 2), *range(len(text) // 3)]
    for start in starts:
        if "\ufffd" not in text[start : start + 3]:
            return text[start : start + 3]
    raise AssertionError(f"no stop string to take from {text!r}")
