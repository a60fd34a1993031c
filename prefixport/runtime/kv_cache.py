"""The KV cache: one preallocated buffer per layer and K/V, `[rows, kv_heads, capacity, head_dim]`,
with per-row lengths (docs/design.md, "The KV cache").

A request owns one row (its slot) from its prefill until it leaves: the row holds its prefix
adapter's keys and values, its soft prompt and its tokens contiguously from slot 0 (slot index =
position). Rows join and leave without touching other rows. The buffers grow geometrically (one
copy per doubling, never per step) and never past the settings' bounds:
`bytes = rows x capacity x 2 x layers x kv_heads x head_dim x dtype size`.

KV is taken as used: a row holds room for what it has plus the next step's growth (`hold`), not
for its worst case; when the rows in use outgrow the budget, the batch preempts one
(`DecodeBatch`: its slots to host memory, back when there is room again).

The graph is bound on the buffers in place: as past and present at once where the export's
attention writes in place (`manifest.cache == "shared"`), or with a scratch present copied back
after each run (`"copy"`: `--no-optimize` and TensorRT graphs).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import PrefixportError
from .stats import KVCacheStats
from .weight_rows import WeightRows

if TYPE_CHECKING:
    from .. import manifest as mf
    from .backends import Backend
    from .feed import AdapterFeed

MIN_CAPACITY = 64  # slots a fresh buffer holds at least
DEFAULT_BUDGET_MB = 2048


@dataclass(frozen=True)
class CacheSettings:
    """Bounds of one KV cache: rows decoding at once, slots per row, and bytes in all."""

    max_rows: int | None = None  # None: as many as the budget allows
    max_context: int | None = None  # slots per row; None: the model's (or TensorRT engine's) context
    budget_mb: float | None = DEFAULT_BUDGET_MB  # None: unbounded

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise PrefixportError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_context is not None and self.max_context < 1:
            raise PrefixportError(f"max_context must be >= 1, got {self.max_context}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise PrefixportError(f"the KV cache budget must be > 0 MB, got {self.budget_mb}")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * 2**20)


def slot_bytes(manifest: mf.Manifest) -> int:
    """Bytes one slot (one position of one row) takes over every layer, keys and values, in the
    cache's dtype (`manifest.kv_dtype`: an int8 cache takes a quarter of a float32 one)."""
    return 2 * manifest.num_layers * manifest.num_kv_heads * manifest.head_dim * np.dtype(manifest.kv_dtype).itemsize


def row_bytes(manifest: mf.Manifest, slots: int) -> int:
    """Bytes a row of `slots` slots costs in a cache of this export (a "copy" graph's scratch included)."""
    return slots * slot_bytes(manifest) * (1 if manifest.cache == "shared" else 2)


def slot_limit(manifest: mf.Manifest, settings: CacheSettings, context: int) -> int:
    """Slots one row may reach: the context, the settings' max_context, and what the budget holds
    for a row alone."""
    limit = min(context, settings.max_context or context)
    budget = settings.budget_bytes
    return limit if budget is None else min(limit, budget // row_bytes(manifest, 1))


class KVCache:
    """Rows of slots on the backend's device; `lengths[row]` slots of each row are filled."""

    def __init__(self, backend: Backend, manifest: mf.Manifest, settings: CacheSettings, context: int) -> None:
        self.backend, self.settings = backend, settings
        self.shared = manifest.cache == "shared"
        self.heads, self.head_dim, self.tensors = manifest.num_kv_heads, manifest.head_dim, 2 * manifest.num_layers
        self.slot_bytes = slot_bytes(manifest)
        self._slot_cost = row_bytes(manifest, 1)  # a slot with a "copy" graph's scratch
        self.max_context = min(settings.max_context or context, context)
        self._row_limit = slot_limit(manifest, settings, context)
        self.max_rows = settings.max_rows
        self.budget = settings.budget_bytes
        self.rows = self.capacity = 0  # allocated
        self.buffers: list[Any] = []  # 2L x [rows, kv_heads, capacity, head_dim]: key, value per layer
        self._scratch: list[Any] = []  # "copy" graphs: where present is written before it is copied back
        self.lengths = np.zeros(0, np.int64)  # filled slots per row
        self._needs: dict[int, int] = {}  # row in use -> slots it may reach (its worst case)
        self._holds: dict[int, int] = {}  # row in use -> slots it has room for now (KV taken as used)
        self._views: dict[tuple[int, int], tuple[list[Any], list[Any]]] = {}  # bind()'s, until the buffers change
        # an export with --lora: each row's LoRA and IA3 tables, which move with the row (weight_rows.py)
        self.weight_rows = WeightRows(backend, manifest.weights, manifest.num_layers) if manifest.weights else None
        self.grows = 0  # buffer allocations (for stats and tests)
        self.swaps = 0  # rows preempted to host memory (`swap_out`)

    # --- rows ---------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold now (the scratch of a "copy" graph included)."""
        return self.rows * self.capacity * self._slot_cost

    @property
    def active(self) -> int:
        """Rows a decode step spans: up to the last row in use (free rows below it ride along)."""
        return max(self._needs) + 1 if self._needs else 0

    def in_use(self) -> list[int]:
        return sorted(self._needs)

    def used(self, stop: int) -> np.ndarray:
        """[stop] bool: which of rows [0, stop) hold a request."""
        mask = np.zeros(stop, bool)
        mask[[r for r in self._needs if r < stop]] = True
        return mask

    def fits_alone(self, need: int) -> bool:
        """Whether one row reaching `need` slots fits these bounds at all."""
        return need <= self._row_limit

    def admit(self, need: int, hold: int | None = None, headroom: int = 0) -> int | None:
        """Take the lowest free row for a request that may reach `need` slots and takes `hold`
        slots now (default: `need`, its worst case), or None while the rows in use leave no room
        for it (bounds: max_rows, max_context, budget; with `headroom` more slots for every row)."""
        if not self.fits_alone(need):
            raise PrefixportError(f"a row of {need} slots does not fit this KV cache")
        hold = need if hold is None else min(hold, need)
        row = next(r for r in range(len(self._needs) + 1) if r not in self._needs)
        rows = max(row + 1, self.active)
        if self.max_rows is not None and rows > self.max_rows:
            return None
        if not self.fits(rows, max([hold, *self._holds.values()]) + headroom):
            return None
        self._needs[row], self._holds[row] = need, hold
        self.reserve(rows, 0)
        self.lengths[row] = 0
        return row

    def fits(self, rows: int, slots: int) -> bool:
        """Whether `rows` rows of `slots` slots fit the budget."""
        return self.budget is None or rows * min(slots, self.max_context) * self._slot_cost <= self.budget

    def hold(self, row: int, slots: int) -> None:
        """Row `row` needs room for `slots` slots from now on (never below what it held)."""
        self._holds[row] = max(self._holds[row], min(slots, self._needs[row]))

    def spare(self, row: int) -> int:
        """Slots row `row` may take beyond its next one, within max_context and, with the rows in
        use as many, the budget."""
        top = min(self.max_context, self._needs[row])
        if self.budget is not None:
            top = min(top, self.budget // (max(self.active, 1) * self._slot_cost))
        return top - int(self.lengths[row]) - 1

    @property
    def room(self) -> bool:
        """Whether the rows in use fit the budget with what they hold (else one must leave)."""
        return self.fits(self.active, max(self._holds.values(), default=0))

    def release(self, row: int) -> None:
        """The row's request left: its slots are free for the next one (nothing is copied)."""
        self._needs.pop(row, None)
        self._holds.pop(row, None)
        self.lengths[row] = 0
        if self.weight_rows is not None:
            self.weight_rows.clear(row)

    def set_adapter(self, row: int, feed: AdapterFeed | None) -> None:
        """The row's LoRA and IA3 tables become those of its request's adapter (an export with
        --lora; other adapters and none leave the row without)."""
        if self.weight_rows is not None:
            self.weight_rows.write(row, feed)
        elif feed is not None and feed.weights:
            raise PrefixportError(f"adapter {feed.name} is a LoRA or IA3, and this export takes none: "
                                  "re-export with `prefixport export --lora`")

    def swap_out(self, row: int) -> list[np.ndarray]:
        """Preempt the row: its filled slots copied to host memory (one [kv_heads, length,
        head_dim] array per tensor), then released. `swap_in` puts them back bitwise."""
        arrays = [np.array(a) for a in self.read(row)]
        self.release(row)
        self.swaps += 1
        return arrays

    def swap_in(self, row: int, arrays: list[np.ndarray]) -> None:
        """A preempted row's slots (`swap_out`'s arrays) into the admitted row `row`."""
        if arrays[0].shape[1]:
            self.write(row, [a[None] for a in arrays])

    def exchange(self, a: int, b: int) -> None:
        """Rows `a` and `b` (both in use) trade places: slots, lengths and bounds (one through a
        host copy)."""
        keep = [np.array(x) for x in self.read(a)]
        need, hold = self._needs.pop(a), self._holds.pop(a)
        if self.weight_rows is not None:
            self.weight_rows.exchange(a, b)
        self._move(b, a)
        self._needs[b], self._holds[b] = need, hold
        if keep[0].shape[1]:
            self.write(b, [x[None] for x in keep])

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s request moves to the free row `dst` (its filled slots copied, and its LoRA and
        IA3 tables): rows stay packed from row 0 when one in the middle leaves, the decoding ones first."""
        if self.weight_rows is not None:
            self.weight_rows.move(src, dst)
        self._move(src, dst)

    def _move(self, src: int, dst: int) -> None:
        n = int(self.lengths[src])
        if n:
            for buffer in self.buffers:
                self.backend.copy_into(buffer, buffer[src : src + 1], row=dst, slots=n)
        self._needs[dst], self._holds[dst] = self._needs.pop(src), self._holds.pop(src)
        self.lengths[dst], self.lengths[src] = n, 0

    # --- buffers ------------------------------------------------------------------------------

    def reserve(self, rows: int, capacity: int) -> None:
        """At least `rows` rows of `capacity` slots: grown geometrically within the bounds, the
        rows in use copied over once."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        cap = max(capacity, self.capacity)
        if cap > self.capacity:
            cap = min(max(cap, 2 * self.capacity, MIN_CAPACITY), self.max_context)
        n = max(rows, self.rows)
        if n > self.rows:
            n = max(n, 2 * self.rows)
            if self.max_rows is not None:
                n = min(n, self.max_rows)
        if self.budget is not None:  # geometric headroom only where the budget allows it
            if n * cap * self._slot_cost > self.budget:
                n = max(rows, self.active)
            if n * cap * self._slot_cost > self.budget:  # as many slots as the budget allows these rows
                cap = max(capacity, min(self.budget // (n * self._slot_cost), self.max_context))
        if cap:  # rows admitted before their first token need no slots yet: nothing to allocate
            self._allocate((n, self.heads, cap, self.head_dim))
        if self.weight_rows is not None:
            self.weight_rows.grow(n, keep=self.active)
        lengths = np.zeros(n, np.int64)
        m = min(n, len(self.lengths))
        lengths[:m] = self.lengths[:m]
        self.rows, self.capacity, self.lengths = n, cap, lengths
        self._views = {}

    def _allocate(self, shape: tuple[int, int, int, int]) -> None:
        """New buffers of `shape`, the rows in use copied over (their filled slots only)."""
        keep = self.active
        buffers = [self.backend.allocate(shape) for _ in range(self.tensors)]
        if keep and self.capacity:
            filled = int(self.lengths[:keep].max(initial=0))  # never more than the new capacity
            for new, old in zip(buffers, self.buffers):
                self.backend.copy_into(new, old[:keep], slots=filled)
        self.buffers = buffers
        self._scratch = [] if self.shared else [self.backend.allocate(shape) for _ in range(self.tensors)]
        self.grows += 1

    def write(self, row: int, arrays: list[Any], at: int = 0, slots: int | None = None) -> None:
        """Keys and values ([1, kv_heads, n, head_dim] each, as the backend holds them: a prefix
        adapter's, or a prompt cache block's), their first `slots` (default: all n), into the
        row's slots from `at`; the row then holds at + slots slots."""
        n = arrays[0].shape[2] if slots is None else slots
        self.reserve(row + 1, at + n)
        for buffer, array in zip(self.buffers, arrays):
            self.backend.copy_into(buffer, array, row=row, slots=n, at=at)
        self.lengths[row] = at + n

    def copy_out(self, row: int, start: int, n: int) -> Any:
        """The row's slots [start, start + n) as one new buffer [2 x layers, kv_heads, n, head_dim]
        on the backend's device (tensor t is `buffer[t:t+1]`, in `write`'s order)."""
        out = self.backend.allocate((self.tensors, self.heads, n, self.head_dim))
        for t, buffer in enumerate(self.buffers):
            self.backend.copy_into(out, buffer[row : row + 1], row=t, slots=n, src_at=start)
        return out

    def bind(self, start: int, stop: int) -> tuple[list[Any], list[Any], Sequence[Any] | None]:
        """(past, present, weights) views of rows [start, stop) to run the graph on (weights: their
        LoRA and IA3 tables, an export with --lora; None: they hold none, run the plain graph): the
        same lists while the buffers stay (a backend may keep its binding for them)."""
        views = self._views.get((start, stop))
        if views is None:
            past = [b[start:stop] for b in self.buffers]
            views = self._views[(start, stop)] = (past, past if self.shared else [s[: stop - start] for s in self._scratch])
        weights = self.weight_rows.bind(start, stop) if self.weight_rows is not None else ()
        return views[0], views[1], weights

    def commit(self, start: int, stop: int) -> None:
        """After a run on rows [start, stop) (lengths updated): a "copy" graph's present becomes the
        rows' cache, their filled slots only."""
        if not self.shared:
            filled = int(self.lengths[start:stop].max(initial=0))
            for buffer, scratch in zip(self.buffers, self._scratch):
                self.backend.copy_into(buffer, scratch[: stop - start], row=start, slots=filled)

    def read(self, row: int) -> list[np.ndarray]:
        """The row's filled slots, one [kv_heads, length, head_dim] array per tensor (host copies)."""
        n = int(self.lengths[row])
        return [self.backend.to_numpy(b[row : row + 1])[0, :, :n] for b in self.buffers]

    def stats(self) -> KVCacheStats:
        return KVCacheStats(bytes=self.nbytes, rows=self.rows, capacity=self.capacity, rows_in_use=len(self._needs),
                            slot_bytes=self.slot_bytes, budget_bytes=self.budget, reallocations=self.grows,
                            preemptions=self.swaps)


class CachePool:
    """An Engine's KV caches under one `CacheSettings`: each made here is counted while it lives
    (`stats`), and the larger of those handed back stays for the next direct call. Thread-safe."""

    def __init__(self, backend: Backend, manifest: mf.Manifest, settings: CacheSettings, context: int) -> None:
        self.backend, self.manifest, self.settings, self.context = backend, manifest, settings, context
        self._alive: weakref.WeakSet[KVCache] = weakref.WeakSet()
        self._idle: KVCache | None = None  # kept for the next direct call; others are freed
        self._lock = threading.Lock()

    def new(self) -> KVCache:
        """A cache of its own (a scheduler keeps one for its life)."""
        cache = KVCache(self.backend, self.manifest, self.settings, self.context)
        with self._lock:
            self._alive.add(cache)
        return cache

    def borrow(self) -> KVCache:
        """A cache for one direct call: the idle one, or a new one when calls run concurrently."""
        with self._lock:
            cache, self._idle = self._idle, None
        return cache or self.new()

    def give_back(self, cache: KVCache) -> None:
        """Keep the larger of this cache and the idle one for the next call; the other is freed."""
        with self._lock:
            if self._idle is None or cache.nbytes > self._idle.nbytes:
                self._idle = cache

    def stats(self) -> list[KVCacheStats]:
        """Each live cache's."""
        with self._lock:
            caches = list(self._alive)
        return [c.stats() for c in caches]
