"""Throughput and latency of `prefixport serve` under concurrent clients with mixed adapters, beside
the same requests one at a time, measured in one run on one machine.

The workload is a fixed, seeded list of R chat requests: the models of GET /v1/models (the base
model and every adapter) taken in turn, prompts of three lengths (an instruction alone, with a
few sentences of context, with a paragraph), `max_tokens` M with `ignore_eos` (every request
generates M tokens), greedy (temperature 0), streamed (`stream: true`, `stream_options.include_usage`). The runs, each over all R requests:

  - engine, one at a time: `Engine.generate` in this process, no HTTP (the same token ids, the same
    adapters; run while the server sits idle, and closed before the HTTP runs);
  - HTTP, C clients for each C in --concurrency (always with C = 1: the same load sent one at a
    time over HTTP): C asyncio clients pull the next request from the shared list until none is left.

Per run: wall time, requests/s, generated tokens/s (completion tokens from the usage chunk),
latency p50/p95 (send to the last byte), time to first token p50/p95 (send to the first chunk
with a choice: the server sends one with the first token, even when its text is still held
back), the mean decode batch size (deltas of the server's `prefixport_batch_size` histogram:
rows per decode step), the CPU seconds used meanwhile by the server, by this client process (it
must not eat the cores it measures: 2 cores here) and by every other process (noise: the table
flags a run where others took over 10% of the cores), and how many texts equal the engine's.
Speedup = requests/s over that of the HTTP 1-client run and of the engine run, same run.

The server is `prefixport serve` in a subprocess on a free 127.0.0.1 port (--max-batch: the
largest concurrency unless given), warmed up (one short request per model, then one short burst at
the largest concurrency), and stopped at the end, also on an error or Ctrl-C.

    python -m benchmarks.serve_load [--export exports/smollm2-135m-instruct] [--adapters DIR] \\
        [--requests 64] [--max-tokens 32] [--concurrency 1 8 32] [--threads N] [--quick] \\
        [--out benchmarks/results/serve_load]

Writes OUT/serve_load.json and OUT/serve_load.md (with --quick: serve_load_quick.*, so that a
smoke run never overwrites the figures); prints the table, then one JSON line. The server's own
output goes to a log file under the temp folder (its path is printed). Needs the `serve` extra
and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (DEFAULT_EXPORT, RESULTS, CpuMeter, cell, command, distribution, free_port, machine,
                               machine_line, rel, say, write_report)
from benchmarks.serving import Outcome, Request, ServerProcess, http_run, workload
from prefixport.bench.measure import spread


@dataclass
class RunResult:
    name: str
    clients: int
    wall_s: float
    outcomes: list[Outcome]
    cpu_s: dict[str, float | None]  # client (this process), server, others (the rest of the machine)
    batch: dict[str, Any] = field(default_factory=dict)


def cpu_split(meter: CpuMeter) -> dict[str, float | None]:
    """A meter's CPU seconds as this benchmark records them: client, server, others."""
    return {"client": meter.result["client_s"], "server": meter.result["server_s"], "others": meter.result["others_s"]}


_METRIC = re.compile(r'^prefixport_batch_size_(sum|count|bucket)(?:\{le="([^"]+)"\})? ([0-9.eE+-]+)$')


def batch_histogram(client: httpx.Client, base: str) -> dict[str, float]:
    """The server's decode batch-size histogram: sum, count and cumulative buckets le=..."""
    out: dict[str, float] = {}
    for line in client.get(f"{base}/metrics").text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m[1] if m[1] != "bucket" else f"le={m[2]}"] = float(m[3])
    return out


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What a run added to the histogram: decode steps, row-steps, mean rows per step, steps by width."""
    steps = after.get("count", 0) - before.get("count", 0)
    rows = after.get("sum", 0) - before.get("sum", 0)
    cumulative = {k[3:]: after[k] - before.get(k, 0) for k in after if k.startswith("le=")}
    return {"decode_steps": int(steps), "row_steps": int(rows), "mean": rows / steps if steps else None,
            "steps_at_most": {k: int(v) for k, v in cumulative.items()}}


# --- the engine, no HTTP ---------------------------------------------------------------------------

def engine_run(export: Path, adapters_dir: Path, base_model: str, requests: list[Request], max_tokens: int,
               threads: int | None, server_pid: int) -> RunResult:
    """The same requests through `Engine.generate` in this process, one at a time (the idle server's
    CPU is metered too)."""
    from prefixport.runtime import Engine

    engine = Engine.load(export, **({"threads": threads} if threads else {}))
    try:
        for path in sorted(adapters_dir.glob("*.safetensors")):  # as the server registers them
            engine.add_adapter(path.stem, path)

        def call(req: Request, tokens: int) -> Outcome:
            adapter = None if req.model == base_model else req.model
            start = time.perf_counter()
            r = engine.generate(req.messages(), max_new_tokens=tokens, temperature=0.0, adapter=adapter,
                                stop_token_ids=[])  # as ignore_eos
            return Outcome(latency_s=time.perf_counter() - start, ttft_s=r.timings["prefill_s"],
                           completion_tokens=len(r.token_ids), prompt_tokens=r.prompt_tokens, text=r.text,
                           finish_reason=r.finish_reason)

        say("engine: warming up ...")
        seen = set()
        for req in requests:
            if req.model not in seen:
                seen.add(req.model)
                call(req, 4)
        say(f"engine: {len(requests)} requests one at a time ...")
        with CpuMeter(server_pid) as meter:
            start = time.perf_counter()
            outcomes = [call(req, max_tokens) for req in requests]
            wall = time.perf_counter() - start
        return RunResult("engine, one at a time (no HTTP)", 1, wall, outcomes, cpu_split(meter))
    finally:
        engine.close()


# --- summary -----------------------------------------------------------------------------------

def summarize(run: RunResult, reference: list[Outcome] | None) -> dict[str, Any]:
    """A run's figures; `reference`: the engine run's outcomes, whose texts the run's are compared with."""
    ok = [o for o in run.outcomes if o.error is None]
    tokens = sum(o.completion_tokens for o in ok)

    finish: dict[str, int] = {}
    for o in ok:
        finish[o.finish_reason or "?"] = finish.get(o.finish_reason or "?", 0) + 1
    others = run.cpu_s["others"]
    same, differ = None, None
    if reference is not None:
        differ = [i for i, (o, r) in enumerate(zip(run.outcomes, reference))
                  if not (o.error is None and r.error is None and o.text == r.text)]
        same = len(run.outcomes) - len(differ)
    return {
        "clients": run.clients, "wall_s": run.wall_s, "requests": len(run.outcomes), "ok": len(ok),
        "errors": [f"#{i}: {o.error}" for i, o in enumerate(run.outcomes) if o.error is not None],
        "requests_per_s": len(ok) / run.wall_s, "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / run.wall_s,
        "latency_ms": distribution([o.latency_s for o in ok], 1000),
        "ttft_ms": distribution([o.ttft_s for o in ok if o.ttft_s is not None], 1000),
        "finish_reasons": finish, "same_text_as_engine": same, "text_differs_from_engine": differ,
        "decode_batch": run.batch or None,
        "cpu_s": run.cpu_s, "others_share": None if others is None else others / (run.wall_s * (os.cpu_count() or 1)),
        "per_request": {"latency_s": [round(o.latency_s, 4) for o in run.outcomes],
                        "ttft_s": [None if o.ttft_s is None else round(o.ttft_s, 4) for o in run.outcomes],
                        "completion_tokens": [o.completion_tokens for o in run.outcomes]},
    }


def markdown(result: dict[str, Any]) -> str:
    """The report: the runs' table, the noise warning, the workload and the machine."""
    w = result["workload"]
    lines = [
        f"# Server load: {result['model']} ({result['export']}), mixed adapters", "",
        f"{w['requests']} chat requests over {', '.join(f'`{k}` x{v}' for k, v in w['per_model'].items())}; "
        f"prompts of {w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} tokens "
        f"(median {w['prompt_tokens']['p50']:.0f}; {', '.join(f'{k} x{v}' for k, v in w['per_length'].items())}); "
        f"max_tokens {result['max_tokens']}, temperature 0, streamed. Server: `--max-batch {result['max_batch']}`, "
        f"threads {result['threads'] or 'all cores'}. Each run sends all requests once; C clients each send the next "
        "request when their previous one ends. Latency: send to last byte; TTFT: send to first token's chunk; "
        "batch: mean rows per decode step (server histogram). Speedup: requests/s over the 1-client HTTP run "
        "and over the engine run (no HTTP), same run. CPU s: used during the run by the server, by the client "
        "(this process; the engine run's work is client), and by other processes on the machine (noise).", "",
        "| run | wall s | req/s | gen tok/s | latency p50 / p95 ms | TTFT p50 / p95 ms | mean batch | "
        "speedup vs 1 client | vs engine | errors | same text as engine | CPU s server / client / others |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        lat, ttft, batch = r["latency_ms"], r["ttft_ms"], r["decode_batch"]
        cpu = r["cpu_s"]
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} | "
            + (f"{lat['p50']:.0f} / {lat['p95']:.0f} | " if lat else "- | ")
            + (f"{ttft['p50']:.0f} / {ttft['p95']:.0f} | " if ttft else "- | ")
            + (f"{batch['mean']:.2f} | " if batch and batch["mean"] is not None else "- | ")
            + (f"{r['speedup_vs_http_1']:.2f}x | " if r.get("speedup_vs_http_1") else "- | ")
            + (f"{r['speedup_vs_engine']:.2f}x | " if r.get("speedup_vs_engine") else "- | ")
            + f"{len(r['errors'])} | "
            + (f"{r['same_text_as_engine']}/{r['requests']} | " if r["same_text_as_engine"] is not None else "- | ")
            + f"{cell(cpu['server'])} / {cell(cpu['client'])} / {cell(cpu['others'])} |")
    noisy = {name: r["others_share"] for name, r in result["runs"].items() if (r["others_share"] or 0) > 0.1}
    if noisy:
        lines += ["", "**Noisy machine:** other processes used " + ", ".join(
            f"{100 * v:.0f}% of the cores during \"{k}\"" for k, v in noisy.items()) + "; these figures are not clean."]
    lines += ["", "Generated tokens per request (mean, by model): "
              + ", ".join(f"`{k}` {v:.1f}" for k, v in w["completion_tokens_by_model"].items())
              + f"; {w['stopped_before_max_tokens']} of {w['requests']} requests stopped before max_tokens "
              "(`ignore_eos`: none should).",
              "", machine_line(result["machine"]), "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all)", ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT, help="the export folder to serve")
    parser.add_argument("--adapters", type=Path, default=None, help="adapters folder (default: EXPORT/adapters)")
    parser.add_argument("--requests", type=int, help="requests per run (default 64; --quick 12)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens per request (default 32; --quick 16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="concurrent clients per HTTP run (1 is always run: the one-at-a-time baseline)")
    parser.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: largest concurrency)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine run")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--quick", action="store_true", help="12 requests of 16 tokens: a smoke run (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load")
    args = parser.parse_args()
    n = args.requests or (12 if args.quick else 64)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    concurrency = sorted(set(args.concurrency) | {1})
    max_batch = args.max_batch or max(concurrency)
    adapters_dir = args.adapters or args.export / "adapters"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped too
    began = time.perf_counter()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_args = ["serve", str(args.export), "--adapters", str(adapters_dir), "--host", "127.0.0.1",
                  "--port", str(port), "--max-batch", str(max_batch)]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    log_path = Path(tempfile.mkstemp(prefix="serve_load-", suffix=".log")[1])
    say(f"starting prefixport {' '.join(serve_args)} (log: {log_path}) ...")
    runs: list[RunResult] = []
    with ServerProcess(serve_args, log_path) as server, httpx.Client(timeout=30) as sync:
        load_s = server.wait_healthy(base, 300)
        listing = sync.get(f"{base}/v1/models").json()["data"]
        models = [m["id"] for m in listing]
        base_model = next(m["id"] for m in listing if not m.get("parent"))
        say(f"server up in {load_s:.1f} s, models: {', '.join(models)}")
        if len(models) == 1:
            say(f"warning: no adapters registered from {adapters_dir}; see {log_path}:\n{server.tail()}")
        requests = workload(models, n, args.seed)

        say("server: warming up ...")
        warm = [workload(models, len(models), args.seed + 1), workload(models, max(concurrency), args.seed + 2)]
        for reqs, clients in ((warm[0], 1), (warm[1], max(concurrency))):
            _, outs = asyncio.run(http_run(base, reqs, clients, 4))
            bad = [o.error for o in outs if o.error]
            if bad:
                raise SystemExit(f"warm-up requests failed: {bad[:3]}\n{server.tail()}")

        engine: RunResult | None = None
        if not args.no_engine:
            engine = engine_run(args.export, adapters_dir, base_model, requests, max_tokens, args.threads,
                                server.pid)
            runs.append(engine)
        for clients in concurrency:
            say(f"HTTP: {n} requests, {clients} client(s) ...")
            before = batch_histogram(sync, base)
            with CpuMeter(server.pid) as meter:
                wall, outcomes = asyncio.run(http_run(base, requests, min(clients, n), max_tokens))
            after = batch_histogram(sync, base)
            name = f"HTTP, {clients} clients" if clients > 1 else "HTTP, 1 client (one at a time)"
            run = RunResult(name, clients, wall, outcomes, cpu_split(meter), batch_delta(before, after))
            runs.append(run)
            errors = [o.error for o in outcomes if o.error]
            say(f"  {wall:.1f} s, {len(outcomes) / wall:.2f} req/s, mean batch {run.batch['mean'] or 0:.2f}"
                + (f", {len(errors)} errors, first: {errors[0]}" if errors else ""))
            if not server.alive():
                raise SystemExit(f"the server died:\n{server.tail()}")
        health = sync.get(f"{base}/health").json()
    say(f"server stopped (log: {log_path})")

    reference = engine.outcomes if engine else None
    results = {r.name: summarize(r, reference) for r in runs}
    http_1 = next(results[r.name] for r in runs if r is not engine and r.clients == 1)["requests_per_s"]
    for r in results.values():
        r["speedup_vs_http_1"] = r["requests_per_s"] / http_1
        r["speedup_vs_engine"] = r["requests_per_s"] / results[engine.name]["requests_per_s"] if engine else None
    first_ok = next((r for r in runs if r.name.startswith("HTTP")), runs[0]).outcomes
    prompt_tokens = [o.prompt_tokens for o in first_ok if o.error is None and o.prompt_tokens]
    per_model: dict[str, int] = {}
    per_length: dict[str, int] = {}
    for req in requests:
        per_model[req.model] = per_model.get(req.model, 0) + 1
        per_length[req.length] = per_length.get(req.length, 0) + 1
    answers = (engine or next(r for r in runs if r.clients == 1 and r is not engine)).outcomes
    by_model: dict[str, list[int]] = {}
    for req, o in zip(requests, answers):
        by_model.setdefault(req.model, []).append(o.completion_tokens)
    result = {
        "benchmark": "serve_load", "quick": args.quick, "export": rel(args.export), "adapters": rel(adapters_dir),
        "model": base_model, "models": models, "max_batch": max_batch, "threads": args.threads,
        "max_tokens": max_tokens, "concurrency": concurrency, "seed": args.seed, "command": command("serve_load"),
        "server_command": "prefixport " + shlex.join(rel(a) if a in (str(args.export), str(adapters_dir))
                                                     else a for a in serve_args), "server_load_s": load_s,
        "server_health_after": health,
        "workload": {"requests": n, "per_model": per_model, "per_length": per_length,
                     "prompt_tokens": spread(prompt_tokens) if prompt_tokens else {"min": 0, "max": 0, "p50": 0},
                     "completion_tokens_by_model": {k: sum(v) / len(v) for k, v in by_model.items()},
                     "stopped_before_max_tokens": sum(o.finish_reason == "stop" for o in answers),
                     "prompts": [{"model": r.model, "length": r.length, "prompt": r.prompt, "answer": o.text}
                                 for r, o in zip(requests, answers)]},
        "definitions": {
            "latency": "client: request sent to the last byte of the stream",
            "ttft": "client: request sent to the first chunk with a choice (the first token); "
                    "engine run: Engine.generate's prefill_s",
            "mean batch": "server prefixport_batch_size histogram: delta sum / delta count over the run",
            "speedup": "requests/s over the HTTP 1-client run's, and over the engine run's"},
        "runs": results, "machine": machine(), "seconds": time.perf_counter() - began,
    }
    table = markdown(result)
    wrote = write_report(args.out, "serve_load" + ("_quick" if args.quick else ""), result, table)
    print(table)
    summary = {"benchmark": "serve_load", "quick": args.quick, "requests": n, "max_tokens": max_tokens,
               "max_batch": max_batch, "seconds": round(result["seconds"], 1),
               "wrote": [str(p) for p in wrote],
               "runs": {name: {"req_per_s": round(r["requests_per_s"], 3),
                               "gen_tok_per_s": round(r["completion_tokens_per_s"], 1),
                               "latency_p50_ms": r["latency_ms"] and round(r["latency_ms"]["p50"]),
                               "latency_p95_ms": r["latency_ms"] and round(r["latency_ms"]["p95"]),
                               "ttft_p50_ms": r["ttft_ms"] and round(r["ttft_ms"]["p50"]),
                               "ttft_p95_ms": r["ttft_ms"] and round(r["ttft_ms"]["p95"]),
                               "mean_batch": r["decode_batch"] and r["decode_batch"]["mean"] and
                               round(r["decode_batch"]["mean"], 2),
                               "speedup_vs_http_1": round(r["speedup_vs_http_1"], 2),
                               "errors": len(r["errors"])} for name, r in results.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server is already stopped (the `with` above)
        print("interrupted; the server is stopped", file=sys.stderr)
        sys.exit(130)
