"""Speculative decoding by prompt lookup: batch-1 decode speed with and without it.

(a) the json-prompt demo task (an extraction adapter: its output copies spans of the input and
repeats its structure from one request to the next); (b) free chat with the base model; (c) the
cost of one verification pass (the last token and k proposals) against one decode step. Each
request runs with and without speculation, interleaved, on one engine; greedy; decode tokens/s
counts the tokens after the first (the prefill is the same either way).

    python benchmarks/speculative.py EXPORT_DIR [--threads N] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from prefixport.adapters import convert_checkpoint
from prefixport.bench.machine import describe
from prefixport.runtime import Engine
from prefixport.runtime.generation import decode_step, prefill, prefill_new

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "demo"))
from tasks import split  # noqa: E402

CHAT = ["Write a haiku about the sea.", "Explain photosynthesis in two sentences.", "Give me three tips for sleep.",
        "What is a prime number?", "Describe a cat to someone who has never seen one.",
        "Why is the sky blue?", "Write a limerick about a programmer.", "How do vaccines work?",
        "Suggest a name for a bakery.", "What is the difference between weather and climate?"]


def side_by_side(engine: Engine, requests: list[tuple[object, str | None]], new_tokens: int) -> dict:
    """Each request greedy without and with speculation (who goes first alternates)."""
    rows = []
    for i, (prompt, adapter) in enumerate(requests):
        got = {}
        for mode in (None, "prompt-lookup")[:: 1 if i % 2 == 0 else -1]:
            r = engine.generate(prompt, adapter=adapter, max_new_tokens=new_tokens, speculative=mode)
            got[mode or "plain"] = r
        rows.append({"identical": got["plain"].token_ids == got["prompt-lookup"].token_ids,
                     "tokens": len(got["plain"].token_ids),
                     "plain_s": got["plain"].timings["decode_s"], "speculative_s": got["prompt-lookup"].timings["decode_s"]})
    decoded = sum(r["tokens"] - 1 for r in rows)
    plain, spec = sum(r["plain_s"] for r in rows), sum(r["speculative_s"] for r in rows)
    return {"requests": len(rows), "identical": sum(r["identical"] for r in rows), "decoded_tokens": decoded,
            "plain_tokens_per_s": decoded / plain, "speculative_tokens_per_s": decoded / spec,
            "speedup": plain / spec}


def pass_cost(engine: Engine, context: int, k: int, repeats: int = 20) -> dict:
    """ms of one decode step and of one verification run of 1 + k tokens, after `context` tokens."""
    m = engine.manifest
    ids = list(np.random.default_rng(0).integers(100, 1000, context))
    step, verify = [], []
    for _ in range(repeats):
        _, cache = prefill_new(engine.backend, [ids], extra=k + 2)
        length = int(cache.lengths[0])
        t = time.perf_counter()
        decode_step(engine.backend, cache, np.array([5], np.int64), m.hidden_size, np.dtype(m.dtype))
        step.append(time.perf_counter() - t)
        cache.lengths[0] = length
        none = np.zeros((1, 0, m.hidden_size), np.dtype(m.dtype))
        t = time.perf_counter()
        prefill(engine.backend, cache, 0, [[5] * (k + 1)], none, 0, every=True)
        verify.append(time.perf_counter() - t)
    return {"context": context, "k": k, "decode_step_ms": statistics.median(step) * 1000,
            "verify_ms": statistics.median(verify) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
    args = parser.parse_args()
    engine = Engine.load(args.export_dir, **({"threads": args.threads} if args.threads else {}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "json-prompt.safetensors"
        convert_checkpoint(ROOT / "demo" / "adapters" / "json-prompt", args.export_dir, name="json-prompt", out=path)
        engine.add_adapter("json-prompt", path)
    _, test = split("json")
    engine.generate("Hello", max_new_tokens=4)  # warm-up
    result = {"machine": describe(), "model": engine.manifest.source, "threads": args.threads}
    result["json_prompt_lookup"] = side_by_side(
        engine, [(ex["prompt"], "json-prompt") for ex in test[: args.requests]], 48)
    result["json_lookup_stats"] = engine.stats()["speculative"]
    before = dict(engine.stats()["speculative"])
    result["chat_prompt_lookup"] = side_by_side(
        engine, [([{"role": "user", "content": q}], None) for q in CHAT[: args.requests]], 96)
    after = engine.stats()["speculative"]
    passes, accepted = after["passes"] - before["passes"], after["accepted"] - before["accepted"]
    result["chat_lookup_mean_accepted"] = accepted / passes if passes else 0.0
    result["pass_cost"] = [pass_cost(engine, c, 5) for c in (64, 512)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
