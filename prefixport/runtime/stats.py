"""What `Engine.stats()` returns: typed counters, read at call time; `to_dict()` gives plain JSON.

Each part is filled by the component that counts it (the adapter store, the KV caches, the prompt
cache, the proposers, the backend); field names are the JSON keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Stats:
    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers (for JSON)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdapterStats(_Stats):
    """One registered adapter."""

    kind: str  # "prompt", "prefix", "lora" or "ia3"
    n_virtual: int
    bytes: int  # its tensors in the engine's dtype
    resident: bool  # held in memory now
    pinned: bool  # added from memory (no file to re-read): never evicted
    hits: int  # lookups served from memory
    misses: int  # lookups that re-read the bundle file
    evictions: int


@dataclass(frozen=True)
class StoreStats(_Stats):
    """The adapter store: totals, then each adapter."""

    registered: int
    resident: int
    resident_bytes: int
    budget_bytes: int | None  # None: no budget
    hits: int
    misses: int
    evictions: int
    adapters: dict[str, AdapterStats]


@dataclass(frozen=True)
class KVCacheStats(_Stats):
    """One KV cache (a scheduler's, or one held for direct calls)."""

    bytes: int
    rows: int
    capacity: int  # slots per row
    rows_in_use: int
    slot_bytes: int  # one position of one row, all layers
    budget_bytes: int | None
    reallocations: int  # buffer allocations: the first, then each growth (the rows in use copied)
    preemptions: int = 0  # rows swapped out to host memory for room (KV taken as used), resumed later


@dataclass(frozen=True)
class KVStats(_Stats):
    """Every live KV cache of the engine."""

    bytes: int
    budget_bytes_each: int | None
    caches: list[KVCacheStats]


@dataclass(frozen=True)
class PromptCacheStats(_Stats):
    """The prompt cache: counters since the start, what it holds now, and the rates."""

    requests: int
    hits: int  # requests that found prompt tokens cached
    prompt_tokens: int
    cached_tokens: int  # prompt tokens not prefilled
    stored_blocks: int
    evicted_blocks: int
    blocks: int
    bytes: int
    budget_bytes: int
    by_adapter: dict[str, int]  # bytes held per adapter ("": no adapter)
    block_tokens: int
    hit_rate: float
    cached_token_rate: float


@dataclass(frozen=True)
class LRUStats(_Stats):
    """A bounded map keyed by what clients pick (`lru.FairLRU`): what it holds and its bounds."""

    entries: int
    cost: int  # the entries' summed cost (tokens for prompt lookup's history; entries elsewhere)
    owners: int  # tenants holding entries
    max_entries: int
    max_cost: int | None
    evictions: int


@dataclass(frozen=True)
class ProposerStats(_Stats):
    """One speculative proposer's verification counters."""

    passes: int
    proposed: int
    accepted: int
    acceptance_rate: float  # accepted / proposed
    mean_accepted: float  # accepted per pass
    kv_cache_bytes: int | None = None  # the draft model's own KV cache (None: no model)
    history: LRUStats | None = None  # prompt lookup's outputs per adapter and salt (None: a draft model)


@dataclass(frozen=True)
class SpeculationStats(_Stats):
    """Both proposers: prompt lookup always, the draft model when one is loaded."""

    prompt_lookup: ProposerStats
    draft: ProposerStats | None

    def method(self, name: str | None) -> ProposerStats | None:
        """The counters of `speculative=name` ("prompt-lookup" or "draft"), None for none."""
        return {"prompt-lookup": self.prompt_lookup, "draft": self.draft}.get(name or "")


@dataclass(frozen=True)
class EngineStats(_Stats):
    """`Engine.stats()`: the adapter store, the KV caches, the prompt cache (None: off), the
    proposers, memory by kind (e.g. `rss_bytes`, `peak_rss_bytes`, device bytes) and the backend."""

    adapters: StoreStats
    kv_cache: KVStats
    prompt_cache: PromptCacheStats | None
    speculative: SpeculationStats
    grammars: LRUStats  # compiled structured-output grammars, by schema
    memory: dict[str, int]
    backend: str
