"""What a request is given and the checks it passes before any work (`Engine.prepare` runs them):
the `Prompt` types, the settings' names (`check_settings`) and whether it fits the context and the
KV cache's budget (`check_fits`)."""

from __future__ import annotations

import difflib
import math
from typing import Any, Sequence

from .. import manifest as mf
from ..errors import ContextLengthError, InputError
from .kv_cache import CacheSettings, row_bytes
from .limits import Limits
from .settings import GenerationSettings

Message = dict[str, Any]  # a chat message: {"role": ..., "content": ...}
Prompt = str | Sequence[int] | Sequence[Message]
SETTINGS = tuple(GenerationSettings.__annotations__)  # generate's keywords: prepare's (tests/test_typing.py checks)


def check_settings(settings: GenerationSettings) -> GenerationSettings:
    """`settings` if every key is a generation setting (`SETTINGS`); else an InputError naming the
    closest one (`max_tokens` -> max_new_tokens)."""
    unknown = [k for k in settings if k not in SETTINGS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, SETTINGS, n=1, cutoff=0.5) for k in unknown}
        raise InputError("unknown setting " + ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            + f"; the settings are: {', '.join(SETTINGS)}")
    return settings


def check_fits(manifest: mf.Manifest, cache_settings: CacheSettings, context: int, limits: Limits | None,
               n_virtual: int, n_prompt: int, max_new_tokens: int) -> None:
    """A ContextLengthError unless `n_virtual` virtual tokens, an `n_prompt`-token prompt and
    `max_new_tokens` fit one row: the KV cache's budget, the `context` (the model's or a TensorRT
    engine's positions) or the cache's `max_context`, and a TensorRT engine's prefill (`limits`)."""
    virtual = f"the adapter's virtual tokens ({n_virtual}) plus " if n_virtual else ""
    need, budget, limit = n_virtual + n_prompt + max_new_tokens, cache_settings.budget_bytes, context
    if budget is not None and row_bytes(manifest, need) > budget:
        mb = row_bytes(manifest, need) / 2**20 if need < 2**40 else math.inf  # a JSON int may have 400 digits
        raise ContextLengthError(
            f"{virtual}the prompt ({n_prompt} tokens) plus max_new_tokens "
            f"({max_new_tokens}) need {mb:.1f} MB of KV cache, over the "
            f"budget of {budget / 2**20:.1f} MB; shorten the prompt, lower max_new_tokens or raise the budget"
        )
    if cache_settings.max_context is not None and need > cache_settings.max_context:
        limit = min(limit, cache_settings.max_context)
    if need > limit:
        owner = ("model's" if limit == manifest.max_positions else "KV cache's" if
                 limit == cache_settings.max_context else "TensorRT engine's")
        raise ContextLengthError(
            f"{virtual}the prompt ({n_prompt} tokens) plus "
            f"max_new_tokens ({max_new_tokens}) exceed the {owner} context of {limit} positions; "
            "shorten the prompt or lower max_new_tokens"
        )
    if limits and n_prompt > limits.max_seq:
        raise ContextLengthError(f"the prompt ({n_prompt} tokens) exceeds the TensorRT engine's max_seq "
                                 f"{limits.max_seq}; shorten it, or rebuild the engine with a larger --max-seq")
