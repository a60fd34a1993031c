"""Test tools, apart from the benchmarks: the adapter fuzzer (fuzz_adapters, with fuzz_cases and
fuzz_worker), the request fuzzer (fuzz_requests, with fuzz_request_cases) and the soak harness
(soak/). Each runs as a module from the repository's root, `python -m tools.NAME [ARGS]`
(`--help` lists its options), and imports prefixport, tests' helpers and benchmarks' shared
modules (benchmarks.common, benchmarks.serving) from the checkout, without sys.path edits. Their
saved results stay under benchmarks/results/ (docs/security.md cites them).

`interleaved` is the fuzzers' schedule: their families in a weighted round robin."""

from __future__ import annotations


def interleaved(weights: dict[str, int]) -> tuple[str, ...]:
    """A weighted round robin: each name `weight` times, spread evenly (a fuzzer's case i takes
    slot i % len, so a short run has every family too)."""
    slots = [((k + 0.5) / weight, name) for name, weight in weights.items() for k in range(weight)]
    return tuple(name for _, name in sorted(slots))
