"""The server soak: `prefixport serve` under a long mixed load while hot adapters come and go;
its memory sampled all along, and the run summarized (errors, latency, determinism, churn, RSS)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.common import CpuMeter, distribution, free_port, rel, say, slope_per_min, vm_rss
from benchmarks.serving import ServerProcess, scrape_metrics
from prefixport.bench.serve_client import new_client
from tools.soak import BUNDLES, STATIC_ADAPTERS
from tools.soak.hot_adapters import HotAdapters, churn
from tools.soak.workload import Spec, run_one, workload


def requests_by_status(metrics: dict[str, float]) -> Counter[str]:
    """The server's request counter by HTTP status, from scraped /metrics."""
    out: Counter[str] = Counter()
    for k, v in metrics.items():
        if k.startswith("prefixport_requests_total{"):
            out[re.search(r'status="([^"]*)"', k)[1]] += v
    return out


async def sample_memory(client: httpx.AsyncClient, base: str, pid: int, t0: float, every_s: float,
                        stop: asyncio.Event, out: list[dict[str, Any]]) -> None:
    """A memory sample every `every_s` seconds into `out`, until `stop`."""
    while True:
        out.append(await memory_sample(client, base, pid, t0))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except asyncio.TimeoutError:
            pass


async def memory_sample(client: httpx.AsyncClient, base: str, pid: int, t0: float) -> dict[str, Any]:
    """The server's RSS (VmRSS and its own gauge) and running/waiting requests, `t_s` after `t0`."""
    s: dict[str, Any] = {"t_s": round(time.perf_counter() - t0, 2), "vmrss": vm_rss(pid)}
    try:
        m = scrape_metrics((await client.get(f"{base}/metrics", timeout=10)).text)
        s.update(rss=m.get('prefixport_memory_bytes{kind="rss"}'), running=m.get("prefixport_requests_running"),
                 waiting=m.get("prefixport_requests_waiting"))
    except httpx.HTTPError as e:
        s["error"] = f"{type(e).__name__}: {e}"
    return s


async def load_phase(base: str, specs: list[Spec], clients: int, base_model: str, pid: int, soft_s: float,
                     hard_s: float, sample_every: float, hold_s: tuple[float, float], seed: int) -> dict[str, Any]:
    """`clients` workers send the specs (none after `soft_s`; those still running at `hard_s` are
    cancelled) while the memory is sampled and the hot adapters churn."""
    hot = HotAdapters()
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    queue = iter(specs)
    t0 = time.perf_counter()
    bounded_out = None
    async with new_client(clients + 8, timeout_s=180) as client, \
            httpx.AsyncClient(timeout=30) as side:  # adapters and /metrics: not queued behind the load
        async def worker() -> None:
            for spec in queue:
                if time.perf_counter() - t0 > soft_s:
                    return
                records.append(await run_one(client, base, spec, base_model, hot))

        rng = random.Random(seed + 7)
        background = [asyncio.create_task(sample_memory(side, base, pid, t0, sample_every, stop, samples)),
                      *(asyncio.create_task(churn(side, base, hot, k, stop, hold_s, rng)) for k in BUNDLES)]
        workers = [asyncio.create_task(worker()) for _ in range(clients)]
        done, pending = await asyncio.wait(workers, timeout=hard_s)
        wall = time.perf_counter() - t0
        if pending:
            bounded_out = f"{len(pending)} clients still busy {hard_s:.0f} s in: cancelled"
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        elif time.perf_counter() - t0 > soft_s:
            bounded_out = f"stopped sending after {soft_s:.0f} s"
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*background, return_exceptions=True), 60)
        except asyncio.TimeoutError:
            hot.op_errors.append("the churn tasks did not finish within 60 s of the end")
        for task in done:
            task.result()  # a bug in this script: raise
    return {"records": records, "samples": samples, "hot": hot, "wall_s": wall, "bounded_out": bounded_out,
            "t0": t0}


def warm_up(base: str, models: list[str], clients: int, base_model: str, seed: int) -> list[str]:
    """One short request per model, then 2 x `clients` requests of the soak's kind (no cancels, no
    bad ones, hot adapters replaced by the static names) at full width: the batch, its cache and
    the runtime's buffers reach their working size before the baseline. Returns the errors."""
    specs = [sp for sp in workload(2 * clients, seed + 1000, 0) if sp.kind == "normal"]

    async def go() -> list[str]:
        hot = HotAdapters()
        async with new_client(clients + 4, timeout_s=180) as c:
            errors = []
            for m in models:
                r = await c.post(f"{base}/v1/chat/completions",
                                 json={"model": m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
                if r.status_code != 200:
                    errors.append(f"{m}: HTTP {r.status_code}: {r.text[:200]}")
            queue = iter(specs)

            async def worker() -> None:
                for sp in queue:
                    rec = await run_one(c, base, sp, base_model, hot)
                    if rec["outcome"] != "ok":
                        errors.append(rec.get("error") or rec["outcome"])

            await asyncio.gather(*(worker() for _ in range(clients)))
            return errors
    return asyncio.run(go())


async def wait_idle(base: str, limit_s: float) -> dict[str, Any]:
    """/health once nothing runs or waits (or after `limit_s`), with the seconds waited."""
    async with httpx.AsyncClient(timeout=10) as c:
        start = time.perf_counter()
        while True:
            health = (await c.get(f"{base}/health")).json()
            if (health.get("running") == 0 and health.get("waiting") == 0) or time.perf_counter() - start > limit_s:
                health["waited_s"] = round(time.perf_counter() - start, 2)
                return health
            await asyncio.sleep(0.5)


@dataclass
class ServerRun:
    """What `server_soak` gathered, for `summarize_server`."""

    serve_args: list[str]
    adapters_dir: Path  # a temp folder: named ADAPTERS_TMP in the results
    log_path: Path
    load_s: float
    base_model: str
    models: list[str]
    specs: list[Spec]
    load: dict[str, Any]  # load_phase's answer: records, samples, hot adapters, wall_s, bounded_out
    cpu: dict[str, Any]  # CpuMeter.result over the load
    health: dict[str, Any]  # /health once idle after the load
    metrics_before: dict[str, float]  # /metrics before and after the load
    metrics_after: dict[str, float]
    rss_start: dict[str, Any]  # rss, vmrss (bytes), loaded (VmRSS before any request), warm_s
    rss_end: dict[str, Any]  # rss, vmrss
    alive: bool  # the server at the end
    tail: str  # of its log


def server_soak(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Start the server on a copy of the export's adapters, warm it up, run the load with the hot
    adapters churning, and summarize."""
    export, n, clients = args.export, args.requests, args.concurrency
    tmp = Path(tempfile.mkdtemp(prefix="soak-adapters-"))
    (tmp / "hot").mkdir()
    src = args.export / "adapters"
    for name, bundle in STATIC_ADAPTERS.items():
        shutil.copy(src / f"{bundle}.safetensors", tmp / f"{name}.safetensors")
    for bundle in BUNDLES.values():
        shutil.copy(src / f"{bundle}.safetensors", tmp / "hot" / f"{bundle}.safetensors")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_args = ["serve", str(export), "--adapters", str(tmp), "--allow-adapter-admin",  # no keys: all are admins
                  "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch or clients)]
    log_path = Path(tempfile.mkstemp(prefix="soak-serve-", suffix=".log")[1])
    say(f"server soak: prefixport {' '.join(serve_args)} (log {log_path})")
    try:
        with ServerProcess(serve_args, log_path) as server, httpx.Client(timeout=30) as sync:
            load_s = server.wait_healthy(base, 300)
            listing = sync.get(f"{base}/v1/models").json()["data"]
            base_model = next(m["id"] for m in listing if not m.get("parent"))
            models = [m["id"] for m in listing]
            rss_loaded = vm_rss(server.pid)
            say(f"server up in {load_s:.1f} s: {', '.join(models)}; warming up ...")
            t = time.perf_counter()
            warm_errors = warm_up(base, models, clients, base_model, args.seed)
            warm_s = time.perf_counter() - t
            if warm_errors:
                raise SystemExit(f"warm-up requests failed: {warm_errors[:3]}\n{server.tail()}")
            specs = workload(n, args.seed, args.bad_every)
            time.sleep(1)
            metrics0 = scrape_metrics(sync.get(f"{base}/metrics").text)
            rss_start = {"rss": metrics0.get('prefixport_memory_bytes{kind="rss"}'), "vmrss": vm_rss(server.pid),
                         "loaded": rss_loaded, "warm_s": warm_s}
            soft = min(args.server_seconds, max(10.0, deadline - time.perf_counter() - 120))
            say(f"load: {n} requests, {clients} clients (stop sending after {soft:.0f} s) ...")
            with CpuMeter(server.pid, watch=True) as meter:
                load = asyncio.run(load_phase(base, specs, clients, base_model, server.pid, soft,
                                              soft + args.grace_seconds, args.sample_every,
                                              (args.hold_min, args.hold_max), args.seed))
            health = asyncio.run(wait_idle(base, 30))
            time.sleep(1)
            metrics1 = scrape_metrics(sync.get(f"{base}/metrics").text)
            rss_end = {"rss": metrics1.get('prefixport_memory_bytes{kind="rss"}'), "vmrss": vm_rss(server.pid)}
            alive = server.alive()
            tail = server.tail(40)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize_server(args, ServerRun(serve_args, tmp, log_path, load_s, base_model, models, specs, load,
                                            meter.result, health, metrics0, metrics1, rss_start, rss_end, alive, tail))


def mib(n_bytes: float | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if n_bytes is None else n_bytes / 2**20


def summarize_server(args: argparse.Namespace, soak: ServerRun) -> dict[str, Any]:
    """The server soak's figures (see the package docstring); per request records included."""
    run, specs, rss_start, rss_end = soak.load, soak.specs, soak.rss_start, soak.rss_end
    metrics0, metrics1, alive, tail = soak.metrics_before, soak.metrics_after, soak.alive, soak.tail
    records, hot = run["records"], run["hot"]
    outcomes = Counter(r["outcome"] for r in records)
    errors = [r for r in records if r["outcome"] == "error"]
    ok = [r for r in records if r["outcome"] in ("ok", "cancel_came_too_late")]
    tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    # deterministic templates: same text every time
    texts: dict[str, set[str]] = {}
    for r in ok:
        if r.get("key"):
            texts.setdefault(f"{r['key']}|{r['bundle']}", set()).add(r["text"])
    repeated = {k: v for k, v in texts.items() if sum(1 for r in ok if f"{r.get('key')}|{r['bundle']}" == k) > 1}
    differing = {k: sorted(v) for k, v in repeated.items() if len(v) > 1}
    quantized = bool(json.loads((args.export / "prefixport.json").read_text()).get("quantization"))
    # requests running on an adapter when it was deleted
    by_index = {r["index"]: r for r in records}
    on_deleted = [by_index[i] for i in sorted(hot.deleted_while_running) if i in by_index]
    samples = run["samples"]
    series = [(s["t_s"], s["rss"] / 2**20) for s in samples if s.get("rss")]
    vm_series = [(s["t_s"], s["vmrss"] / 2**20) for s in samples if s.get("vmrss")]
    half = run["wall_s"] / 2
    quarter = next((v for t, v in series if t >= run["wall_s"] / 4), None)
    st0, st1 = requests_by_status(metrics0), requests_by_status(metrics1)
    status_delta = {k: int(st1[k] - st0.get(k, 0)) for k in sorted(st1) if st1[k] - st0.get(k, 0)}
    client_status = Counter(str(r.get("status") or "499") for r in records) + hot.statuses  # 499: abandoned
    cancelled_server = metrics1.get("prefixport_requests_cancelled_total", 0) - \
        metrics0.get("prefixport_requests_cancelled_total", 0)
    by_kind: dict[str, Counter[str]] = {}
    for r in records:
        label = r["bad"] if r["kind"] == "bad" else r["kind"]
        by_kind.setdefault(f"{r['kind']}: {label}" if r["kind"] == "bad" else label, Counter())[r["outcome"]] += 1
    mix: Counter[str] = Counter()
    for r in records:
        if r["kind"] != "bad":
            mix[f"endpoint {r['endpoint']}"] += 1
            mix["streamed" if r["stream"] else "not streamed"] += 1
            mix[f"sampling {r['sampling']}"] += 1
            mix["bundle " + r["bundle"]] += 1
            mix["hot adapter" if r["hot"] else "registered-at-start name or base"] += 1
    stops = sum(1 for r in records if r.get("stop"))
    return {
        "export": rel(args.export), "model": soak.base_model, "models_at_start": soak.models,
        "server_load_s": soak.load_s,
        "quantized": quantized,
        "server_command": "prefixport " + shlex.join(rel(a) if a == str(args.export) else
                                                     "ADAPTERS_TMP" if a == str(soak.adapters_dir) else a
                                                     for a in soak.serve_args),
        "clients": args.concurrency, "requests_planned": len(specs), "requests_sent": len(records),
        "wall_s": run["wall_s"], "bounded_out": run["bounded_out"],
        "outcomes": dict(outcomes),
        "ok": len([r for r in records if r["outcome"] == "ok"]),
        "cancelled": outcomes["cancelled"], "cancel_came_too_late": outcomes["cancel_came_too_late"],
        "bad_expected_ok": outcomes["bad_expected_ok"],
        "bad_sent": sum(1 for r in records if r["kind"] == "bad"),
        "errors": len(errors) + len(hot.op_errors),
        "first_errors": [f"#{r['index']} ({r['kind']}, {r.get('model', r.get('bad'))}): {r['error']}"
                         for r in errors[:8]] + hot.op_errors[:5],
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "mix": dict(sorted(mix.items())), "with_stop_strings": stops,
        "latency_ms": distribution([r["latency_s"] for r in ok], 1000),
        "ttft_ms": distribution([r["ttft_s"] for r in ok if r.get("ttft_s") is not None], 1000),
        "requests_per_s": len(ok) / run["wall_s"], "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / run["wall_s"],
        "deterministic": {"templates_repeated": len(repeated),
                          "requests": sum(1 for r in ok if r.get("key")),
                          "templates_with_differing_texts": len(differing),
                          "greedy_templates": sum(k.startswith("greedy") for k in repeated),
                          "greedy_differing": sum(k.startswith("greedy") for k in differing),
                          "seeded_templates": sum(k.startswith("seeded") for k in repeated),
                          "seeded_differing": sum(k.startswith("seeded") for k in differing),
                          "examples": dict(list(differing.items())[:3])},
        "adapter_churn": {"cycles": len(hot.cycles), "deleted": sum(c["deleted"] for c in hot.cycles),
                          "deleted_with_requests_running": sum(1 for c in hot.cycles if c["running_at_delete"]),
                          "requests_running_at_delete": len(on_deleted),
                          "of_which": dict(Counter(r["outcome"] for r in on_deleted)),
                          "hot_requests": sum(1 for r in records if r.get("hot")),
                          "post_ms": distribution([c["post_ms"] / 1000 for c in hot.cycles], 1000),
                          "delete_ms": distribution([c["delete_ms"] / 1000 for c in hot.cycles], 1000),
                          "op_errors": hot.op_errors[:10], "cycles_detail": hot.cycles},
        "rss_mib": {"loaded": mib(rss_start["loaded"]), "warm_up_s": rss_start["warm_s"],
                    "start": mib(rss_start["rss"]), "end": mib(rss_end["rss"]),
                    "max": max([v for _, v in series] + [mib(rss_end["rss"]) or 0]),
                    "at_quarter": quarter,
                    "slope_per_min": slope_per_min(series),
                    "slope_per_min_second_half": slope_per_min([(t, v) for t, v in series if t >= half]),
                    "samples": len(series),
                    "vmrss_start": mib(rss_start["vmrss"]), "vmrss_end": mib(rss_end["vmrss"]),
                    "vmrss_max": max([v for _, v in vm_series] + [mib(rss_end["vmrss"]) or 0]),
                    "vmrss_slope_per_min": slope_per_min(vm_series),
                    "note": "loaded: VmRSS once healthy, before any request; start: idle after the warm-up "
                            "(2 x clients requests like the soak's, at full width); end: idle after the load; at_quarter: first sample a "
                            "quarter of the way through the load; slopes: least squares over the samples "
                            "during the load (all; second half)"},
        "rss_samples": samples,
        "max_running": max((s.get("running") or 0 for s in samples), default=None),
        "max_waiting": max((s.get("waiting") or 0 for s in samples), default=None),
        "health_end": soak.health, "server_alive_at_end": alive,
        "server_status_counts": status_delta, "client_status_counts": dict(sorted(client_status.items())),
        "status_counts_agree": status_delta == dict(client_status), "server_cancelled": cancelled_server,
        "cpu": soak.cpu, "server_log": str(soak.log_path),
        "server_log_tail": tail if (errors or not alive or "Traceback" in tail) else None,
        "per_request": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                         if k != "text" or r.get("key")}  # texts of the repeated templates
                        for r in sorted(records, key=lambda r: r["index"])],
    }

