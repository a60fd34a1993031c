"""The prompt cache: time to first token and decode speed with it and without it.

20 requests share a 1,000-token system prompt over three adapters in turn (the demo's soft prompt,
its prefix, none), each with its own user turn. Every request runs on an engine with the prompt
cache and without it — one engine, one ONNX Runtime session, its prompt cache switched off for the
second (two sessions in one process would steal each other's cores while their threads spin) —,
interleaved, one request at a time, so TTFT is the prefill alone (no queueing). Then the same
requests under other block sizes.

    python -m benchmarks.prompt_cache EXPORT_DIR [--threads N] [--requests 20] [--system 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, distribution, machine, median
from prefixport.adapters import convert_checkpoint
from prefixport.runtime import Engine
from prefixport.runtime.prompt_cache import BLOCK_TOKENS, PromptCache

ADAPTERS = ["json-prompt", "date-prefix", None]  # soft prompt, prefix, none: request i uses ADAPTERS[i % 3]
QUESTIONS = ["What does the exporter produce?", "How are adapters converted?", "Which inputs does the graph take?",
             "What is a prefix adapter?", "How does the runtime swap adapters?", "Is torch needed at run time?",
             "What does the KV cache hold?", "How are rows batched?", "What does the server expose?",
             "How is a soft prompt fed?", "What is the bundle format?", "Which backends exist?",
             "How are bad inputs refused?", "What is the default model?", "How is memory bounded?",
             "Summarise the design in one line.", "What does the manifest record?", "How are tokens sampled?",
             "Where do logits come from?", "What is checked against PEFT?"]


def one(engine: Engine, ids: list[int], adapter: str | None, new_tokens: int) -> dict:
    """Time to first token (lookup, copies and prefill included) and the interval of every decode step."""
    request = engine.prepare(ids, adapter=adapter, max_new_tokens=new_tokens, stop_token_ids=[])
    start = time.perf_counter()
    times = [time.perf_counter() for _ in engine.run_rows([request])]
    return {"ttft_s": times[0] - start, "steps_s": list(np.diff(times)), "cached_tokens": request.cached_tokens,
            "tokens": request.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads, the same for both engines")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--blocks", default="16,32,64,128", help="block sizes to sweep")
    parser.add_argument("--out", default=str(RESULTS / "prompt_cache"))
    args = parser.parse_args()
    options = {"threads": args.threads} if args.threads else {}
    cached = Engine.load(args.export_dir, **options)
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, ADAPTERS):
            path = Path(tmp) / f"{name}.safetensors"
            convert_checkpoint(ROOT / "demo" / "adapters" / name, args.export_dir, name=name, out=path)
            cached.add_adapter(name, path)
    system = cached.encode((ROOT / "docs" / "design.md").read_text())[: args.system]
    assert len(system) == args.system, "docs/design.md is shorter than the system prompt asked for"
    requests = [(system + cached.encode(f"\n\nUser: {QUESTIONS[i % len(QUESTIONS)]}\nAssistant:"), ADAPTERS[i % 3])
                for i in range(args.requests)]
    one(cached, system[::-1], None, 2)  # warm-up at full length: session, arenas, the KV cache's capacity
    prompt_cache = cached.prompt_cache = PromptCache(cached.manifest)  # counters from zero

    runs = []
    for i, (ids, adapter) in enumerate(requests):  # interleaved; who goes first alternates
        pair = {}
        for side in ("cache", "plain")[:: 1 if i % 2 == 0 else -1]:
            cached.prompt_cache = prompt_cache if side == "cache" else None
            pair[side] = one(cached, ids, adapter, args.new_tokens)
        cached.prompt_cache = prompt_cache
        runs.append({"adapter": adapter, "prompt_tokens": len(ids), **pair,
                     "identical": pair["cache"]["tokens"] == pair["plain"]["tokens"]})
        print(f"{i:2d} {str(adapter):12s} cached {pair['cache']['cached_tokens']:5d}  TTFT "
              f"{pair['cache']['ttft_s'] * 1000:7.1f} ms vs {pair['plain']['ttft_s'] * 1000:7.1f} ms", flush=True)
    stats = cached.stats().to_dict()
    hits = [r for r in runs if r["cache"]["cached_tokens"]]
    ttft = {"hits_cache": distribution([r["cache"]["ttft_s"] for r in hits]),
            "hits_plain": distribution([r["plain"]["ttft_s"] for r in hits]),
            "all_cache": distribution([r["cache"]["ttft_s"] for r in runs]),
            "all_plain": distribution([r["plain"]["ttft_s"] for r in runs])}
    decode = {side: 1 / median([t for r in runs for t in r[side]["steps_s"]]) for side in ("cache", "plain")}

    sweep = []
    for block in map(int, args.blocks.split(",")):
        cached.prompt_cache = PromptCache(cached.manifest, block_tokens=block)
        got = [one(cached, ids, adapter, 1) for ids, adapter in requests]
        hit_ttft = [g["ttft_s"] for g in got if g["cached_tokens"]]
        sweep.append({"block_tokens": block, "hit_ttft": distribution(hit_ttft),
                      "cached_token_rate": cached.prompt_cache.stats().cached_token_rate})
        print(f"block {block:4d}: hit TTFT p50 {sweep[-1]['hit_ttft']['p50'] * 1000:.1f} ms", flush=True)

    pc = stats["prompt_cache"]
    result = {
        "machine": machine(), "model": cached.manifest.source, "threads": args.threads,
        "requests": args.requests, "system_tokens": args.system, "new_tokens": args.new_tokens,
        "block_tokens": BLOCK_TOKENS, "identical": sum(r["identical"] for r in runs), "ttft": ttft,
        "ttft_hit_speedup_p50": ttft["hits_plain"]["p50"] / ttft["hits_cache"]["p50"],
        "ttft_hit_speedup_p95": ttft["hits_plain"]["p95"] / ttft["hits_cache"]["p95"],
        "decode_tokens_per_s": decode, "decode_ratio": decode["cache"] / decode["plain"],
        "prompt_cache": {k: pc[k] for k in ("bytes", "budget_bytes", "blocks", "hit_rate", "cached_token_rate")},
        "memory": stats["memory"], "sweep": sweep, "runs": [{k: v for k, v in r.items()} for r in runs],
    }
    for r in result["runs"]:
        for side in ("cache", "plain"):
            r[side].pop("tokens")
            r[side]["decode_step_p50_s"] = median(r[side].pop("steps_s"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt_cache.json").write_text(json.dumps(result, indent=1))
    (out / "prompt_cache.md").write_text(markdown(result))
    plot(result, out / "prompt_cache.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    t, m = r["ttft"], r["machine"]
    ms = lambda q: f"{q['p50'] * 1000:.0f} / {q['p95'] * 1000:.0f}"  # noqa: E731
    pc = r["prompt_cache"]
    lines = [f"# Prompt cache: {r['requests']} requests, a {r['system_tokens']}-token system prompt, 3 adapters", "",
             f"{m['cpu']}, {m['cores']} cores; threads {r['threads'] or 'default (all cores)'}; block "
             f"{r['block_tokens']} tokens; {r['new_tokens']} new tokens per request; outputs identical with and "
             f"without the cache: {r['identical']}/{r['requests']}.", "",
             "| TTFT (ms) p50 / p95 | with the cache | without | × |", "|---|---|---|---|",
             f"| hits ({t['hits_cache']['n']} requests) | {ms(t['hits_cache'])} | {ms(t['hits_plain'])} | "
             f"{r['ttft_hit_speedup_p50']:.1f} / {r['ttft_hit_speedup_p95']:.1f} |",
             f"| all {r['requests']} (first use of each adapter misses) | {ms(t['all_cache'])} | {ms(t['all_plain'])} | "
             f"{t['all_plain']['p50'] / t['all_cache']['p50']:.1f} / {t['all_plain']['p95'] / t['all_cache']['p95']:.1f} |",
             "", f"Decode: {r['decode_tokens_per_s']['cache']:.1f} tokens/s with the cache, "
             f"{r['decode_tokens_per_s']['plain']:.1f} without ({r['decode_ratio']:.3f}×; from the median step over "
             "every decode step of the 20 requests).", "",
             f"Prompt cache after the run: {pc['bytes'] / 2**20:.1f} MB in {pc['blocks']} blocks (budget "
             f"{pc['budget_bytes'] / 2**20:.0f} MB); hit rate {pc['hit_rate']:.2f}, cached share of prompt tokens "
             f"{pc['cached_token_rate']:.2f}.", "",
             "| block tokens | hit TTFT p50 / p95 ms | cached share of prompt tokens |", "|---|---|---|"]
    for s in r["sweep"]:
        lines.append(f"| {s['block_tokens']} | {ms(s['hit_ttft'])} | {s['cached_token_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(r["runs"]))
    a.bar(x - 0.2, [run["plain"]["ttft_s"] * 1000 for run in r["runs"]], 0.4, label="without the cache")
    a.bar(x + 0.2, [run["cache"]["ttft_s"] * 1000 for run in r["runs"]], 0.4, label="with the cache")
    a.set_xlabel("request (adapters in turn: soft prompt, prefix, none)")
    a.set_ylabel("time to first token (ms)")
    a.set_title(f"{r['system_tokens']}-token shared system prompt")
    a.legend()
    blocks = [s["block_tokens"] for s in r["sweep"]]
    b.plot(blocks, [s["hit_ttft"]["p50"] * 1000 for s in r["sweep"]], "o-")
    b.set_xscale("log", base=2)
    b.set_xticks(blocks, [str(x) for x in blocks])
    b.set_xlabel("block tokens")
    b.set_ylabel("hit TTFT p50 (ms)")
    b.set_title("block size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
