"""Continuous batching against a static batch: C concurrent requests through `prefixport serve`
beside one `Engine.generate_batch` of the same C prompts, side by side in one run.

Both sides get the same C chat requests (base model, greedy, `max_tokens` N with EOS ignored, so
each makes exactly N tokens) and the same intra-op threads. Tokens/s = C x N / wall time, prefill
included on both sides: for HTTP from sending the first request to the last byte of the last
response (C asyncio clients, streamed); for the engine, the `generate_batch` call. The two runs
alternate R times (the server idles while the engine runs, in this process); medians and the
ratio HTTP / static are reported. The texts of both sides must be equal.

    python -m benchmarks.serve_vs_batch [--export exports/smollm2-135m-instruct] [--concurrency 16]
        [--max-tokens 64] [--repeats 5] [--threads N] [--out benchmarks/results/serve_vs_batch]

Writes OUT/serve_vs_batch.json and prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import DEFAULT_EXPORT, RESULTS, alternate, free_port, machine, say
from benchmarks.serving import ServerProcess, http_run, scrape_metrics, workload
from prefixport.bench.measure import spread
from prefixport.runtime import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both sides")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_vs_batch")
    args = parser.parse_args()
    engine = Engine.load(args.export, threads=args.threads)
    model = "base"
    requests = workload([model], args.concurrency, seed=0)
    prompts = [r.messages() for r in requests]
    n, c = args.max_tokens, args.concurrency
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp()) / "server.log"
    server_args = ["serve", str(args.export), "--port", str(port), "--max-batch", str(c), "--model-name", model,
                   "--threads", str(args.threads), "--prefill-budget", "100000"]
    texts: dict[str, list[str]] = {}

    def http() -> float:
        say("  HTTP ...")
        wall, outcomes = asyncio.run(http_run(base, requests, c, n))
        errors = [o.error for o in outcomes if o.error]
        if errors:
            raise SystemExit(f"HTTP errors: {errors[:3]}")
        texts["http"] = [o.text for o in outcomes]
        return wall

    def static() -> float:
        say("  static batch ...")
        start = time.perf_counter()
        results = engine.generate_batch(prompts, max_new_tokens=n, stop_token_ids=[])
        wall = time.perf_counter() - start
        texts["static"] = [r.text for r in results]
        return wall

    with ServerProcess(server_args, log) as server:
        server.wait_healthy(base, 300)
        asyncio.run(http_run(base, requests, c, 4))  # warm-up, both sides
        engine.generate_batch(prompts, max_new_tokens=4, stop_token_ids=[])
        say(f"{args.repeats} repetitions, the two sides alternating ...")
        walls = alternate({"http": http, "static": static}, args.repeats)
        metrics = httpx.get(f"{base}/metrics").text
    tps = {side: spread([c * n / w for w in ws]) for side, ws in walls.items()}
    same = sum(a == b for a, b in zip(texts["http"], texts["static"]))
    result = {
        "benchmark": "serve_vs_batch", "export": str(args.export), "concurrency": c, "max_tokens": n,
        "repeats": args.repeats, "threads": args.threads, "tokens_per_s": tps,
        "ratio_http_over_static": tps["http"]["p50"] / tps["static"]["p50"], "same_texts": f"{same}/{c}",
        "prompt_tokens": [len(engine.encode(p)) for p in prompts],
        "kv_cache_bytes_after": scrape_metrics(metrics).get("prefixport_kv_cache_bytes"),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_vs_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print("| side | tokens/s (median) | min-max |\n|---|---|---|\n"
          + "".join(f"| {s} | {t['p50']:.1f} | {t['min']:.1f}-{t['max']:.1f} |\n" for s, t in tps.items())
          + f"\n{c} requests x {n} tokens, {args.threads} threads, {m['cpu']}, {m['cores']} cores: "
          f"HTTP / static = {result['ratio_http_over_static']:.2f}x; texts equal {same}/{c}")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))


if __name__ == "__main__":
    main()
