"""The adapter store: registered bundles, kept resident on the backend's device under a byte
budget (least recently used evicted first, re-read from its file on the next use).

Thread-safe. A request holds the `Resident` it acquired, so unregistering or evicting an adapter
never disturbs a request already in flight.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import manifest as mf
from ..adapters.bundle import Bundle, check_bundle, check_fits, load_bundle
from ..adapters.prompt_format import PromptFormat
from ..errors import AdapterError
from .backends import Backend
from .feed import AdapterFeed
from .kv_scales import KVScales
from .stats import AdapterStats, StoreStats

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    path: Path | None  # None: registered from memory, so pinned (never evicted)
    kind: str
    n_virtual: int
    nbytes: int  # resident: a soft prompt in the export's dtype, a prefix in the cache's (int8: a quarter)
    prompt_format: PromptFormat | None  # how its prompts were formatted in training; None: not recorded
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterStore:
    """Adapters by name; `budget_bytes=None` keeps every registered adapter resident. With an int8
    KV cache (`kv_scales`), a prefix's keys and values are held quantised with the graph's scales,
    once, as they are read: every request copies them into its cache row as they are."""

    def __init__(self, backend: Backend, manifest: mf.Manifest, budget_bytes: int | None = None,
                 kv_scales: KVScales | None = None) -> None:
        self.backend, self.manifest, self.budget_bytes = backend, manifest, budget_bytes
        if manifest.kv_quantized and kv_scales is None:
            raise AdapterError("an int8 KV cache needs its scales to hold prefix adapters (KVScales.load)")
        self.kv_scales = kv_scales
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, AdapterFeed] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()

    def register(self, name: str, path: str | Path | None = None, bundle: Bundle | None = None) -> Bundle:
        """Check a bundle against the export and make it resident (replacing one of the same name)."""
        if bundle is None and path is not None:
            bundle = load_bundle(path, self.manifest)
        elif bundle is not None and path is None:
            check_bundle(bundle, name)
            check_fits(bundle, self.manifest, name)
        else:
            raise AdapterError("register an adapter from a path or from a bundle: give exactly one")
        limits = self.backend.limits
        if limits and bundle.n_virtual > limits.max_virtual:
            raise AdapterError(f"{name} has {bundle.n_virtual} virtual tokens, more than the TensorRT engine's "
                               f"max_virtual {limits.max_virtual}; rebuild it with a larger --max-virtual")
        feed = self._feed(name, bundle)
        if self.kv_scales is not None and bundle.kind == "prefix":
            clipped = self.kv_scales.clipped([t[None] for t in bundle.prefix(self.manifest.num_layers)])
            if clipped:  # the int8 range of some channels is too narrow for this prefix: it is clipped
                log.warning("adapter %s: %.2f%% of its prefix keys and values lie beyond the int8 KV cache's "
                            "range and are clipped (its outputs may change); export with --check-adapter for it "
                            "so that the cache's scales cover it", name, 100 * clipped)
        dtype = self.manifest.kv_dtype if bundle.kind == "prefix" else self.manifest.dtype
        resident_bytes = sum(t.size for t in bundle.tensors.values()) * np.dtype(dtype).itemsize
        entry = _Entry(name, Path(path) if path is not None else None, bundle.kind, bundle.n_virtual, resident_bytes,
                       bundle.prompt_format)
        with self._lock:
            self._entries[name] = entry
            self._resident[name] = feed
            self._resident.move_to_end(name)
            self._evict(keep=name)
        return bundle

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise AdapterError(f"no adapter named {name!r} is registered")
            self._resident.pop(name, None)

    def acquire(self, name: str) -> AdapterFeed:
        """The adapter's device-resident inputs; re-read from its file if it was evicted."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise self._unknown(name)
            feed = self._resident.get(name)
            if feed is not None:
                entry.hits += 1
                self._resident.move_to_end(name)
                return feed
            entry.misses += 1
            path = entry.path
            assert path is not None  # an entry without a file is pinned: never evicted
        # Read outside the lock: other requests go on meanwhile.
        feed = self._feed(name, load_bundle(path, self.manifest))
        with self._lock:
            if self._entries.get(name) is entry:  # still registered, and not replaced meanwhile
                self._resident[name] = feed
                self._resident.move_to_end(name)
                self._evict(keep=name)
        return feed

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def n_virtual(self, name: str) -> int:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise self._unknown(name)
        return entry.n_virtual

    def prompt_format(self, name: str) -> PromptFormat | None:
        """How the adapter's prompts were formatted in training (its bundle's), or None if not recorded."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise self._unknown(name)
        return entry.prompt_format

    def stats(self) -> StoreStats:
        with self._lock:
            per = {n: AdapterStats(kind=e.kind, n_virtual=e.n_virtual, bytes=e.nbytes, resident=n in self._resident,
                                   pinned=e.path is None, hits=e.hits, misses=e.misses, evictions=e.evictions)
                   for n, e in self._entries.items()}
        return StoreStats(registered=len(per), resident=sum(a.resident for a in per.values()),
                          resident_bytes=sum(a.bytes for a in per.values() if a.resident),
                          budget_bytes=self.budget_bytes, hits=sum(a.hits for a in per.values()),
                          misses=sum(a.misses for a in per.values()),
                          evictions=sum(a.evictions for a in per.values()), adapters=per)

    def _unknown(self, name: str) -> AdapterError:
        """The error for an adapter that is not registered. Lock held."""
        known = ", ".join(sorted(self._entries)) or "none"
        return AdapterError(f"no adapter named {name!r} is registered (registered: {known}); "
                            "add it with Engine.add_adapter")

    def _feed(self, name: str, bundle: Bundle) -> AdapterFeed:
        dtype = np.dtype(self.manifest.dtype)
        digest = tensors_digest(bundle)
        if bundle.kind == "prompt":
            embeds = np.ascontiguousarray(bundle.tensors["prompt_embeds"][None], dtype)
            return AdapterFeed(prompt_embeds=self.backend.upload(embeds), virtual=bundle.n_virtual, name=name,
                               digest=digest)
        if bundle.kind in ("lora", "ia3"):
            return AdapterFeed(weights=weight_tables(bundle, dtype, self.backend.upload), name=name, digest=digest)
        arrays = [t[None] for t in bundle.prefix(self.manifest.num_layers)]
        if self.kv_scales is None:
            past = [self.backend.upload(np.ascontiguousarray(a, dtype)) for a in arrays]
        else:  # the cache's int8, with the graph's own scales and rounding
            past = [self.backend.upload(a, np.dtype(np.int8)) for a in self.kv_scales.quantize(arrays)]
        return AdapterFeed(past=past, past_len=bundle.n_virtual, name=name, digest=digest)

    def _evict(self, keep: str) -> None:
        """Evict least recently used adapters (not `keep`, not pinned) until under budget. Lock held."""
        if self.budget_bytes is None:
            return
        used = sum(self._entries[n].nbytes for n in self._resident)
        for name in list(self._resident):
            if used <= self.budget_bytes:
                break
            entry = self._entries[name]
            if name == keep or entry.path is None:
                continue
            del self._resident[name]
            entry.evictions += 1
            used -= entry.nbytes


def weight_tables(bundle: Bundle, dtype: np.dtype, upload: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """A LoRA's or IA3's tensors as one row of the graph's tables (`weight_rows.py`), by input name,
    each [1, 1, n, dim]: A as PEFT saved it [r, in], B transposed and times its module's scaling
    [r, out] (as many bytes as the bundle's), an IA3 vector [1, dim]."""
    scalings = bundle.scalings
    tables = {}
    for name, tensor in bundle.tensors.items():
        if name.endswith(".b"):  # lora.{layer}.{path}.b
            tensor = tensor.astype(np.float32).T * np.float32(scalings[name[len("lora."): -len(".b")]])
        elif name.startswith("ia3."):
            tensor = tensor[None]
        tables[name] = upload(np.ascontiguousarray(tensor[None, None], dtype))
    return tables


def tensors_digest(bundle: Bundle) -> str:
    """sha256 over a bundle's kind and tensors (names, dtypes, shapes, bytes): what its outputs depend on."""
    h = hashlib.sha256(bundle.kind.encode())
    for name in sorted(bundle.tensors):
        t = np.ascontiguousarray(bundle.tensors[name])
        h.update(f"|{name}|{t.dtype.str}|{t.shape}|".encode())
        h.update(t.data)
    return h.hexdigest()
