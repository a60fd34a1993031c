"""The KV cache's memory during a long run: its bytes against the formula, and the process RSS
step by step (flat once the cache has reached its size).

B rows decode N tokens each in one `DecodeBatch` over one `KVCache` (greedy, EOS ignored); every
S steps the cache's bytes (the buffers themselves: `sum(buffer.nbytes)`), the formula
`rows x capacity x 2 x layers x kv_heads x head_dim x dtype size` and the RSS are recorded.
After the last capacity growth the RSS may move only by allocator noise.

    python -m benchmarks.kv_memory [EXPORT] [--rows 4] [--tokens 600] [--every 25]
        [--out benchmarks/results/kv_memory.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_EXPORT, RESULTS, machine
from prefixport.runtime import Engine
from prefixport.runtime.backends import process_memory
from prefixport.runtime.generation import DecodeBatch
from prefixport.runtime.kv_cache import slot_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", nargs="?", default=str(DEFAULT_EXPORT))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_memory.json")
    args = parser.parse_args()
    engine = Engine.load(args.export)
    m = engine.manifest
    cache = engine.new_cache()
    batch = DecodeBatch(engine.backend, cache, m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0)
    prompts = ["Write a very long story about a lighthouse keeper.", "Explain how a refrigerator works.",
               "List every country in Europe with a fact about each.", "Describe the history of Rome."]
    requests = [engine.prepare(prompts[i % len(prompts)], max_new_tokens=args.tokens, stop_token_ids=[], chat=True)
                for i in range(args.rows)]
    assert batch.join(requests) == args.rows
    samples, step, start = [], 0, time.perf_counter()
    while batch:
        batch.sample()
        batch.advance()
        step += 1
        if step % args.every == 0 or not batch:
            held = sum(b.nbytes for b in cache.buffers)
            formula = cache.rows * cache.capacity * slot_bytes(m)
            samples.append({"step": step, "capacity": cache.capacity, "rows": cache.rows, "cache_bytes": held,
                            "formula_bytes": formula, "rss_bytes": process_memory().get("rss_bytes")})
            assert held == formula, (held, formula)
    last_growth = next(s["step"] for s in samples if s["capacity"] == samples[-1]["capacity"])
    flat = [s["rss_bytes"] for s in samples if s["step"] >= last_growth]
    result = {"benchmark": "kv_memory", "export": args.export, "rows": args.rows, "tokens": args.tokens,
              "seconds": time.perf_counter() - start, "samples": samples,
              "rss_after_last_growth_mib": {"min": min(flat) / 2**20, "max": max(flat) / 2**20,
                                            "from_step": last_growth},
              "cache_bytes_equal_formula": all(s["cache_bytes"] == s["formula_bytes"] for s in samples),
              "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for s in samples:
        print(f"step {s['step']:5d}  capacity {s['capacity']:5d}  cache {s['cache_bytes'] / 2**20:7.1f} MiB  "
              f"RSS {s['rss_bytes'] / 2**20:7.1f} MiB")
    r = result["rss_after_last_growth_mib"]
    print(f"after the last growth (step {r['from_step']}): RSS {r['min']:.1f}-{r['max']:.1f} MiB; "
          f"cache bytes equal the formula at every sample: {result['cache_bytes_equal_formula']}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}))


if __name__ == "__main__":
    main()
