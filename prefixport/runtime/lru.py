"""`FairLRU`: a map bounded in entries and in cost, each entry owned by a tenant, whose eviction
takes the least recently used entry of the tenant holding the most (docs/security.md, "Bounded
state"). One tenant that floods it with new keys (schemas, salts) evicts its own entries once it
holds more than any other, never another tenant's below that share. Thread-safe."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from .stats import LRUStats

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FairLRU(Generic[K, V]):
    """At most `max_entries` entries and `max_cost` total cost (None: no cost bound); an entry's
    cost is given when it is put (1 by default: then only the entry bound counts)."""

    def __init__(self, max_entries: int, max_cost: int | None = None) -> None:
        if max_entries < 1 or (max_cost is not None and max_cost < 1):
            raise ValueError(f"a FairLRU needs max_entries >= 1 and max_cost >= 1, got {max_entries}, {max_cost}")
        self.max_entries, self.max_cost = max_entries, max_cost
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[str, V, int]] = {}  # key -> (owner, value, cost)
        self._owners: dict[str, OrderedDict[K, None]] = {}  # owner -> its keys, least recent first
        self._held: dict[str, int] = {}  # owner -> cost held
        self.cost = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value under `key` (now the most recently used of its owner's), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._owners[entry[0]].move_to_end(key)
            return entry[1]

    def put(self, key: K, value: V, owner: str = "", cost: int = 1) -> None:
        """Keep `value` under `key` for `owner`, then evict to the bounds: from the owner holding
        the most cost, its least recently used entry first (the new entry goes last of all). An
        entry that alone exceeds `max_cost` is not kept."""
        with self._lock:
            self._remove(key)
            if self.max_cost is not None and cost > self.max_cost:
                return
            self._entries[key] = (owner, value, cost)
            self._owners.setdefault(owner, OrderedDict())[key] = None
            self._held[owner] = self._held.get(owner, 0) + cost
            self.cost += cost
            while len(self._entries) > self.max_entries or (self.max_cost is not None and self.cost > self.max_cost):
                biggest = max(self._held, key=lambda o: (self._held[o], len(self._owners[o])))
                victim = next(iter(self._owners[biggest]))
                if victim == key and len(self._owners[biggest]) == 1 and len(self._owners) > 1:
                    biggest = max((o for o in self._held if o != owner), key=self._held.__getitem__)
                    victim = next(iter(self._owners[biggest]))
                self._remove(victim)
                self.evictions += 1

    def drop(self, where: Callable[[K], bool]) -> int:
        """Remove every entry whose key matches (an unregistered adapter's, say); how many went."""
        with self._lock:
            gone = [k for k in self._entries if where(k)]
            for key in gone:
                self._remove(key)
            return len(gone)

    def stats(self) -> LRUStats:
        with self._lock:
            return LRUStats(entries=len(self._entries), cost=self.cost, owners=len(self._owners),
                            max_entries=self.max_entries, max_cost=self.max_cost, evictions=self.evictions)

    def _remove(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        owner, _, cost = entry
        keys = self._owners[owner]
        del keys[key]
        self._held[owner] -= cost
        self.cost -= cost
        if not keys:
            del self._owners[owner], self._held[owner]
