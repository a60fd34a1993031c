"""The benchmark scripts, each run from the checkout as `python -m benchmarks.NAME` (docs/benchmarks.md)."""
