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

    python benchmarks/serve_load.py [--export exports/smollm2-135m-instruct] [--adapters DIR] \\
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
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from prefixport.bench.machine import describe
from prefixport.bench.measure import spread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = ROOT / "exports" / "smollm2-135m-instruct"

# Open-ended instructions (every request generates max_tokens anyway: ignore_eos).
TASKS = [
    "Write a long story about {topic}.",
    "Explain {topic} to a ten-year-old, step by step, in detail.",
    "Write a detailed essay about {topic}.",
    "List twenty facts about {topic}, one per line, each with a sentence of explanation.",
    "Describe a day in the life of someone who works with {topic}.",
    "Write a blog post about the history of {topic}.",
]
TOPICS = ["lighthouses", "honey bees", "the Roman roads", "volcanoes", "steam engines", "coral reefs",
          "the printing press", "glaciers", "bicycles", "tea", "public libraries", "comets",
          "bridges", "mushrooms", "clocks", "desert cities"]
CONTEXT = [
    "The town sits at the mouth of a wide river, and most of its people fish or work at the harbour.",
    "Winters there are long and dark, and summers are short but bright, with light until midnight.",
    "An old stone wall runs along the edge of the market square, built more than four hundred years ago.",
    "The school at the top of the hill has a small museum with maps, tools and letters from the past.",
    "Every autumn the whole village gathers for a festival with music, food and a boat race.",
    "A railway line reached the valley in the last century and changed how everyone lived and worked.",
    "The local newspaper is printed once a week and is read aloud in the cafe on Sunday mornings.",
    "Scientists from the university visit each spring to measure the water, the soil and the birds.",
    "Many families keep gardens behind their houses, growing beans, potatoes and apples.",
    "The road over the pass is closed by snow for three months of the year.",
    "A retired teacher runs a club for children who want to learn how machines work.",
    "Travellers often stop at the inn by the bridge, which has stood there for two centuries.",
]
LENGTHS = {"short": 0, "medium": 3, "long": 10}  # context sentences per prompt


@dataclass
class Request:
    index: int
    model: str
    length: str
    prompt: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


@dataclass
class Outcome:
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RunResult:
    name: str
    clients: int
    wall_s: float
    outcomes: list[Outcome]
    cpu_s: dict[str, float | None]  # client (this process), server, others (the rest of the machine)
    batch: dict[str, Any] = field(default_factory=dict)


def workload(models: list[str], n: int, seed: int) -> list[Request]:
    """n requests, models in turn, prompt lengths and texts drawn with `seed`."""
    rng = random.Random(seed)
    lengths = list(LENGTHS)
    out = []
    for i in range(n):
        length = lengths[(i // len(models)) % len(lengths)] if n >= len(models) * len(lengths) else rng.choice(lengths)
        task = rng.choice(TASKS).format(topic=rng.choice(TOPICS))
        context = " ".join(rng.sample(CONTEXT, LENGTHS[length]))
        prompt = f"{context}\n\n{task}" if context else task
        out.append(Request(i, models[i % len(models)], length, prompt))
    return out


# --- the server --------------------------------------------------------------------------------

def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # Linux: the server gets SIGTERM if this process dies (even SIGKILL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerProcess:
    """`prefixport serve` in a subprocess; a context manager that always stops it."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefixport.cli", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process (all its threads), from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return None

    def wait_healthy(self, base: str, timeout_s: float, say) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not healthy after {timeout_s:.0f} s:\n{self.tail()}")


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, less idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds over a stretch: this process (the client), the server, and everything else on the
    machine (other people's work: the noise in the figures)."""

    def __init__(self, server: "ServerProcess") -> None:
        self.server = server

    def __enter__(self) -> "CpuMeter":
        self.start = (time.process_time(), self.server.cpu_s(), machine_busy_s())
        return self

    def __exit__(self, *exc) -> None:
        end = (time.process_time(), self.server.cpu_s(), machine_busy_s())
        d = [None if a is None or b is None else b - a for a, b in zip(self.start, end)]
        others = None if None in d else max(0.0, d[2] - d[0] - d[1])
        self.cpu_s = {"client": d[0], "server": d[1], "others": others}


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
    steps = after.get("count", 0) - before.get("count", 0)
    rows = after.get("sum", 0) - before.get("sum", 0)
    cumulative = {k[3:]: after[k] - before.get(k, 0) for k in after if k.startswith("le=")}
    return {"decode_steps": int(steps), "row_steps": int(rows), "mean": rows / steps if steps else None,
            "steps_at_most": {k: int(v) for k, v in cumulative.items()}}


# --- clients -----------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, base: str, req: Request, max_tokens: int) -> Outcome:
    body = {"model": req.model, "messages": req.messages(), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    out, parts = Outcome(), []
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:500]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                        break
                    for choice in chunk.get("choices") or []:
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - start
                        parts.append(choice.get("delta", {}).get("content") or "")
                        out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    if chunk.get("usage"):
                        out.completion_tokens = chunk["usage"]["completion_tokens"]
                        out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                else:
                    out.error = out.error or "the stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.perf_counter() - start
    out.text = "".join(parts)
    return out


async def http_run(base: str, requests: list[Request], clients: int, max_tokens: int) -> tuple[float, list[Outcome]]:
    """`clients` workers pull requests from the shared list; the wall time and outcomes by index."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = iter(requests)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10, read=300, write=30, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def worker() -> None:
            for req in queue:  # one shared iterator: each request is taken once
                outcomes[req.index] = await one_request(client, base, req, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return wall, outcomes  # type: ignore[return-value]


def engine_run(export: Path, adapters_dir: Path, base_model: str, requests: list[Request], max_tokens: int,
               threads: int | None, meter: CpuMeter, say) -> RunResult:
    """The same requests through `Engine.generate` in this process, one at a time."""
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
        with meter:
            start = time.perf_counter()
            outcomes = [call(req, max_tokens) for req in requests]
            wall = time.perf_counter() - start
        return RunResult("engine, one at a time (no HTTP)", 1, wall, outcomes, meter.cpu_s)
    finally:
        engine.close()


# --- summary -----------------------------------------------------------------------------------

def summarize(run: RunResult, reference: list[Outcome] | None) -> dict[str, Any]:
    ok = [o for o in run.outcomes if o.error is None]
    tokens = sum(o.completion_tokens for o in ok)

    def ms(values: list[float]) -> dict[str, float] | None:
        return {k: (v * 1000 if k != "n" else v) for k, v in spread(values).items()} if values else None

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
        "latency_ms": ms([o.latency_s for o in ok]), "ttft_ms": ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        "finish_reasons": finish, "same_text_as_engine": same, "text_differs_from_engine": differ,
        "decode_batch": run.batch or None,
        "cpu_s": run.cpu_s, "others_share": None if others is None else others / (run.wall_s * (os.cpu_count() or 1)),
        "per_request": {"latency_s": [round(o.latency_s, 4) for o in run.outcomes],
                        "ttft_s": [None if o.ttft_s is None else round(o.ttft_s, 4) for o in run.outcomes],
                        "completion_tokens": [o.completion_tokens for o in run.outcomes]},
    }


def markdown(result: dict[str, Any]) -> str:
    m, w = result["machine"], result["workload"]
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
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} | "
            + (f"{lat['p50']:.0f} / {lat['p95']:.0f} | " if lat else "- | ")
            + (f"{ttft['p50']:.0f} / {ttft['p95']:.0f} | " if ttft else "- | ")
            + (f"{batch['mean']:.2f} | " if batch and batch["mean"] is not None else "- | ")
            + (f"{r['speedup_vs_http_1']:.2f}x | " if r.get("speedup_vs_http_1") else "- | ")
            + (f"{r['speedup_vs_engine']:.2f}x | " if r.get("speedup_vs_engine") else "- | ")
            + f"{len(r['errors'])} | "
            + (f"{r['same_text_as_engine']}/{r['requests']} | " if r["same_text_as_engine"] is not None else "- | ")
            + f"{f(cpu['server'])} / {f(cpu['client'])} / {f(cpu['others'])} |")
    noisy = {name: r["others_share"] for name, r in result["runs"].items() if (r["others_share"] or 0) > 0.1}
    if noisy:
        lines += ["", "**Noisy machine:** other processes used " + ", ".join(
            f"{100 * v:.0f}% of the cores during \"{k}\"" for k, v in noisy.items()) + "; these figures are not clean."]
    lines += ["", f"Generated tokens per request (mean, by model): "
              + ", ".join(f"`{k}` {v:.1f}" for k, v in w["completion_tokens_by_model"].items())
              + f"; {w['stopped_before_max_tokens']} of {w['requests']} requests stopped before max_tokens "
              "(`ignore_eos`: none should).",
              "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; Python {m['python']}, "
              f"onnxruntime {m['versions'].get('onnxruntime')}, prefixport {m['versions'].get('prefixport')}.", "",
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load")
    args = parser.parse_args()
    n = args.requests or (12 if args.quick else 64)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    concurrency = sorted(set(args.concurrency) | {1})
    max_batch = args.max_batch or max(concurrency)
    adapters_dir = args.adapters or args.export / "adapters"
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
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
        load_s = server.wait_healthy(base, 300, say)
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
                                CpuMeter(server), say)
            runs.append(engine)
        for clients in concurrency:
            say(f"HTTP: {n} requests, {clients} client(s) ...")
            before = batch_histogram(sync, base)
            with CpuMeter(server) as meter:
                wall, outcomes = asyncio.run(http_run(base, requests, min(clients, n), max_tokens))
            after = batch_histogram(sync, base)
            name = f"HTTP, {clients} clients" if clients > 1 else "HTTP, 1 client (one at a time)"
            run = RunResult(name, clients, wall, outcomes, meter.cpu_s, batch_delta(before, after))
            runs.append(run)
            errors = [o.error for o in outcomes if o.error]
            say(f"  {wall:.1f} s, {len(outcomes) / wall:.2f} req/s, mean batch {run.batch['mean'] or 0:.2f}"
                + (f", {len(errors)} errors, first: {errors[0]}" if errors else ""))
            if server.proc.poll() is not None:
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
    command = "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:])
    result = {
        "benchmark": "serve_load", "quick": args.quick, "export": _rel(args.export), "adapters": _rel(adapters_dir),
        "model": base_model, "models": models, "max_batch": max_batch, "threads": args.threads,
        "max_tokens": max_tokens, "concurrency": concurrency, "seed": args.seed, "command": command.strip(),
        "server_command": "prefixport " + shlex.join(_rel(Path(a)) if a in (str(args.export), str(adapters_dir))
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
        "runs": results, "machine": describe(), "seconds": time.perf_counter() - began,
    }
    out = args.out
    stem = "serve_load" + ("_quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    md_path.write_text(table)
    print(table)
    summary = {"benchmark": "serve_load", "quick": args.quick, "requests": n, "max_tokens": max_tokens,
               "max_batch": max_batch, "seconds": round(result["seconds"], 1),
               "wrote": [str(json_path), str(md_path)],
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
