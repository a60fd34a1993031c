"""`prefixport bench serve`: a serving benchmark of any OpenAI-compatible endpoint (prefixport's
server, llama.cpp's llama-server, vLLM), after `vllm bench serve`, GuideLLM and AIPerf.

A workload of streamed, greedy requests of known token lengths (serve_data) is sent at each point
of a sweep, a fixed concurrency (closed loop) or a Poisson request rate (open loop; serve_client),
and each point is reported: requests, duration, throughputs, TTFT, inter-token latency, time per
output token, end-to-end latency and goodput (serve_metrics), as JSON, Markdown and a plot
(serve_report). docs/benchmarks.md, "Serving benchmark", defines every figure."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import PrefixportError
from .serve_client import (ENDPOINTS, StreamResult, api_url, closed_loop, new_client, open_loop, request_body,
                           require_httpx, stream_request)
from .serve_data import BenchRequest, PromptMaker, Workload, make_workload
from .serve_metrics import SLO_KEYS, format_slo, point_metrics
from .serve_report import load_label, write

DEFINITIONS = ("Definitions: TTFT from sending a request to its first chunk of output text; ITL every gap between "
               "consecutive chunks of output text, pooled over the requests (a chunk of several tokens is one gap); "
               "TPOT per request (e2e - TTFT) / (output tokens - 1); E2E from sending to the end of the stream; "
               "duration from the first request sent to the last answer; throughputs over the duration, ok "
               "requests only; goodput the ok requests meeting every SLO bound per second of the duration (itl: "
               "the request's own p99 gap); percentiles interpolated linearly between the nearest ranks.")


@dataclass(frozen=True)
class ServeBenchConfig:
    """What `prefixport bench serve` runs: the endpoint, the workload, the sweep, the SLO.

    Either `concurrency` (closed loop at each) or `rates` (Poisson, requests/s; math.inf: all at
    once; `max_concurrency` caps the requests in flight). Lengths are (lo, hi), inclusive; `slo`
    is {key: seconds}, keys ttft, itl, tpot, e2e."""

    base_url: str
    model: str
    tokenizer: str
    dataset: str = "random"
    input_len: tuple[int, int] = (100, 1000)
    output_len: tuple[int, int] = (64, 64)
    prefix_len: int = 512
    adapters: tuple[str, ...] = ()
    lengths_file: str | None = None
    num_prompts: int | None = None  # default 48; the file dataset: its rows
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    max_concurrency: int | None = None
    endpoint: str = "completions"
    ignore_eos: bool = True
    seed: int = 0
    warmup: int = 1
    slo: dict[str, float] = field(default_factory=dict)
    label: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0

    def check(self) -> None:
        """PrefixportError where the options cannot work together."""
        if bool(self.concurrency) == bool(self.rates):
            raise PrefixportError("give --concurrency or --rate (a sweep of one of them), not both")
        if self.max_concurrency is not None and not self.rates:
            raise PrefixportError("--max-concurrency caps a --rate sweep; with --concurrency it is the concurrency")
        if self.endpoint not in ENDPOINTS:
            raise PrefixportError(f"unknown endpoint {self.endpoint!r}: one of {', '.join(ENDPOINTS)}")
        if set(self.slo) - set(SLO_KEYS):
            raise PrefixportError(f"unknown SLO keys {sorted(set(self.slo) - set(SLO_KEYS))}")
        if self.timeout_s <= 0 or self.warmup < 0:
            raise PrefixportError("--timeout must be above 0 and --warmup at least 0")


def _loads(config: ServeBenchConfig) -> list[dict[str, Any]]:
    if config.concurrency:
        return [{"concurrency": c} for c in config.concurrency]
    return [{"rate": "inf" if math.isinf(r) else r, "max_concurrency": config.max_concurrency} for r in config.rates]


class _Sender:
    """Sends BenchRequests through one httpx client, each within the timeout."""

    def __init__(self, config: ServeBenchConfig, client: Any) -> None:
        self.config, self.client = config, client
        self.url = api_url(config.base_url, config.endpoint)
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None

    async def __call__(self, request: BenchRequest) -> StreamResult:
        c = self.config
        body = request_body(c.endpoint, request.model, request.prompt, request.output_len, c.ignore_eos)
        start = time.perf_counter()
        try:
            return await asyncio.wait_for(stream_request(self.client, self.url, body, self.headers), c.timeout_s)
        except asyncio.TimeoutError:
            return StreamResult(start=start, latency_s=time.perf_counter() - start,
                                error=f"no complete answer within {c.timeout_s:g} s (--timeout)")


async def _run_point(config: ServeBenchConfig, load: dict[str, Any], requests: list[BenchRequest],
                     seed: int) -> list[StreamResult]:
    in_flight = load.get("concurrency") or config.max_concurrency or len(requests)
    async with new_client(in_flight + 2, config.timeout_s) as client:
        send = _Sender(config, client)
        if "concurrency" in load:
            return await closed_loop(send, requests, load["concurrency"])
        rate = math.inf if load["rate"] == "inf" else float(load["rate"])
        return await open_loop(send, requests, rate, seed, config.max_concurrency)


def _warm_up(config: ServeBenchConfig, workload: Workload, say: Callable[[str], None]) -> None:
    """The warm-up requests, all at once, not counted; a PrefixportError where none is answered
    (a wrong URL, model or key: said once, before the sweep)."""
    requests = workload.requests("warmup")[:config.warmup]
    if not requests:
        return
    say(f"warm-up: {len(requests)} request(s)")
    results = asyncio.run(_run_point(config, {"concurrency": len(requests)}, requests, config.seed))
    failed = [r.error or "no output text" for r in results if r.error is not None or not r.chunk_times_s]
    if len(failed) == len(results):
        raise PrefixportError(f"the warm-up request to {api_url(config.base_url, config.endpoint)} failed: "
                              f"{failed[0]}")


def run_serve_bench(config: ServeBenchConfig, out: str | Path | None = None,
                    say: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the sweep against the endpoint; the report (docs/benchmarks.md, "Serving benchmark", has
    its keys) and, with `out`, the files written there (serve.json, serve.md, serve.png)."""
    from .machine import describe

    config.check()
    require_httpx()
    try:
        maker = PromptMaker(config.tokenizer)
        workload = make_workload(maker, config.dataset, model=config.model, num_prompts=config.num_prompts,
                                 input_len=config.input_len, output_len=config.output_len,
                                 prefix_len=config.prefix_len, adapters=config.adapters,
                                 lengths_file=config.lengths_file, seed=config.seed)
    except ValueError as e:
        raise PrefixportError(str(e)) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    _warm_up(config, workload, say)
    points = []
    for i, load in enumerate(_loads(config)):
        requests = workload.requests(str(i))
        say(f"{load_label(load)}: {len(requests)} requests")
        results = asyncio.run(_run_point(config, load, requests, config.seed + i))
        point = {"load": load, **point_metrics(requests, results, maker.count, config.slo)}
        points.append(point)
        q, ttft = point["requests"], point["ttft_ms"]
        say(f"  {q['ok']} ok, {q['failed']} failed in {point['duration_s']:.1f} s; "
            + (f"{point['output_throughput']:.1f} output tok/s, TTFT p50 {ttft['p50']:.0f} ms"
               if ttft and point["output_throughput"] is not None else "no answers")
            + (f"; first error: {q['errors'][0][:200]}" if q["errors"] else ""))
    result = {
        "benchmark": "prefixport-bench-serve", "version": 1,
        "label": config.label or config.model, "base_url": config.base_url, "model": config.model,
        "endpoint": config.endpoint, "ignore_eos": config.ignore_eos, "warmup": config.warmup,
        "timeout_s": config.timeout_s, "sweep": "concurrency" if config.concurrency else "rate",
        "dataset": {"kind": workload.dataset, "num_prompts": len(workload.lengths),
                    "input_len": list(config.input_len), "output_len": list(config.output_len),
                    "prefix_len": workload.prefix_len, "adapters": list(config.adapters),
                    "lengths_file": config.lengths_file, "seed": config.seed, "tokenizer": config.tokenizer},
        "slo": {"spec": format_slo(config.slo), "seconds": dict(config.slo),
                "meaning": [f"{k} ≤ {v * 1000:g} ms ({SLO_KEYS[k]})" for k, v in config.slo.items()]},
        "started": started, "client_machine": describe(), "definitions": DEFINITIONS, "points": points,
    }
    return result, (write(result, out) if out is not None else {})
