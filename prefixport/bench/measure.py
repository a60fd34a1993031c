"""Measuring helpers: spreads of repeated timings, process memory."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

from ..runtime.backends import process_memory


def spread(values: list[float]) -> dict[str, float]:
    """Median, p95, min, max and count of repeated measurements (never a single timing)."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "max": ordered[-1],
            "n": len(ordered)}


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def rss_bytes() -> int:
    """Current resident set size of this process, after a garbage collection (peak RSS where
    /proc is missing)."""
    gc.collect()
    stats = process_memory()
    return stats.get("rss_bytes", stats["peak_rss_bytes"])
