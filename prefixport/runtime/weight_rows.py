"""LoRA and IA3 tables per cache row (docs/design.md, "LoRA and IA3"), for an export made with
`--lora`: beside each KV cache row, the LoRA and the IA3 vectors its request's adapter brings.

Each table is one buffer on the backend's device, `[rows, 1, n, dim]`: a LoRA's A
(`[rows, 1, max_rank, in]`, PEFT's lora_A.weight) and B (`[rows, 1, max_rank, out]`, lora_B.weight
transposed times its scaling), an IA3 vector (`[rows, 1, 1, dim]`). A row without a LoRA holds zeros
(a lower rank: zeros past it), without IA3 ones. A request's tables are written into its row once,
when it joins (a copy of its adapter's bytes), and move with the row; a run binds rows
[start, stop) as they lie. A run where no row holds a LoRA binds tables of rank 0 instead (nothing
to read or multiply), and the IA3 vectors are read whole (ones: small); where the backend has the
export's plain graph open, a run where no row holds either binds nothing and runs that graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import manifest as mf
from .backends import Backend
from .feed import AdapterFeed


class WeightRows:
    """The tables of a KV cache's rows; `grow` follows the cache's rows."""

    def __init__(self, backend: Backend, weights: mf.WeightAdapters, num_layers: int) -> None:
        self.backend = backend
        self.dtype = np.dtype(backend.manifest.dtype)
        self.names = weights.input_names(num_layers)
        # name -> (n, dim) of one row's table
        self.shapes = {name: weights.row_shape(name, weights.max_rank) for name in self.names}
        self.lora_names = [n for n in self.names if n.startswith("lora.")]
        self.rows = 0
        self.tables: dict[str, Any] = {}  # name -> [rows, 1, n, dim]; LoRA ones only once a row holds one
        self._empty: dict[str, Any] = {}  # LoRA name -> [rows, 1, 0, dim]: rank 0, for runs without LoRA
        self._ones: dict[str, Any] = {}  # IA3 name -> [1, 1, 1, dim] of ones, to reset a row
        self._rank = np.zeros(0, np.int64)  # per row: the LoRA rank written (0: none)
        self._ia3 = np.zeros(0, bool)  # per row: whether it holds IA3 vectors
        self._views: dict[tuple[int, int, bool], list[Any]] = {}

    def grow(self, rows: int, keep: int) -> None:
        """Room for `rows` rows, rows [0, keep) copied over."""
        if rows <= self.rows:
            return
        old, self.tables = self.tables, {}
        for name in self.names:
            if name.startswith("ia3."):
                self._ones.setdefault(name, self.backend.upload(np.ones((1, 1, *self.shapes[name]), self.dtype)))
                self.tables[name] = self._table(name, rows, ones=True)
            else:
                self._empty[name] = self.backend.allocate((rows, 1, 0, self.shapes[name][1]), self.dtype)
                if name in old:
                    self.tables[name] = self._table(name, rows)
            if name in old and keep:
                self.backend.copy_into(self.tables[name], old[name][:keep])
        rank, ia3 = np.zeros(rows, np.int64), np.zeros(rows, bool)
        rank[: len(self._rank)], ia3[: len(self._ia3)] = self._rank, self._ia3
        self.rows, self._rank, self._ia3, self._views = rows, rank, ia3, {}

    def _table(self, name: str, rows: int, ones: bool = False) -> Any:
        """A zeroed table of `rows` rows (IA3: ones)."""
        table = self.backend.allocate((rows, 1, *self.shapes[name]), self.dtype)
        for row in range(rows) if ones else ():
            self.backend.copy_into(table, self._ones[name], row=row)
        return table

    def write(self, row: int, feed: AdapterFeed | None) -> None:
        """The row's tables become its request's adapter's (a LoRA, IA3 vectors, or neither). The
        views `bind` handed out stay valid: only the first LoRA row allocates (new views then)."""
        weights = feed.weights if feed is not None and feed.weights is not None else {}
        lora = any(n.startswith("lora.") for n in weights)
        if lora and not all(n in self.tables for n in self.lora_names):
            for name in self.lora_names:  # the first LoRA row: the LoRA tables, zeros
                self.tables[name] = self._table(name, self.rows)
            self._views = {}
        rank = 0
        for name in self.lora_names if lora or self._rank[row] else ():
            src = weights.get(name)
            r = 0 if src is None else int(src.shape[2])
            if r:
                self.backend.copy_into(self.tables[name], src, row=row)
            if r < self._rank[row]:  # zeros past this rank (a higher one was written before)
                self._zero(name, row, r, int(self._rank[row]))
            rank = max(rank, r)
        self._rank[row] = rank
        if weights or self._ia3[row]:
            for name in (n for n in self.names if n.startswith("ia3.")):
                self.backend.copy_into(self.tables[name], weights.get(name, self._ones[name]), row=row)
            self._ia3[row] = any(n.startswith("ia3.") for n in weights)

    def _zero(self, name: str, row: int, start: int, stop: int) -> None:
        zeros = np.zeros((1, 1, stop - start, self.shapes[name][1]), self.dtype)
        self.backend.copy_into(self.tables[name], zeros, row=row, slots=stop - start, at=start)

    def clear(self, row: int) -> None:
        """The row holds no adapter any more."""
        if self._rank[row] or self._ia3[row]:
            self.write(row, None)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s tables to row `dst` (src then holds none)."""
        if self._rank[src] or self._ia3[src] or self._rank[dst] or self._ia3[dst]:
            for name, table in self.tables.items():
                self.backend.copy_into(table, table[src : src + 1], row=dst)
            self._rank[dst], self._ia3[dst] = self._rank[src], self._ia3[src]
        self.clear(src)

    def exchange(self, a: int, b: int) -> None:
        """Rows `a` and `b` trade tables (one through a host copy)."""
        if not (self._rank[a] or self._ia3[a] or self._rank[b] or self._ia3[b]):
            return
        for table in self.tables.values():
            keep = np.array(self.backend.to_numpy(table[a : a + 1]))
            self.backend.copy_into(table, table[b : b + 1], row=a)
            self.backend.copy_into(table, keep, row=b)
        self._rank[[a, b]], self._ia3[[a, b]] = self._rank[[b, a]], self._ia3[[b, a]]

    def bind(self, start: int, stop: int) -> list[Any] | None:
        """Rows [start, stop)'s tables in graph order, each [stop - start, n, dim]: rank 0 where none
        of them holds a LoRA; None where none holds a LoRA or IA3 and the backend runs the plain
        graph then. The same list while nothing changes (a backend keeps its binding)."""
        lora = bool(self._rank[start:stop].any())
        if not lora and self.backend.runs_plain and not self._ia3[start:stop].any():
            return None
        key = (start, stop, lora)
        views = self._views.get(key)
        if views is None:
            views = []
            for name in self.names:
                table = self.tables[name] if name.startswith("ia3.") or key[2] else self._empty[name]
                view = table[start:stop]  # [B, 1, n, dim] -> the graph's [B, n, dim] (IA3: n = 1)
                views.append(view.reshape((stop - start, *view.shape[2:])))
            self._views[key] = views
        return views
