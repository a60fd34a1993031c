"""`python -m tools.soak`: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import tools.soak
from benchmarks.common import DEFAULT_EXPORT, RESULTS, cell, command, machine, say, write_report
from tools.soak.engine import engine_soak
from tools.soak.report import markdown
from tools.soak.server import server_soak


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.soak",
                                     description=tools.soak.__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--requests", type=int, help="server requests, bad ones included (default 560; --quick 40)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default 32; --quick 8)")
    parser.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: --concurrency)")
    parser.add_argument("--cycles", type=int, help="engine register/unregister cycles per phase (default 10000; "
                                                   "--quick 1000)")
    parser.add_argument("--check-every", type=int, default=None, help="engine generation check every N cycles (500)")
    parser.add_argument("--sample-cycles", type=int, default=None, help="engine RSS sample every N cycles (1000)")
    parser.add_argument("--sample-every", type=float, default=None, help="server RSS sample every S seconds (5)")
    parser.add_argument("--hold-min", type=float, default=3.0, help="a hot adapter stays open at least S seconds")
    parser.add_argument("--hold-max", type=float, default=8.0, help="... and at most S seconds")
    parser.add_argument("--server-seconds", type=float, default=600, help="stop sending requests after S seconds")
    parser.add_argument("--grace-seconds", type=float, default=60,
                        help="requests still running this long after the server soak stops sending are cancelled")
    parser.add_argument("--max-seconds", type=float, default=900, help="bound on the whole run")
    parser.add_argument("--bad-every", type=int, default=None, help="every Nth request is a bad one (16; --quick 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 requests, 8 clients, 1000 cycles")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = parser.parse_args()
    args.requests = args.requests or (40 if args.quick else 560)
    args.concurrency = args.concurrency or (8 if args.quick else 32)
    args.bad_every = args.bad_every or (4 if args.quick else 16)
    args.cycles = args.cycles or (1000 if args.quick else 10_000)
    args.check_every = args.check_every or (250 if args.quick else 500)
    args.sample_cycles = args.sample_cycles or (250 if args.quick else 1000)
    args.sample_every = args.sample_every or (2.0 if args.quick else 5.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is stopped too
    began = time.perf_counter()
    deadline = began + args.max_seconds
    began_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result: dict[str, Any] = {"benchmark": "soak", "quick": args.quick, "began_utc": began_utc,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if not args.skip_server:
        result["server"] = server_soak(args, deadline)
        s = result["server"]
        say(f"server soak: {s['requests_sent']} requests, {s['ok']} ok, {s['errors']} errors, "
            f"{s['cancelled']} cancelled, {s['bad_expected_ok']}/{s['bad_sent']} bad as expected, "
            f"RSS {cell(s['rss_mib']['start'])} -> {cell(s['rss_mib']['end'])} MiB")
    if not args.skip_engine:
        result["engine"] = engine_soak(args, deadline)
    result["machine"] = machine()
    result["seconds"] = time.perf_counter() - began
    result["command"] = command("soak", "tools")
    table = markdown(result)
    wrote = write_report(args.out, "soak" + ("_quick" if args.quick else ""), result, table)
    print(table)
    s, e = result.get("server"), result.get("engine")
    summary: dict[str, Any] = {"benchmark": "soak", "quick": args.quick, "seconds": round(result["seconds"], 1),
                               "wrote": [str(p) for p in wrote]}
    if s:
        summary["server"] = {
            "requests": s["requests_sent"], "ok": s["ok"], "errors": s["errors"], "cancelled": s["cancelled"],
            "bad_expected_ok": s["bad_expected_ok"], "bad_sent": s["bad_sent"],
            "latency_p50_ms": s["latency_ms"] and round(s["latency_ms"]["p50"]),
            "latency_p95_ms": s["latency_ms"] and round(s["latency_ms"]["p95"]),
            "latency_p99_ms": s["latency_ms"] and round(s["latency_ms"]["p99"]),
            "ttft_p50_ms": s["ttft_ms"] and round(s["ttft_ms"]["p50"]),
            "ttft_p95_ms": s["ttft_ms"] and round(s["ttft_ms"]["p95"]),
            "req_per_s": round(s["requests_per_s"], 2),
            "rss_mib_start": s["rss_mib"]["start"] and round(s["rss_mib"]["start"], 1),
            "rss_mib_end": s["rss_mib"]["end"] and round(s["rss_mib"]["end"], 1),
            "rss_mib_max": s["rss_mib"]["max"] and round(s["rss_mib"]["max"], 1),
            "health_end": {k: s["health_end"].get(k) for k in ("running", "waiting")},
            "deterministic_differing": s["deterministic"]["templates_with_differing_texts"],
            "others_cpu_share": s["cpu"]["others_share"] and round(s["cpu"]["others_share"], 2),
            "bounded_out": s["bounded_out"]}
    if e:
        summary["engine"] = {label: {"cycles": p["cycles"], "errors": p["n_errors"],
                                     "check_mismatches": len(p["check_mismatches"]),
                                     "evictions": p["evictions"], "rss_mib_start": round(p["start"]["rss_mib"], 1),
                                     "rss_mib_end": round(p["end"]["rss_mib"], 1), "fds": [p["start"]["fds"],
                                                                                          p["end"]["fds"]]}
                             for label, p in e["phases"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the server is stopped", file=sys.stderr)
        sys.exit(130)
