"""Speculative decoding: decode speed with and without it, side by side in one run.

(a) the json-prompt demo task with prompt lookup (an extraction adapter: its output copies spans
of the input and repeats its structure from one request to the next); (b) free chat with the base
model: prompt lookup, and each draft export given (--draft, e.g. int8 and int4 exports of the same
model); (c) the cost of one verification pass (the last token and k proposals) against one decode
step, and of one draft step; (d) the batch effect: the json-prompt task at batch 1, 2, 4 and 8
with every row speculating alone against the batch decoding together. Each request runs with and
without speculation, interleaved, on one engine; greedy; decode tokens/s counts the tokens after
the first (the prefill is the same either way).

    python -m benchmarks.speculative EXPORT_DIR [--draft INT8_EXPORT] [--draft INT4_EXPORT]
        [--threads N] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, machine, median
from demo.tasks import split
from prefixport.adapters import convert_checkpoint
from prefixport.runtime import Engine
from prefixport.runtime.generation import decode_step, prefill, prefill_new

CHAT = ["Write a haiku about the sea.", "Explain photosynthesis in two sentences.", "Give me three tips for sleep.",
        "What is a prime number?", "Describe a cat to someone who has never seen one.",
        "Why is the sky blue?", "Write a limerick about a programmer.", "How do vaccines work?",
        "Suggest a name for a bakery.", "What is the difference between weather and climate?"]


def side_by_side(engine: Engine, requests: list[tuple[object, str | None]], new_tokens: int, method: str,
                 plain_engine: Engine | None = None) -> dict:
    """Each request greedy without and with speculation (who goes first alternates), without it
    on `plain_engine` if given (an engine without a draft: its threads spin as by default; 50 ms
    between the two engines let the other's threads go idle); the proposer's counters over these
    requests."""
    before = engine.stats().speculative.method(method).to_dict()
    rows = []
    for i, (prompt, adapter) in enumerate(requests):
        got = {}
        for mode in (None, method)[:: 1 if i % 2 == 0 else -1]:
            if plain_engine is not None:
                time.sleep(0.05)
            runner = plain_engine if plain_engine is not None and mode is None else engine
            got[mode or "plain"] = runner.generate(prompt, adapter=adapter, max_new_tokens=new_tokens, speculative=mode)
        rows.append({"identical": got["plain"].token_ids == got[method].token_ids,
                     "tokens": len(got["plain"].token_ids),
                     "plain_s": got["plain"].timings["decode_s"], "speculative_s": got[method].timings["decode_s"]})
    after = engine.stats().speculative.method(method).to_dict()
    passes, proposed, accepted = (after[k] - before[k] for k in ("passes", "proposed", "accepted"))
    decoded = sum(r["tokens"] - 1 for r in rows)
    plain, spec = sum(r["plain_s"] for r in rows), sum(r["speculative_s"] for r in rows)
    return {"method": method, "requests": len(rows), "identical": sum(r["identical"] for r in rows),
            "decoded_tokens": decoded, "plain_tokens_per_s": decoded / plain, "speculative_tokens_per_s": decoded / spec,
            "speedup": plain / spec, "passes": passes, "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted": accepted / passes if passes else 0.0}


def batch_effect(engine: Engine, prompts: list[str], adapter: str, sizes: tuple[int, ...], new_tokens: int) -> list[dict]:
    """Decode tokens/s of batches of `size` json-prompt requests: plain (one decode step for all
    rows) against prompt lookup with every row verifying alone (`speculate_max_batch` = size)."""
    out, default = [], engine.speculate_max_batch
    for size in sizes:
        engine.speculate_max_batch = size
        times = {"plain": 0.0, "speculative": 0.0}
        tokens, identical = 0, True
        for start in range(0, len(prompts) - size + 1, size):
            group = prompts[start : start + size]
            got = {}
            for mode in (None, "prompt-lookup")[:: 1 if start % (2 * size) == 0 else -1]:
                t = time.perf_counter()
                got[mode] = engine.generate_batch(group, [adapter] * size, max_new_tokens=new_tokens, speculative=mode)
                times["speculative" if mode else "plain"] += time.perf_counter() - t
            identical &= [r.token_ids for r in got[None]] == [r.token_ids for r in got["prompt-lookup"]]
            tokens += sum(len(r.token_ids) for r in got[None])
        out.append({"batch": size, "tokens": tokens, "identical": identical,
                    "plain_tokens_per_s": tokens / times["plain"],
                    "speculative_tokens_per_s": tokens / times["speculative"],
                    "speedup": times["plain"] / times["speculative"]})
        print(json.dumps(out[-1]), flush=True)
    engine.speculate_max_batch = default
    return out


def step_ms(engine: Engine, context: int, tokens: int, repeats: int = 20) -> float:
    """Median ms of a run of `tokens` tokens (logits at each) after `context` tokens."""
    m = engine.manifest
    ids = list(np.random.default_rng(0).integers(100, 1000, context))
    _, cache = prefill_new(engine.backend, [ids], extra=tokens + 2)
    length = int(cache.lengths[0])
    none = np.zeros((1, 0, m.hidden_size), np.dtype(m.dtype))
    times = []
    for _ in range(repeats):
        cache.lengths[0] = length
        t = time.perf_counter()
        if tokens == 1:
            decode_step(engine.backend, cache, np.array([5], np.int64), m.hidden_size, np.dtype(m.dtype))
        else:
            prefill(engine.backend, cache, 0, [[5] * tokens], none, 0, every=True)
        times.append(time.perf_counter() - t)
    return median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--draft", action="append", default=[], help="A draft export (repeatable).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = parser.parse_args()
    options = {"threads": args.threads} if args.threads else {}
    engine = Engine.load(args.export_dir, **options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "json-prompt.safetensors"
        convert_checkpoint(ROOT / "demo" / "adapters" / "json-prompt", args.export_dir, name="json-prompt", out=path)
        engine.add_adapter("json-prompt", path)
    _, test = split("json")
    engine.generate("Hello", max_new_tokens=4)  # warm-up
    result = {"machine": machine(), "model": engine.manifest.source, "threads": args.threads}
    json_requests = [(ex["prompt"], "json-prompt") for ex in test[: args.requests]]
    chat = [([{"role": "user", "content": q}], None) for q in CHAT[: args.requests]]
    result["json_prompt_lookup"] = side_by_side(engine, json_requests, 48, "prompt-lookup")
    result["chat"] = [side_by_side(engine, chat, 96, "prompt-lookup")]
    result["pass_cost"] = [{"context": c, "decode_step_ms": step_ms(engine, c, 1),
                            "verify_ms": {k + 1: step_ms(engine, c, k + 1) for k in (2, 4, 5)}} for c in (64, 512)]
    result["batch_effect"] = batch_effect(engine, [ex["prompt"] for ex in test[:16]], "json-prompt", (1, 2, 4, 8), 48)
    for draft in args.draft:
        drafted = Engine.load(args.export_dir, draft=draft, **options)
        drafted.generate("Hello", max_new_tokens=4, speculative="draft")  # warm-up
        quantization = json.loads((Path(draft) / "prefixport.json").read_text()).get("quantization")
        row = side_by_side(drafted, chat, 96, "draft", plain_engine=engine)
        same = side_by_side(drafted, chat[:4], 96, "draft")  # plain on the draft's engine (threads spin in runs only)
        drafted.close()
        alone = Engine.load(draft, prompt_cache_bytes=0, **options)
        row.update(draft=str(draft), quantization=quantization, draft_step_ms=step_ms(alone, 64, 1),
                   target_step_ms=step_ms(engine, 64, 1), plain_on_draft_engine_tokens_per_s=same["plain_tokens_per_s"])
        alone.close()
        result["chat"].append(row)
    engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
