"""The benchmark scripts, the comparisons a user reruns, each run from the checkout as
`python -m benchmarks.NAME` (docs/benchmarks.md, "Running the scripts"); the test tools (fuzzers,
soak) are in tools/."""
