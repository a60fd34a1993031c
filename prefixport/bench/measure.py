"""Measuring helpers: the one percentile definition, spreads of repeated timings, process memory.

The standard library alone at import (benchmarks/common.py and `prefixport bench serve` use it
without loading the runtime)."""

from __future__ import annotations

import gc
import math
import time
from typing import Callable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The quantile `q` (0 to 1) of `values`, interpolated linearly between the two nearest ranks:
    position q × (n - 1) in the sorted values (numpy's default method, as vLLM's, GuideLLM's and
    AIPerf's reports use). p50 is the median; p0 and p100 are the min and max. Every percentile in
    prefixport's benchmarks is this one."""
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within 0 and 1, not {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median: `percentile(values, 0.5)` (the middle value, or the mean of the two middle ones)."""
    return percentile(values, 0.5)


def summary(values: Sequence[float], scale: float = 1.0,
            quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float] | None:
    """n, mean, min, max and the `quantiles` (keys p50, p90, p99, ...) of `values` times `scale`
    (1000: seconds to ms), by `percentile`. None without values."""
    if not values:
        return None
    out = {"n": len(values), "mean": scale * math.fsum(values) / len(values), "min": scale * min(values)}
    for q in quantiles:
        out[f"p{100 * q:g}"] = scale * percentile(values, q)
    out["max"] = scale * max(values)
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Median (p50), p95, min, max and count of repeated measurements (never a single timing);
    percentiles by `percentile`."""
    ordered = sorted(values)
    return {"p50": percentile(ordered, 0.5), "p95": percentile(ordered, 0.95), "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


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
    from ..runtime.backends import process_memory

    gc.collect()
    stats = process_memory()
    return stats.get("rss_bytes", stats["peak_rss_bytes"])
