"""What sharing one run between decode rows and a prefill chunk could save (docs/design.md,
"Chunked prefill"): a step of chunked prefill as prefixport runs it (the decode step of 8 rows at a
past of 500, then a chunk of C prompt tokens at batch 1 over a past of 256) against one run of
8 + C positions (a fresh prefill: the rows a packed shared run would push through every weight,
its attention left out, so a lower bound of that run's time). Interleaved rounds in one process.

    python -m benchmarks.chunked_prefill [EXPORT_DIR] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_EXPORT, RESULTS, command, machine, machine_line, rel, say, write_report
from prefixport.runtime import Engine
from prefixport.runtime.generation import decode_step, prefill
from prefixport.runtime.kv_cache import CacheSettings, KVCache

ROWS, PAST, CHUNK_PAST = 8, 500, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", nargs="?", default=str(DEFAULT_EXPORT))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", default="64,128,256")
    parser.add_argument("--out", default=str(RESULTS / "chunked_prefill"))
    args = parser.parse_args()
    engine = Engine.load(args.export_dir, threads=args.threads, prompt_cache_bytes=0)
    m, backend = engine.manifest, engine.backend
    dtype, rng = np.dtype(m.dtype), np.random.default_rng(0)
    none = np.zeros((1, 0, m.hidden_size), dtype)
    chunks = [int(c) for c in args.chunks.split(",")]
    cache = KVCache(backend, m, CacheSettings(max_rows=ROWS + 2, budget_mb=None), PAST + max(chunks) + 8)
    for _ in range(ROWS + 2):
        cache.admit(PAST + max(chunks) + 4)
    ids = rng.integers(0, m.vocab_size, PAST).tolist()
    for row in range(ROWS):  # 8 rows decoding at a past of 500
        prefill(backend, cache, row, [ids], none, 0)
    prefill(backend, cache, ROWS, [ids[:CHUNK_PAST]], none, 0)  # the row being prefilled
    tokens = rng.integers(0, m.vocab_size, ROWS)  # the decoding rows, packed from row 0
    say(f"{rel(args.export_dir)}: {args.rounds} rounds, chunks {chunks}")
    results = {}
    for chunk in chunks:
        piece = rng.integers(0, m.vocab_size, chunk).tolist()
        packed = rng.integers(0, m.vocab_size, ROWS + chunk).tolist()
        split, shared = [], []
        for _ in range(args.rounds + 1):
            start = time.perf_counter()
            decode_step(backend, cache, tokens, m.hidden_size, dtype)
            prefill(backend, cache, ROWS, [piece], none, 0)
            split.append(time.perf_counter() - start)
            cache.lengths[:ROWS] = PAST
            cache.lengths[ROWS] = CHUNK_PAST
            start = time.perf_counter()
            prefill(backend, cache, ROWS + 1, [packed], none, 0)
            shared.append(time.perf_counter() - start)
            cache.lengths[ROWS + 1] = 0
        split_ms, shared_ms = statistics.median(split[1:]) * 1e3, statistics.median(shared[1:]) * 1e3
        results[str(chunk)] = {"two_runs_ms": round(split_ms, 2), "one_run_lower_bound_ms": round(shared_ms, 2),
                               "saving_at_most": round(1 - shared_ms / split_ms, 3)}
        say(f"chunk {chunk}: decode + chunk {split_ms:.1f} ms, one run of {ROWS + chunk} rows {shared_ms:.1f} ms")
    info = machine("onnxruntime")
    lines = [f"Chunked prefill, one step: decode of {ROWS} rows (past {PAST}) + a chunk at batch 1 (past "
             f"{CHUNK_PAST}), against one run of {ROWS} + chunk rows (no past: a lower bound of a shared run). "
             f"{rel(args.export_dir)}, {args.threads} threads, median of {args.rounds} interleaved rounds; "
             f"{machine_line(info)}", "", "| chunk | two runs (ms) | one run, at least (ms) | saving at most |",
             "|---|---|---|---|"]
    lines += [f"| {c} | {r['two_runs_ms']:.1f} | {r['one_run_lower_bound_ms']:.1f} | {r['saving_at_most']:.0%} |"
              for c, r in results.items()]
    write_report(Path(args.out), "chunked_prefill", {"command": command("chunked_prefill"), "export": rel(args.export_dir),
                                                      "threads": args.threads, "rounds": args.rounds, "machine": info,
                                                      "results": results}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
