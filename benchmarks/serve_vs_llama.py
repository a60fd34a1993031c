"""Serving side by side: `prefixport serve` against llama.cpp's `llama-server`, same model, same
precision, same threads, the same client.

For each precision pair (prefixport's `--quantize int8` export against llama-server on the
default model's GGUF at Q8_0; the `--quantize int4` export, the GGUF's own Q4_1 blocks, against
the GGUF at Q4_1) and each dataset (`random`: prompts of 100-1,000 tokens; `shared-prefix`: every
prompt starts with the same 512 tokens, then 100-500 of its own), one server at a time is started
on 127.0.0.1 and driven by `prefixport bench serve` (streamed /v1/completions, greedy, ignore_eos,
64 new tokens, a sweep of concurrencies, a goodput SLO), then stopped:

- prefixport: `prefixport serve EXPORT --threads T --max-batch S --model-name smollm2-135m-instruct`
- llama-server: `llama-server -m GGUF -t T -tb T -np S -cb -c S*CTX --alias smollm2-135m-instruct`
  (benchmarks/llama_cpp.py: built once from llama-cpp-python's vendored source; CTX the longest
  prompt + the output + 64, rounded up to 128, so that every slot holds any request)

Sides alternate which goes first, round by round (--rounds). Writes OUT/serve_vs_llama.json (every
run's sweep points as `prefixport bench serve` wrote them, the servers' command lines, CPU seconds
of server, client and the rest of the machine, the machine, the llama.cpp build) and
OUT/serve_vs_llama.md: per precision, dataset and concurrency, output tok/s, TTFT p50/p99,
inter-token p50/p99 and goodput of each side (medians over rounds), prefixport / llama-server, and
the goals, met or missed. Each run's own serve.json, serve.md and serve.png stay in OUT/runs/.

    python -m benchmarks.serve_vs_llama [--precisions int8,int4] [--datasets random,shared-prefix]
        [--num-prompts 48] [--concurrency 1,4,16] [--rounds 1] [--threads 2] [--slots 16]
        [--exports int8=exports/smollm2-135m-instruct-int8 int4=exports/smollm2-135m-instruct-int4]
        [--out benchmarks/results/serve_vs_llama]
    python -m benchmarks.serve_vs_llama --default-chat [--precisions int8]   # the refusal check alone

`--default-chat`: 16 concurrent streamed chat requests without max_tokens to prefixport serve
(each export given), counting those refused (any status but 200, e.g. no room in the KV cache),
served and finished within --chat-timeout; writes OUT/default_chat.{json,md}.
Exports are made with `prefixport export DIR --quantize int8|int4` (about 3 minutes each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import llama_cpp
from benchmarks.common import (ROOT, CpuMeter, cell, command, free_port, machine, machine_line, median, rel, say,
                               write_report)
from benchmarks.serving import ServerProcess, workload

SIDES = ("prefixport", "llama-server")
DEFAULT_EXPORTS = {"int8": "exports/smollm2-135m-instruct-int8", "int4": "exports/smollm2-135m-instruct-int4"}
MODEL = llama_cpp.MODEL_NAME
Figures = dict[str, Any]  # one side's figures at one sweep point (`figures`)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return math.inf if a > 0 else None
    return a / b


# (key, the goal in words, the concurrency it applies to (None: every point), test on (prefixport's figures,
# llama-server's) -> (the figure compared, met))
GOALS: list[tuple[str, str, int | None, Callable[[Figures, Figures], tuple[float | None, bool | None]]]] = [
    ("itl_p99_c4", "inter-token p99 ≤ 250 ms at concurrency 4", 4,
     lambda pp, lc: (pp["itl_p99_ms"], None if pp["itl_p99_ms"] is None else pp["itl_p99_ms"] <= 250)),
    ("itl_p99_c16", "inter-token p99 ≤ 0.5 × llama-server's at concurrency 16", 16,
     lambda pp, lc: (r := _ratio(pp["itl_p99_ms"], lc["itl_p99_ms"]), None if r is None else r <= 0.5)),
    ("goodput", "goodput ≥ 2 × llama-server's", None,
     lambda pp, lc: (r := _ratio(pp["goodput_req_s"], lc["goodput_req_s"]), None if r is None else r >= 2)),
    ("ttft_p50", "TTFT p50 ≤ 0.7 × llama-server's", None,
     lambda pp, lc: (r := _ratio(pp["ttft_p50_ms"], lc["ttft_p50_ms"]), None if r is None else r <= 0.7)),
    ("output", "output tok/s ≥ 1.5 × llama-server's", None,
     lambda pp, lc: (r := _ratio(pp["output_tok_s"], lc["output_tok_s"]), None if r is None else r >= 1.5)),
]


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def slot_context(args: argparse.Namespace) -> int:
    """Tokens each llama-server slot holds: the longest prompt of the datasets run, the output and
    64 (a chat template's or BOS's tokens, rounding), rounded up to 128."""
    longest = max(span(args.input_len)[1] if d == "random" else args.prefix_len + span(args.suffix_len)[1]
                  for d in args.datasets)
    return -(-(longest + args.output_len + 64) // 128) * 128


def dataset_options(args: argparse.Namespace, dataset: str) -> list[str]:
    if dataset == "random":
        return ["--input-len", args.input_len]
    return ["--input-len", args.suffix_len, "--prefix-len", str(args.prefix_len)]


def bench_serve_command(args: argparse.Namespace, base_url: str, export: Path, dataset: str, label: str,
                        out: Path) -> list[str]:
    """`prefixport bench serve` against one server (run from the checkout's root)."""
    return ["prefixport", "bench", "serve", "--base-url", base_url, "--model", MODEL, "--tokenizer", rel(export),
            "--dataset", dataset, *dataset_options(args, dataset), "--output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--concurrency", ",".join(map(str, args.concurrency)),
            "--endpoint", "completions", "--ignore-eos", "--seed", str(args.seed), "--warmup", str(args.warmup),
            "--slo", args.slo, "--label", label, "--out", rel(out)]


def prefixport_server(args: argparse.Namespace, export: Path, port: int, log: Path) -> ServerProcess:
    return ServerProcess(["serve", rel(export), "--host", "127.0.0.1", "--port", str(port),
                          "--threads", str(args.threads), "--max-batch", str(args.slots), "--model-name", MODEL], log)


def figures(point: dict[str, Any]) -> Figures:
    """The compared figures of one sweep point of `prefixport bench serve`."""
    def stat(key: str, q: str) -> float | None:
        return point[key][q] if point.get(key) else None

    good = point.get("goodput")
    return {"ok": point["requests"]["ok"], "failed": point["requests"]["failed"],
            "output_tok_s": point.get("output_throughput"), "request_s": point.get("request_throughput"),
            "ttft_p50_ms": stat("ttft_ms", "p50"), "ttft_p99_ms": stat("ttft_ms", "p99"),
            "itl_p50_ms": stat("itl_ms", "p50"), "itl_p99_ms": stat("itl_ms", "p99"),
            "tpot_mean_ms": stat("tpot_ms", "mean"), "e2e_p50_ms": stat("e2e_ms", "p50"),
            "goodput_req_s": good["requests_per_s"] if good else None}


def one_run(args: argparse.Namespace, side: str, precision: str, dataset: str, round_: int,
            logs: Path) -> dict[str, Any]:
    """Start one server, drive it with `prefixport bench serve`, stop it: the run's record."""
    export = args.exports[precision]
    kind = llama_cpp.PRECISION_KIND[precision]
    label = f"prefixport {precision}" if side == "prefixport" else f"llama-server {kind.upper()}"
    name = f"{precision}-{dataset}-{side}-r{round_}"
    run_dir = args.out / "runs" / name
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = logs / f"{name}.log"
    if side == "prefixport":
        server: ServerProcess = prefixport_server(args, export, port, log)
        shown_command = ["prefixport", *server.args]
    else:
        server = llama_cpp.LlamaServer(args.ggufs[kind], log, port=port, threads=args.threads, parallel=args.slots,
                                       slot_ctx=args.slot_ctx, alias=MODEL)
        shown_command = ["llama-server", *server.command()[1:]]
    say(f"{name}: starting {label} on port {port} ...")
    bench = bench_serve_command(args, base, export, dataset, label, run_dir)
    with server:
        startup = getattr(server, "startup_s", None) or server.wait_healthy(base, args.health_timeout)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        with CpuMeter(server.pid, watch=True) as meter:
            with open(logs / f"{name}.bench.log", "w") as f:
                client = subprocess.Popen([sys.executable, "-m", "prefixport.cli", *bench[1:]], cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                code = client.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        alive = server.alive()
        tail = server.tail(20)
    cpu = dict(meter.result)
    cpu["busiest_others"] = [dict(p, command=scrub(p["command"])) for p in cpu["busiest_others"] if p["pid"] != client.pid]
    cpu["bench_client_s"] = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if cpu.get("others_s") is not None:  # the client is another process: not the rest of the machine
        cpu["others_s"] = max(0.0, cpu["others_s"] - cpu["bench_client_s"])
        cpu["others_share"] = cpu["others_s"] / (cpu["wall_s"] * (os.cpu_count() or 1))
    serve_json = run_dir / "serve.json"
    if not serve_json.is_file():
        bench_log = (logs / f"{name}.bench.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name}: `prefixport bench serve` wrote no {rel(serve_json)} (exit status {code}):\n"
                         f"{bench_log}\nserver log:\n{tail}")
    result = json.loads(serve_json.read_text())
    points = {str(p["load"].get("concurrency")): figures(p) for p in result["points"]}
    say(f"{name}: " + "; ".join(f"c={c} {cell(f['output_tok_s'])} tok/s, TTFT p50 {cell(f['ttft_p50_ms'], '.0f')} ms"
                                for c, f in points.items()))
    return {"side": side, "label": label, "precision": precision, "dataset": dataset, "round": round_,
            "server_command": shown_command, "bench_command": bench, "bench_exit_status": code,
            "startup_s": startup, "server_alive_after": alive, "cpu": cpu, "figures": points,
            "serve_json": rel(serve_json), "points": result["points"]}


def scrub(text: str) -> str:
    """A command line with this checkout's and the home folder's paths taken out (results name neither)."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".").replace(f"{Path.home()}/", "~/")


def median_present(values: list[float | None]) -> float | None:
    """The median of the values given (None: not measured), or None without any."""
    present = [v for v in values if v is not None]
    return median(present) if present else None


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """precision -> dataset -> concurrency -> side -> figures, medians over rounds (ok, failed: sums), and
    "ratio" -> prefixport's figures over llama-server's."""
    out: dict[str, Any] = {}
    for run in runs:
        for conc, f in run["figures"].items():
            out.setdefault(run["precision"], {}).setdefault(run["dataset"], {}).setdefault(conc, {}) \
                .setdefault(run["side"], []).append(f)
    for by_dataset in out.values():
        for by_conc in by_dataset.values():
            for conc, by_side in by_conc.items():
                for side, rounds in by_side.items():
                    by_side[side] = {key: (sum(r[key] for r in rounds) if key in ("ok", "failed")
                                           else median_present([r[key] for r in rounds])) for key in rounds[0]}
                    by_side[side]["rounds"] = len(rounds)
                if set(SIDES) <= set(by_side):  # prefixport / llama-server ("inf" where llama-server's is 0)
                    pp, lc = by_side["prefixport"], by_side["llama-server"]
                    ratios = {k: _ratio(pp[k], lc[k]) for k in pp if k not in ("ok", "failed", "rounds")}
                    by_side["ratio"] = {k: "inf" if v == math.inf else v for k, v in ratios.items()}
    return out


def goals(table: dict[str, Any]) -> dict[str, Any]:
    """Per precision and dataset, each goal's figure at each concurrency it applies to, and met:
    True where met at all of them, False where missed at one, None where not measured."""
    out: dict[str, Any] = {}
    for precision, by_dataset in table.items():
        for dataset, by_conc in by_dataset.items():
            for key, words, at, test in GOALS:
                points = {}
                for conc, by_side in by_conc.items():
                    if (at is not None and conc != str(at)) or set(SIDES) - set(by_side):
                        continue
                    value, met = test(by_side["prefixport"], by_side["llama-server"])
                    points[conc] = {"value": "inf" if value == math.inf else value, "met": met}  # inf: JSON has none
                verdicts = [p["met"] for p in points.values()]
                met = None if not verdicts or None in verdicts else all(verdicts)
                out.setdefault(precision, {}).setdefault(dataset, {})[key] = {"goal": words, "points": points,
                                                                              "met": met}
    return out


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    build = result["llama_cpp"]
    lines = [
        "# prefixport serve beside llama.cpp's llama-server", "",
        f"Default model ({MODEL}); one server at a time on 127.0.0.1, {s['threads']} threads each, {s['slots']} "
        f"slots each (prefixport `--max-batch`, llama-server `-np -cb`, {s['slot_ctx']} tokens per slot); "
        f"`prefixport bench serve` (completions, streamed, greedy, ignore_eos, {s['output_len']} new tokens, "
        f"{s['num_prompts']} requests per point, {s['warmup']} warm-up, seed {s['seed']}, SLO {s['slo']}); "
        f"datasets: random = prompts of {s['input_len']} tokens; shared-prefix = {s['prefix_len']} shared tokens "
        f"then {s['suffix_len']} of each prompt's own. {s['rounds']} round(s), sides alternating first; "
        "medians over rounds (ok / failed: sums). Ratios: prefixport / llama-server.", "",
        f"llama.cpp {build['binaries']['llama-server']} (llama-cpp-python {build['llama_cpp_python']}'s vendored "
        f"source, built here by benchmarks/llama_cpp.py: {' '.join(build['cmake_flags'])}); "
        f"GGUFs: {', '.join(f'{k.upper()} {v}' for k, v in result['ggufs'].items())}.", "",
        machine_line(m, ("onnxruntime", "prefixport")), ""]
    cols = [("output_tok_s", "output tok/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
            ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("itl_p50_ms", "ITL p50 ms", ".1f"),
            ("itl_p99_ms", "ITL p99 ms", ".1f"), ("goodput_req_s", "goodput req/s", ".2f")]
    for precision, by_dataset in result["table"].items():
        kind = llama_cpp.PRECISION_KIND[precision].upper()
        for dataset, by_conc in by_dataset.items():
            lines += [f"## {precision} (prefixport) vs {kind} (llama-server), {dataset}", "",
                      "| concurrency | side | " + " | ".join(c[1] for c in cols) + " | ok / failed |",
                      "|---|---|" + "---|" * len(cols) + "---|"]
            for conc, by_side in by_conc.items():
                for side in SIDES:
                    if side in by_side:
                        f = by_side[side]
                        name = f"prefixport {precision}" if side == "prefixport" else f"llama-server {kind}"
                        lines.append(f"| {conc} | {name} | " + " | ".join(cell(f[k], spec) for k, _, spec in cols)
                                     + f" | {f['ok']} / {f['failed']} |")
                if "ratio" in by_side:
                    lines.append(f"| {conc} | **×** | " + " | ".join(
                        "∞" if by_side["ratio"][k] == "inf" else cell(by_side["ratio"][k], ".2f") for k, _, _ in cols)
                        + " | |")
            lines += ["", "| goal | measured | |", "|---|---|---|"]
            for key, g in result["goals"].get(precision, {}).get(dataset, {}).items():
                unit = " ms" if key == "itl_p99_c4" else "×"
                measured = ", ".join(f"c={c}: " + ("∞ (llama-server's is 0)" if v["value"] == "inf" else
                                                   f"{cell(v['value'], '.1f' if unit == ' ms' else '.2f')}{unit}")
                                     for c, v in g["points"].items()) or "not measured"
                verdict = {True: "met", False: "**missed**", None: "–"}[g["met"]]
                lines.append(f"| {g['goal']} | {measured} | {verdict} |")
            lines.append("")
    noisy = [r for r in result["runs"] if (r["cpu"].get("others_share") or 0) > 0.10]
    lines += ["CPU seconds of each run (server, the bench client, every other process) over its wall seconds: " + "; ".join(
        f"{r['precision']} {r['dataset']} {r['side']} r{r['round']}: {cell(r['cpu'].get('server_s'), '.0f')}, "
        f"{cell(r['cpu'].get('bench_client_s'), '.0f')}, {cell(r['cpu'].get('others_s'), '.0f')} over "
        f"{r['cpu']['wall_s']:.0f} s" for r in result["runs"]) + "."]
    if noisy:
        lines += ["", f"**Noise:** other processes took over 10% of the cores in {len(noisy)} run(s): "
                  + ", ".join(f"{r['precision']} {r['dataset']} {r['side']} r{r['round']} "
                              f"({100 * r['cpu']['others_share']:.0f}%)" for r in noisy) + "."]
    failed = [r for r in result["runs"] if not r["server_alive_after"]]
    if failed:
        lines += ["", "**A server died during:** " + ", ".join(r["serve_json"] for r in failed) + "."]
    lines += ["", f"Command: `{result['command']}`; {result['seconds'] / 60:.0f} minutes.", ""]
    return "\n".join(lines)


# --- the default-chat check ---------------------------------------------------------------------------

async def chat_requests(base: str, n: int, seed: int, timeout_s: float) -> list[dict[str, Any]]:
    """n concurrent streamed chat requests without max_tokens (serving.py's prompts): per request the
    status, when its first token came and how many chunks with text, its finish reason and tokens,
    or the refusal's body; streams still running after `timeout_s` are cut (`cut`)."""
    import httpx

    async def one(client: httpx.AsyncClient, messages: list[dict[str, str]], out: dict[str, Any]) -> None:
        body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        try:
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                out["status"] = response.status_code
                if response.status_code != 200:
                    out["error"] = (await response.aread()).decode(errors="replace")[:500]
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line[6:] == "[DONE]":
                        out["finished"] = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = json.dumps(chunk["error"])[:500]
                        break
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            out["chunks"] += 1
                            if out["first_token_s"] is None:
                                out["first_token_s"] = time.perf_counter() - start
                        out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
                    if chunk.get("usage"):
                        out["completion_tokens"] = chunk["usage"]["completion_tokens"]
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            out["error"] = f"{type(e).__name__}: {e}"

    requests = workload([MODEL], n, seed)
    results: list[dict[str, Any]] = [
        {"status": None, "first_token_s": None, "chunks": 0, "finish_reason": None, "completion_tokens": None,
         "finished": False, "cut": False, "error": None} for _ in requests]
    timeout = httpx.Timeout(connect=10, read=timeout_s, write=30, pool=None)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 4)) as client:
        tasks = [asyncio.create_task(one(client, r.messages(), out)) for r, out in zip(requests, results)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task, out in zip(tasks, results):
        out["cut"] = task in pending
    return results


def default_chat(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for precision in args.precisions:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = prefixport_server(args, args.exports[precision], port, logs / f"default-chat-{precision}.log")
        say(f"default chat, prefixport {precision}: {args.chat_requests} chat requests without max_tokens ...")
        with server:
            server.wait_healthy(base, args.health_timeout)
            began = time.perf_counter()
            results = asyncio.run(chat_requests(base, args.chat_requests, args.seed, args.chat_timeout))
            wall = time.perf_counter() - began
            alive = server.alive()
        refused = [r for r in results if r["status"] != 200]
        out[precision] = {
            "requests": len(results), "refused": len(refused),
            "refusals": [f"HTTP {r['status']}: {r['error']}" for r in refused],
            "served": sum(r["status"] == 200 and r["first_token_s"] is not None and not r["error"] for r in results),
            "finished": sum(r["finished"] for r in results), "cut_at_timeout": sum(r["cut"] for r in results),
            "first_token_s": [r["first_token_s"] for r in results], "chunks": [r["chunks"] for r in results],
            "stream_errors": [r["error"] for r in results if r["status"] == 200 and r["error"]],
            "finish_reasons": sorted({str(r["finish_reason"]) for r in results if r["finished"]}),
            "completion_tokens": [r["completion_tokens"] for r in results],
            "wall_s": wall, "server_alive_after": alive,
            "server_command": ["prefixport", *server.args]}
        say(f"  {out[precision]['refused']} refused, {out[precision]['finished']} finished, "
            f"{out[precision]['cut_at_timeout']} cut at {args.chat_timeout:.0f} s")
    return out


def default_chat_markdown(result: dict[str, Any]) -> str:
    lines = ["# prefixport serve: concurrent chat requests without max_tokens", "",
             f"{result['settings']['chat_requests']} concurrent streamed chat requests (serving.py's prompts, "
             f"greedy, no max_tokens) to `prefixport serve` with {result['settings']['threads']} threads and "
             f"--max-batch {result['settings']['slots']}; refused = any status but 200; served = 200 and a first token; "
             f"streams still running after {result['settings']['chat_timeout']:.0f} s are cut (served, not "
             "finished).", "",
             "| export | requests | refused | served | finished | cut at the timeout | finish reasons |",
             "|---|---|---|---|---|---|---|"]
    for precision, r in result["default_chat"].items():
        lines.append(f"| {precision} | {r['requests']} | **{r['refused']}** | {r['served']} | {r['finished']} | "
                     f"{r['cut_at_timeout']} | {', '.join(r['finish_reasons']) or '–'} |")
    for precision, r in result["default_chat"].items():
        for why in r["refusals"][:3] + r["stream_errors"][:3]:
            lines.append(f"\n- {precision}: `{why[:300]}`")
    lines += ["", machine_line(result["machine"]), "", f"Command: `{result['command']}`.", ""]
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------------

def check_bench_serve() -> None:
    out = subprocess.run([sys.executable, "-m", "prefixport.cli", "bench", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode or "--base-url" not in out.stdout:
        raise SystemExit("`prefixport bench serve` is not available in this checkout:\n" + out.stderr[-1500:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", type=csv_list, default=["int8", "int4"], help="int8,int4 (default both)")
    parser.add_argument("--datasets", type=csv_list, default=["random", "shared-prefix"],
                        help="random,shared-prefix (default both)")
    parser.add_argument("--exports", nargs="*", default=[], metavar="PRECISION=DIR",
                        help=f"prefixport exports (default: {', '.join(f'{k}={v}' for k, v in DEFAULT_EXPORTS.items())})")
    parser.add_argument("--num-prompts", type=int, default=48, help="requests per sweep point (default 48)")
    parser.add_argument("--concurrency", type=lambda t: [int(c) for c in csv_list(t)], default=[1, 4, 16],
                        help="the sweep (default 1,4,16)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every side (default 1), first side alternating")
    parser.add_argument("--threads", type=int, default=2, help="threads of both servers (default 2)")
    parser.add_argument("--slots", type=int, default=16,
                        help="requests decoding at once: prefixport --max-batch, llama-server -np (default 16)")
    parser.add_argument("--input-len", default="100:1000", help="random: prompt tokens LO:HI (default 100:1000)")
    parser.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: the shared tokens (default 512)")
    parser.add_argument("--suffix-len", default="100:500",
                        help="shared-prefix: each prompt's own tokens after the prefix, LO:HI (default 100:500)")
    parser.add_argument("--output-len", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--slo", default="ttft=3s,itl=250ms", help="goodput's bounds (default ttft=3s,itl=250ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests per run (default 1)")
    parser.add_argument("--health-timeout", type=float, default=300, help="seconds a server may take to start")
    parser.add_argument("--default-chat", action="store_true",
                        help="only the check: concurrent chat requests without max_tokens, refusals counted")
    parser.add_argument("--chat-requests", type=int, default=16, help="--default-chat: requests (default 16)")
    parser.add_argument("--chat-timeout", type=float, default=300,
                        help="--default-chat: seconds before running streams are cut (default 300)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' and clients' logs (OUT/logs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vs_llama")
    args = parser.parse_args()
    for p in args.precisions:
        if p not in llama_cpp.PRECISION_KIND:
            parser.error(f"--precisions: {p!r} is not one of {', '.join(llama_cpp.PRECISION_KIND)}")
    for d in args.datasets:
        if d not in ("random", "shared-prefix"):
            parser.error(f"--datasets: {d!r} is not random or shared-prefix")
    exports = dict(DEFAULT_EXPORTS, **dict(item.split("=", 1) for item in args.exports))
    args.exports = {p: (ROOT / exports[p]).resolve() if not Path(exports[p]).is_absolute() else Path(exports[p])
                    for p in args.precisions}
    for p, folder in args.exports.items():
        if not (folder / "prefixport.json").is_file():
            parser.error(f"no {p} export at {rel(folder)}: make it with "
                         f"`prefixport export {rel(folder)} --quantize {p}` (about 3 minutes)")
    args.slot_ctx = slot_context(args)
    began = time.perf_counter()
    logs = args.out / "logs" if args.keep_logs else Path(tempfile.mkdtemp(prefix="serve_vs_llama."))
    logs.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("threads", "slots", "slot_ctx", "num_prompts", "concurrency", "rounds",
                                                "input_len", "prefix_len", "suffix_len", "output_len", "slo", "seed",
                                                "warmup", "chat_requests", "chat_timeout")}
    settings["exports"] = {p: rel(f) for p, f in args.exports.items()}

    try:
        run(args, settings, logs, began)
    except BaseException:
        say(f"the servers' and clients' logs are in {logs}")
        raise
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)


def run(args: argparse.Namespace, settings: dict[str, Any], logs: Path, began: float) -> None:
    if args.default_chat:
        result = {"benchmark": "serve_vs_llama --default-chat", "command": command("serve_vs_llama"),
                  "settings": settings, "default_chat": default_chat(args, logs), "machine": machine("httpx"),
                  "seconds": time.perf_counter() - began}
        write_report(args.out, "default_chat", result, default_chat_markdown(result))
        print(default_chat_markdown(result))
        say(f"wrote {rel(args.out / 'default_chat.json')} and default_chat.md")
        return

    check_bench_serve()
    llama_cpp.build()
    args.ggufs = {llama_cpp.PRECISION_KIND[p]: llama_cpp.gguf(llama_cpp.PRECISION_KIND[p]) for p in args.precisions}
    runs = []
    for round_ in range(args.rounds):
        for i, precision in enumerate(args.precisions):
            for j, dataset in enumerate(args.datasets):
                order = SIDES if (round_ + i + j) % 2 == 0 else SIDES[::-1]
                for side in order:
                    runs.append(one_run(args, side, precision, dataset, round_, logs))
    table = combine(runs)
    result = {
        "benchmark": "serve_vs_llama", "command": command("serve_vs_llama"), "model": MODEL, "settings": settings,
        "llama_cpp": llama_cpp.record(), "ggufs": {k: llama_cpp.shown(v) for k, v in args.ggufs.items()},
        "table": table, "goals": goals(table), "runs": runs, "machine": machine("httpx"),
        "seconds": time.perf_counter() - began,
    }
    text = markdown(result)
    write_report(args.out, "serve_vs_llama", result, text)
    print(text)
    say(f"wrote {rel(args.out / 'serve_vs_llama.json')} and serve_vs_llama.md"
        + (f"; logs in {rel(logs)}" if args.keep_logs else ""))


if __name__ == "__main__":
    main()
