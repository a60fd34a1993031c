"""Soak: `prefixport serve` under a long mixed load with adapters registered and deleted meanwhile,
and 10,000s of adapter register/unregister cycles in the engine; errors, latency, and whether
memory and file descriptors stay flat.

Server soak (a subprocess on a free 127.0.0.1 port; the fp32 export by default: its greedy texts
do not depend on the batch, so the determinism check below is a real check, and at 32 clients it
is no slower here than int8):
C asyncio clients (default 32; server --max-batch C) pull from one seeded list of R requests
(default 560, of which 35 bad ones) mixing
  - models: the base model, 4 adapters registered at start (the export's two bundles and a copy of
    each under another name), and "hot" adapters that a churn task registers (POST /v1/adapters,
    from a sub-folder the server does not scan) and deletes (DELETE /v1/adapters/NAME) all along;
  - /v1/chat/completions and /v1/completions, streamed (SSE, usage chunk) or not;
  - greedy, seeded sampling and unseeded sampling (temperature, top_p, top_k, repetition_penalty),
    some with stop strings, some with ignore_eos; max_tokens 16-24, prompts of a few to ~100 tokens;
  - requests the client cancels on purpose: a stream closed after its first chunks, a whole
    (non-streamed) request abandoned after a second (`cancelled`, not errors);
  - every 16th request is deliberately bad (unknown model, unknown field, out-of-range field,
    unsupported field, malformed JSON, empty messages, over the context, an adapter just deleted,
    bad adapter POST/DELETE) and its 4xx status and error code are checked (`bad_expected_ok`).
Hot-adapter requests are streamed: a request counts as running on its adapter once its response
headers arrive (the server has queued it); the churn task closes an adapter to new requests, waits
until those sent have been accepted, then deletes it while they still run: they must finish
normally. Every answer is checked (status, [DONE], usage, tokens <= max_tokens, == max_tokens with
ignore_eos and finish "length", no stop string in the text). Greedy and seeded requests are drawn
from a pool of repeated templates, and the templates whose texts differed are counted, greedy and
seeded apart (streamed or not, any adapter name over the same bundle, any batch): a row's adapter
and sampling must be kept apart from its neighbours'. Not counted as errors, since rows are not
bit-identical in every batch: with the fp32 export a row's logits in some batches of 17-32 rows
differ from alone by ~3e-5, which can flip a seeded sample across a boundary of the cumulative
distribution (to the next token id that carries probability) though greedy argmax holds; with a
quantized export ONNX Runtime's MatMulNBits differs more, and greedy texts change with the batch.
Recorded: errors (unexpected statuses, exceptions, failed checks: goal 0) with the first bodies,
latency and TTFT p50/p95/p99, throughput, the server's RSS (/metrics prefixport_memory_bytes{kind="rss"}
and /proc/PID/status VmRSS) after warm-up, every few seconds and at the end (idle), its max and
slope, /health at the end (running 0, waiting 0), the server's request counters, and the CPU used
by the server, this client and every other process on the machine (others: noise).

Engine soak (in this process): `Engine.load(EXPORT)` twice, without an adapter budget and with a
budget of about one prefix bundle plus one prompt bundle (so registering evicts), each for N
register/unregister cycles (default 10,000): alternating prompt and prefix bundles under 8 names,
3 registered at a time (register the new one, unregister the oldest), a lookup every 7 cycles (an
evicted adapter is re-read from its file), a replacement (same name, other bundle) every 25, a
truncated bundle refused every 100 (an error path), and a greedy generation check every 500 cycles
(base, two anchors, the newest churned name) that must equal the reference made at the start.
RSS (after gc), open file descriptors (/proc/self/fd) and memory maps (/proc/self/maps) at the
start, every 1,000 cycles and at the end.

    python benchmarks/soak.py [--export exports/smollm2-135m-instruct] [--requests 560] [--concurrency 32] \\
        [--cycles 10000] [--max-seconds 900] [--quick] [--out benchmarks/results/soak]

--max-seconds bounds the whole run: the server soak stops sending at its share (--server-seconds,
default 600 s), cancels what is still running --grace-seconds (60) later, and the engine soak stops
at the bound; a run cut short says so (`bounded_out`). Writes OUT/soak.json and OUT/soak.md (--quick:
soak_quick.*, 40 requests, 8 clients, 1,000 cycles), prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (CONTEXT, TASKS, TOPICS, ServerProcess, _rel, free_port,  # noqa: E402
                        machine_busy_s)

from prefixport.bench.machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = ROOT / "exports" / "smollm2-135m-instruct"
BUNDLES = {"prefix": "date-prefix", "prompt": "json-prompt"}  # kind -> the export's bundle (file stem)
STATIC = {"date-prefix": "date-prefix", "json-prompt": "json-prompt",  # name -> bundle; registered at start
          "date-prefix-copy": "date-prefix", "json-prompt-copy": "json-prompt"}
STOPS = [["\n"], [".", "!"], ["\n\n", " the "], ["2"]]
CLK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- measuring ---------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def dist_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "p50": 1000 * pct(values, 0.5), "p95": 1000 * pct(values, 0.95),
            "p99": 1000 * pct(values, 0.99), "max": 1000 * max(values), "mean": 1000 * sum(values) / len(values)}


def slope_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) pairs, per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / den if den else None


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def vm_rss(pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def processes() -> dict[int, tuple[float, str]]:
    """Every process: CPU seconds so far and its command line (cut short)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            cpu = proc_cpu_s(int(d.name))
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cpu is not None:
                out[int(d.name)] = (cpu, cmd[:90] or f"[{d.name}]")
    return out


class Meter:
    """CPU seconds over a stretch: this process, the server (if any), every other process (noise),
    and the others that used the most."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> "Meter":
        self.t0 = time.perf_counter()
        self.start = (time.process_time(), proc_cpu_s(self.server_pid) if self.server_pid else 0.0, machine_busy_s())
        self.procs0 = processes()
        self.seen: dict[int, tuple[float, str]] = {}  # last CPU seconds and command of every process seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)  # catches short-lived processes
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self.seen.update(processes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen.update(processes())
        wall = time.perf_counter() - self.t0
        end = (time.process_time(), proc_cpu_s(self.server_pid) if self.server_pid else 0.0, machine_busy_s())
        d = [None if a is None or b is None else b - a for a, b in zip(self.start, end)]
        others = None if None in d else max(0.0, d[2] - d[0] - d[1])
        mine = {os.getpid(), self.server_pid}
        top = []
        for pid, (cpu, cmd) in self.seen.items():  # a process started meanwhile: all its CPU (to its last poll)
            used = cpu - (self.procs0[pid][0] if pid in self.procs0 else 0.0)
            if pid not in mine and used >= 0.01 * wall:
                top.append({"pid": pid, "cpu_s": round(used, 1), "command": cmd})
        top.sort(key=lambda p: -p["cpu_s"])
        self.result = {"wall_s": wall, "client_s": d[0], "server_s": d[1] if self.server_pid else None,
                       "others_s": others,
                       "others_share": None if others is None else others / (wall * (os.cpu_count() or 1)),
                       "busiest_others": top[:5]}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_count() -> int:
    try:
        return len(Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return -1


# --- server soak: the workload -------------------------------------------------------------------

@dataclass
class Spec:
    index: int
    kind: str  # normal | cancel_stream | cancel_whole | bad
    endpoint: str = "chat"  # chat | completions
    model: str = "@base"  # a name, "@base", or "@hot:prefix" / "@hot:prompt" (chosen when sent)
    stream: bool = False
    body: dict[str, Any] = field(default_factory=dict)  # without "model"
    key: str | None = None  # deterministic template (greedy or seeded): same key, same text
    sampling: str = "greedy"  # greedy | seeded | random
    cancel_after: int = 0  # chunks (stream) or seconds (whole)
    bad: str | None = None  # which bad request
    expect: tuple[int, str | None] | None = None  # expected status, error code


def bundle_of(model: str) -> str:
    if model == "@base":
        return "base"
    if model.startswith("@hot:"):
        return BUNDLES[model[5:]]
    return STATIC[model]


def prompt_text(rng: random.Random) -> str:
    task = rng.choice(TASKS).format(topic=rng.choice(TOPICS))
    context = " ".join(rng.sample(CONTEXT, rng.choice([0, 0, 1, 2, 4])))
    return f"{context}\n\n{task}" if context else task


def template(rng: random.Random, sampling: str) -> dict[str, Any]:
    """A request's content: endpoint, model bundle, prompt, sampling, stop, max_tokens."""
    endpoint = "chat" if rng.random() < 0.6 else "completions"
    bundle_pick = rng.random()
    text = prompt_text(rng)
    body: dict[str, Any] = {"max_tokens": rng.choice([16, 20, 24])}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text + "\n"
    if sampling == "greedy":
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.7, 1.0])
        body["top_p"] = rng.choice([0.9, 1.0])
        body["top_k"] = rng.choice([0, 40])
        if rng.random() < 0.3:
            body["repetition_penalty"] = 1.1
        if sampling == "seeded":
            body["seed"] = rng.randrange(10_000)
    if rng.random() < 0.25:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    return {"endpoint": endpoint, "bundle_pick": bundle_pick, "body": body}


def pick_model(rng: random.Random, bundle_pick: float) -> str:
    """base 25%, static adapters 45%, hot adapters 30%; templates fix the bundle, not the name."""
    if bundle_pick < 0.25:
        return "@base"
    kind = "prefix" if bundle_pick < 0.625 else "prompt"
    if rng.random() < 0.4:
        return f"@hot:{kind}"
    return rng.choice([n for n, b in STATIC.items() if b == BUNDLES[kind]])


BAD = [  # name, expected status, expected error code (None: not checked)
    ("unknown model", 404, "model_not_found"),
    ("unknown field", 400, None),
    ("temperature out of range", 400, None),
    ("over the context", 400, "context_length_exceeded"),
    ("unsupported field (logit_bias)", 400, "unsupported_parameter"),
    ("malformed JSON", 400, None),
    ("empty messages", 400, None),
    ("prompt ids over the context", 400, "context_length_exceeded"),
    ("deleted adapter", 404, "model_not_found"),
    ("DELETE unknown adapter", 404, "adapter_not_found"),
    ("POST adapter outside the folder", 400, None),
    ("POST adapter with no bundle", 404, "adapter_not_found"),
]


def workload(n: int, seed: int, bad_every: int) -> list[Spec]:
    rng = random.Random(seed)
    pools = {s: [template(rng, s) for _ in range(max(4, n // 9))] for s in ("greedy", "seeded")}
    specs, n_bad = [], 0
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            name, status, code = BAD[n_bad % len(BAD)]
            n_bad += 1
            specs.append(Spec(i, "bad", bad=name, expect=(status, code)))
            continue
        r = rng.random()
        kind = "cancel_stream" if r < 0.05 else "cancel_whole" if r < 0.07 else "normal"
        sampling = rng.choices(["greedy", "seeded", "random"], [0.45, 0.40, 0.15])[0]
        if sampling == "random" or kind != "normal":
            t, key = template(rng, sampling), None
        else:
            j = rng.randrange(len(pools[sampling]))
            t, key = pools[sampling][j], f"{sampling}-{j}"
        body = json.loads(json.dumps(t["body"]))
        model = pick_model(rng, t["bundle_pick"])
        if kind == "cancel_whole" and model.startswith("@hot:"):  # hot-adapter requests are streamed
            model = BUNDLES[model[5:]]
        stream = kind == "cancel_stream" or model.startswith("@hot:") or (kind == "normal" and rng.random() < 0.5)
        if kind == "cancel_whole":
            stream = False
        if kind != "normal":  # long enough to be cancelled mid-way
            body.update(max_tokens=24, ignore_eos=True)
            body.pop("stop", None)
        spec = Spec(i, kind, t["endpoint"], model, stream, body, key, sampling,
                    cancel_after=2 if kind == "cancel_stream" else 1 if kind == "cancel_whole" else 0)
        specs.append(spec)
    return specs


# --- server soak: hot adapters -----------------------------------------------------------------

class Hot:
    """The hot adapters: which is open to new requests per kind, requests sent but not yet accepted,
    and requests running on each (by spec index)."""

    def __init__(self) -> None:
        self.open: dict[str, str | None] = {"prefix": None, "prompt": None}
        self.pending: Counter[str] = Counter()
        self.running: dict[str, set[int]] = {}
        self.deleted_while_running: set[int] = set()
        self.recently_deleted: deque[str] = deque(maxlen=4)
        self.registered: set[str] = set()  # registered now, or a POST on its way
        self.cycles: list[dict[str, Any]] = []
        self.op_errors: list[str] = []
        self.statuses: Counter[str] = Counter()  # of the adapter POSTs and DELETEs

    def take(self, kind: str) -> str | None:
        name = self.open[kind]
        if name is not None:
            self.pending[name] += 1
        return name

    def accepted(self, name: str, index: int) -> None:
        self.pending[name] -= 1
        self.running.setdefault(name, set()).add(index)

    def refused(self, name: str) -> None:
        self.pending[name] -= 1

    def finished(self, name: str, index: int) -> None:
        self.running.get(name, set()).discard(index)


async def churn(client: httpx.AsyncClient, base: str, hot: Hot, kind: str, stop: asyncio.Event,
                hold_s: tuple[float, float], rng: random.Random) -> None:
    """Register a hot adapter, let requests use it, close it, wait until the requests sent are
    accepted, delete it while they run; again until `stop`."""
    cycle = 0
    while not stop.is_set():
        name = f"hot-{kind}-{cycle % 3}"
        cycle += 1
        t = time.perf_counter()
        hot.registered.add(name)
        try:
            r = await client.post(f"{base}/v1/adapters",
                                  json={"name": name, "path": f"hot/{BUNDLES[kind]}.safetensors"})
        except httpx.HTTPError as e:
            hot.op_errors.append(f"POST {name}: {type(e).__name__}: {e}")
            await asyncio.sleep(1)
            continue
        post_ms = 1000 * (time.perf_counter() - t)
        hot.statuses[str(r.status_code)] += 1
        if r.status_code != 200:
            hot.op_errors.append(f"POST {name}: HTTP {r.status_code}: {r.text[:300]}")
            await asyncio.sleep(1)
            continue
        hot.open[kind] = name
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*hold_s))
        except asyncio.TimeoutError:
            pass
        finally:
            hot.open[kind] = None
        for _ in range(300):  # at most 30 s for the requests sent to be accepted
            if hot.pending[name] <= 0:
                break
            await asyncio.sleep(0.1)
        running = sorted(hot.running.get(name, set()))
        t = time.perf_counter()
        try:
            r = await client.delete(f"{base}/v1/adapters/{name}")
            hot.statuses[str(r.status_code)] += 1
            ok = r.status_code == 200
            if not ok:
                hot.op_errors.append(f"DELETE {name}: HTTP {r.status_code}: {r.text[:300]}")
        except httpx.HTTPError as e:
            ok = False
            hot.op_errors.append(f"DELETE {name}: {type(e).__name__}: {e}")
        if ok:
            hot.deleted_while_running.update(running)
            hot.recently_deleted.append(name)
            hot.registered.discard(name)
        hot.cycles.append({"name": name, "post_ms": round(post_ms, 1),
                           "delete_ms": round(1000 * (time.perf_counter() - t), 1),
                           "pending_left": hot.pending[name], "running_at_delete": len(running), "deleted": ok})
        await asyncio.sleep(0.3)


# --- server soak: one request ------------------------------------------------------------------

def bad_request(spec: Spec, base_model: str, hot: Hot) -> tuple[str, str, Any]:
    """(method, path, json body or raw bytes) of a deliberately bad request."""
    chat = {"model": base_model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    b = spec.bad
    if b == "unknown model":
        return "POST", "/v1/chat/completions", chat | {"model": "no-such-model"}
    if b == "unknown field":
        return "POST", "/v1/chat/completions", chat | {"frobnicate": 1}
    if b == "temperature out of range":
        return "POST", "/v1/chat/completions", chat | {"temperature": 3.5}
    if b == "over the context":
        return "POST", "/v1/completions", {"model": base_model, "prompt": "Hello", "max_tokens": 9000}
    if b == "unsupported field (logit_bias)":
        return "POST", "/v1/chat/completions", chat | {"logit_bias": {"42": 5}}
    if b == "malformed JSON":
        return "POST", "/v1/chat/completions", b'{"model": "x", "messages": [}'
    if b == "empty messages":
        return "POST", "/v1/chat/completions", chat | {"messages": []}
    if b == "prompt ids over the context":
        return "POST", "/v1/completions", {"model": base_model, "prompt": [42] * 8200, "max_tokens": 4}
    if b == "deleted adapter":
        gone = [n for n in hot.recently_deleted if n not in hot.registered]
        name = gone[-1] if gone else "hot-never-registered"
        return "POST", "/v1/chat/completions", chat | {"model": name}
    if b == "DELETE unknown adapter":
        return "DELETE", "/v1/adapters/no-such-adapter", None
    if b == "POST adapter outside the folder":
        return "POST", "/v1/adapters", {"name": "escape", "path": "../../etc/passwd"}
    if b == "POST adapter with no bundle":
        return "POST", "/v1/adapters", {"name": "no-such-bundle"}
    raise AssertionError(b)


def _error_code(text: str) -> str | None:
    try:
        return json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def run_bad(client: httpx.AsyncClient, base: str, spec: Spec, base_model: str, hot: Hot) -> dict[str, Any]:
    method, path, body = bad_request(spec, base_model, hot)
    rec: dict[str, Any] = {"index": spec.index, "kind": "bad", "bad": spec.bad, "endpoint": path}
    start = time.perf_counter()
    try:
        if isinstance(body, bytes):
            r = await client.request(method, f"{base}{path}", content=body,
                                     headers={"content-type": "application/json"})
        else:
            r = await client.request(method, f"{base}{path}", json=body)
        rec["status"] = r.status_code
        code = _error_code(r.text)
        status, want = spec.expect  # type: ignore[misc]
        if r.status_code == status and (want is None or code == want) and "error" in r.json():
            rec["outcome"] = "bad_expected_ok"
        else:
            rec["outcome"] = "error"
            rec["error"] = (f"bad request ({spec.bad}): expected HTTP {status}"
                            f"{f' code {want}' if want else ''}, got HTTP {r.status_code}: {r.text[:300]}")
    except (httpx.HTTPError, ValueError) as e:
        rec["outcome"], rec["error"] = "error", f"bad request ({spec.bad}): {type(e).__name__}: {e}"
    rec["latency_s"] = time.perf_counter() - start
    return rec


def check_answer(spec: Spec, body: dict[str, Any], text: str, finish: str | None, tokens: int | None) -> str | None:
    """A failed check of a finished answer, or None."""
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    if tokens is None:
        return "no usage"
    if tokens > body["max_tokens"] or tokens < 1:
        return f"{tokens} completion tokens for max_tokens {body['max_tokens']}"
    if body.get("ignore_eos") and finish == "length" and tokens != body["max_tokens"]:
        return f"ignore_eos, finish length, but {tokens} tokens of {body['max_tokens']}"
    if body.get("ignore_eos") and finish == "stop" and not body.get("stop"):
        return "ignore_eos, no stop strings, but finish_reason stop"
    for s in body.get("stop") or []:
        if s in text:
            return f"stop string {s!r} in the text"
    return None


async def run_one(client: httpx.AsyncClient, base: str, spec: Spec, base_model: str, hot: Hot) -> dict[str, Any]:
    if spec.kind == "bad":
        return await run_bad(client, base, spec, base_model, hot)
    model, hot_name = spec.model, None
    if model == "@base":
        model = base_model
    elif model.startswith("@hot:"):
        kind = model[5:]
        hot_name = hot.take(kind)
        model = hot_name or BUNDLES[kind]  # none open now: the same bundle's static name
    body = {"model": model, **spec.body, "stream": spec.stream}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    rec: dict[str, Any] = {"index": spec.index, "kind": spec.kind, "endpoint": spec.endpoint, "model": model,
                           "hot": hot_name is not None, "bundle": bundle_of(spec.model), "stream": spec.stream,
                           "sampling": spec.sampling, "key": spec.key, "max_tokens": spec.body["max_tokens"],
                           "stop": bool(spec.body.get("stop")), "ignore_eos": bool(spec.body.get("ignore_eos"))}
    start = time.perf_counter()
    accepted = False
    try:
        if not spec.stream:
            try:
                coro = client.post(f"{base}{path}", json=body)
                r = await (asyncio.wait_for(coro, spec.cancel_after) if spec.kind == "cancel_whole" else coro)
            except asyncio.TimeoutError:
                rec.update(outcome="cancelled", status=None)
                return rec
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec.update(outcome="error", error=f"HTTP {r.status_code}: {r.text[:300]}")
                return rec
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
            finish, tokens = choice["finish_reason"], (data.get("usage") or {}).get("completion_tokens")
        else:
            parts, finish, tokens, chunks, done = [], None, None, 0, False
            async with client.stream("POST", f"{base}{path}", json=body) as r:
                rec["status"] = r.status_code
                if hot_name is not None:
                    if r.status_code == 200:
                        hot.accepted(hot_name, spec.index)
                        accepted = True
                    else:
                        hot.refused(hot_name)
                        hot_name = None
                if r.status_code != 200:
                    rec.update(outcome="error", error=f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec.update(outcome="error", error=f"stream error: {json.dumps(chunk['error'])[:300]}")
                        return rec
                    for c in chunk.get("choices") or []:
                        if rec.get("ttft_s") is None:
                            rec["ttft_s"] = time.perf_counter() - start
                        parts.append((c.get("delta") or {}).get("content") or c.get("text") or "")
                        finish = c.get("finish_reason") or finish
                        chunks += 1
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if spec.kind == "cancel_stream" and chunks >= spec.cancel_after:
                        rec.update(outcome="cancelled", chunks=chunks)
                        return rec  # leaving the block closes the connection mid-stream
            if not done:
                rec.update(outcome="error", error=f"the stream ended without [DONE] after {chunks} chunks")
                return rec
            text = "".join(parts)
        problem = check_answer(spec, spec.body, text, finish, tokens)
        rec.update(text=text, finish_reason=finish, completion_tokens=tokens)
        if problem:
            rec.update(outcome="error", error=f"check failed: {problem} (model {model}, {spec.endpoint})")
        elif spec.kind == "cancel_whole":
            rec["outcome"] = "cancel_came_too_late"  # it finished within the cancel delay: a normal answer
        else:
            rec["outcome"] = "ok"
        return rec
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        rec.update(outcome="error", error=f"{type(e).__name__}: {e}")
        return rec
    finally:
        rec["latency_s"] = time.perf_counter() - start
        if accepted:
            hot.finished(hot_name, spec.index)
        elif hot_name is not None:  # sent, never accepted (an exception before the headers)
            hot.refused(hot_name)


# --- server soak: the run ----------------------------------------------------------------------

_GAUGE = re.compile(r'^(prefixport_[a-z_]+)(\{.*\})? ([0-9.eE+-]+)$')  # labels may hold braces: {name}


def scrape(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _GAUGE.match(line)
        if m:
            out[m[1] + (m[2] or "")] = float(m[3])
    return out


def requests_by_status(metrics: dict[str, float]) -> Counter[str]:
    out: Counter[str] = Counter()
    for k, v in metrics.items():
        if k.startswith("prefixport_requests_total{"):
            out[re.search(r'status="([^"]*)"', k)[1]] += v
    return out


async def sample_memory(client: httpx.AsyncClient, base: str, pid: int, t0: float, every_s: float,
                        stop: asyncio.Event, out: list[dict[str, Any]]) -> None:
    while True:
        out.append(await memory_sample(client, base, pid, t0))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except asyncio.TimeoutError:
            pass


async def memory_sample(client: httpx.AsyncClient, base: str, pid: int, t0: float) -> dict[str, Any]:
    s: dict[str, Any] = {"t_s": round(time.perf_counter() - t0, 2), "vmrss": vm_rss(pid)}
    try:
        m = scrape((await client.get(f"{base}/metrics", timeout=10)).text)
        s.update(rss=m.get('prefixport_memory_bytes{kind="rss"}'), running=m.get("prefixport_requests_running"),
                 waiting=m.get("prefixport_requests_waiting"))
    except httpx.HTTPError as e:
        s["error"] = f"{type(e).__name__}: {e}"
    return s


async def load_phase(base: str, specs: list[Spec], clients: int, base_model: str, pid: int, soft_s: float,
                     hard_s: float, sample_every: float, hold_s: tuple[float, float], seed: int) -> dict[str, Any]:
    hot = Hot()
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(connect=10, read=180, write=30, pool=60)
    queue = iter(specs)
    t0 = time.perf_counter()
    bounded_out = None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, \
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
        hot = Hot()
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=180, limits=limits) as c:
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
    async with httpx.AsyncClient(timeout=10) as c:
        start = time.perf_counter()
        while True:
            health = (await c.get(f"{base}/health")).json()
            if (health.get("running") == 0 and health.get("waiting") == 0) or time.perf_counter() - start > limit_s:
                health["waited_s"] = round(time.perf_counter() - start, 2)
                return health
            await asyncio.sleep(0.5)


def server_soak(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    export, n, clients = args.export, args.requests, args.concurrency
    tmp = Path(tempfile.mkdtemp(prefix="soak-adapters-"))
    (tmp / "hot").mkdir()
    src = args.export / "adapters"
    for name, bundle in STATIC.items():
        shutil.copy(src / f"{bundle}.safetensors", tmp / f"{name}.safetensors")
    for bundle in BUNDLES.values():
        shutil.copy(src / f"{bundle}.safetensors", tmp / "hot" / f"{bundle}.safetensors")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_args = ["serve", str(export), "--adapters", str(tmp), "--host", "127.0.0.1", "--port", str(port),
                  "--max-batch", str(args.max_batch or clients)]
    log_path = Path(tempfile.mkstemp(prefix="soak-serve-", suffix=".log")[1])
    say(f"server soak: prefixport {' '.join(serve_args)} (log {log_path})")
    try:
        with ServerProcess(serve_args, log_path) as server, httpx.Client(timeout=30) as sync:
            load_s = server.wait_healthy(base, 300, say)
            listing = sync.get(f"{base}/v1/models").json()["data"]
            base_model = next(m["id"] for m in listing if not m.get("parent"))
            models = [m["id"] for m in listing]
            rss_loaded = vm_rss(server.proc.pid)
            say(f"server up in {load_s:.1f} s: {', '.join(models)}; warming up ...")
            t = time.perf_counter()
            warm_errors = warm_up(base, models, clients, base_model, args.seed)
            warm_s = time.perf_counter() - t
            if warm_errors:
                raise SystemExit(f"warm-up requests failed: {warm_errors[:3]}\n{server.tail()}")
            specs = workload(n, args.seed, args.bad_every)
            time.sleep(1)
            metrics0 = scrape(sync.get(f"{base}/metrics").text)
            rss_start = {"rss": metrics0.get('prefixport_memory_bytes{kind="rss"}'), "vmrss": vm_rss(server.proc.pid),
                         "loaded": rss_loaded, "warm_s": warm_s}
            soft = min(args.server_seconds, max(10.0, deadline - time.perf_counter() - 120))
            say(f"load: {n} requests, {clients} clients (stop sending after {soft:.0f} s) ...")
            with Meter(server.proc.pid) as meter:
                run = asyncio.run(load_phase(base, specs, clients, base_model, server.proc.pid, soft, soft + args.grace_seconds,
                                             args.sample_every, (args.hold_min, args.hold_max), args.seed))
            health = asyncio.run(wait_idle(base, 30))
            time.sleep(1)
            metrics1 = scrape(sync.get(f"{base}/metrics").text)
            rss_end = {"rss": metrics1.get('prefixport_memory_bytes{kind="rss"}'), "vmrss": vm_rss(server.proc.pid)}
            alive = server.proc.poll() is None
            tail = server.tail(40)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize_server(args, run, specs, meter.result, health, metrics0, metrics1, rss_start, rss_end,
                            base_model, models, load_s, alive, tail, log_path, serve_args, tmp)


def summarize_server(args, run, specs, cpu, health, metrics0, metrics1, rss_start, rss_end, base_model, models,
                     load_s, alive, tail, log_path, serve_args, tmp) -> dict[str, Any]:
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
    mb = lambda b: None if b is None else b / 2**20  # noqa: E731
    by_kind: dict[str, Counter[str]] = {}
    for r in records:
        label = r["bad"] if r["kind"] == "bad" else r["kind"]
        by_kind.setdefault(f"{r['kind']}: {label}" if r["kind"] == "bad" else label, Counter())[r["outcome"]] += 1
    mix = Counter()
    for r in records:
        if r["kind"] != "bad":
            mix[f"endpoint {r['endpoint']}"] += 1
            mix["streamed" if r["stream"] else "not streamed"] += 1
            mix[f"sampling {r['sampling']}"] += 1
            mix["bundle " + r["bundle"]] += 1
            mix["hot adapter" if r["hot"] else "registered-at-start name or base"] += 1
    stops = sum(1 for r in records if r.get("stop"))
    return {
        "export": _rel(args.export), "model": base_model, "models_at_start": models, "server_load_s": load_s,
        "quantized": quantized,
        "server_command": "prefixport " + shlex.join(_rel(Path(a)) if a == str(args.export) else
                                                     "ADAPTERS_TMP" if a == str(tmp) else a for a in serve_args),
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
        "latency_ms": dist_ms([r["latency_s"] for r in ok]),
        "ttft_ms": dist_ms([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
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
                          "post_ms": dist_ms([c["post_ms"] / 1000 for c in hot.cycles]),
                          "delete_ms": dist_ms([c["delete_ms"] / 1000 for c in hot.cycles]),
                          "op_errors": hot.op_errors[:10], "cycles_detail": hot.cycles},
        "rss_mib": {"loaded": mb(rss_start["loaded"]), "warm_up_s": rss_start["warm_s"],
                    "start": mb(rss_start["rss"]), "end": mb(rss_end["rss"]),
                    "max": max([v for _, v in series] + [mb(rss_end["rss"]) or 0]),
                    "at_quarter": quarter,
                    "slope_per_min": slope_per_min(series),
                    "slope_per_min_second_half": slope_per_min([(t, v) for t, v in series if t >= half]),
                    "samples": len(series),
                    "vmrss_start": mb(rss_start["vmrss"]), "vmrss_end": mb(rss_end["vmrss"]),
                    "vmrss_max": max([v for _, v in vm_series] + [mb(rss_end["vmrss"]) or 0]),
                    "vmrss_slope_per_min": slope_per_min(vm_series),
                    "note": "loaded: VmRSS once healthy, before any request; start: idle after the warm-up "
                            "(2 x clients requests like the soak's, at full width); end: idle after the load; at_quarter: first sample a "
                            "quarter of the way through the load; slopes: least squares over the samples "
                            "during the load (all; second half)"},
        "rss_samples": samples,
        "max_running": max((s.get("running") or 0 for s in samples), default=None),
        "max_waiting": max((s.get("waiting") or 0 for s in samples), default=None),
        "health_end": health, "server_alive_at_end": alive,
        "server_status_counts": status_delta, "client_status_counts": dict(sorted(client_status.items())),
        "status_counts_agree": status_delta == dict(client_status), "server_cancelled": cancelled_server,
        "cpu": cpu, "server_log": str(log_path),
        "server_log_tail": tail if (errors or not alive or "Traceback" in tail) else None,
        "per_request": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                         if k != "text" or r.get("key")}  # texts of the repeated templates
                        for r in sorted(records, key=lambda r: r["index"])],
    }


# --- engine soak -------------------------------------------------------------------------------

CHECK_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Write one sentence about the sea."}]]


def rss_now() -> int:
    gc.collect()
    return vm_rss() or 0


def engine_phase(export: Path, budget: int | None, cycles: int, deadline: float, check_every: int,
                 sample_every: int, tmp: Path) -> dict[str, Any]:
    from prefixport.errors import AdapterError
    from prefixport.runtime import Engine

    paths = {kind: export / "adapters" / f"{stem}.safetensors" for kind, stem in BUNDLES.items()}
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(paths["prefix"].read_bytes()[:100_000])
    before = {"rss_mib": rss_now() / 2**20, "fds": fd_count(), "maps": maps_count()}
    engine = Engine.load(export, adapter_budget_bytes=budget)
    closed = {}
    try:
        engine.add_adapter("anchor-prompt", paths["prompt"])
        engine.add_adapter("anchor-prefix", paths["prefix"])

        def outputs(churned: str | None, kind: str | None) -> dict[str, str]:
            out = {}
            for i, p in enumerate(CHECK_PROMPTS):
                for name in (None, "anchor-prompt", "anchor-prefix"):
                    out[f"{name or 'base'}/{i}"] = engine.generate(p, adapter=name, max_new_tokens=8).text
                if churned:  # compared with the anchor over the same bundle
                    out[f"anchor-{kind}/{i}"] = engine.generate(p, adapter=churned, max_new_tokens=8).text
            return out

        reference = outputs(None, None)
        samples = [{"cycle": 0, "rss_mib": rss_now() / 2**20, "fds": fd_count(), "maps": maps_count(), "t_s": 0.0}]
        window: deque[str] = deque()
        kinds: dict[str, str] = {}
        counts = Counter()
        checks, mismatches, errors = 0, [], []
        t0 = time.perf_counter()
        done = 0
        rng = random.Random(1)
        for i in range(1, cycles + 1):
            if time.perf_counter() > deadline:
                break
            kind = ("prompt", "prefix")[(i + i // 8) % 2]
            name = f"churn-{i % 8}"
            try:
                engine.add_adapter(name, paths[kind])
                counts["register"] += 1
                kinds[name] = kind
                if name in window:
                    window.remove(name)
                window.append(name)
                while len(window) > 3:
                    engine.remove_adapter(window.popleft())
                    counts["unregister"] += 1
                if i % 7 == 0:
                    engine.store.acquire(rng.choice([*window, "anchor-prompt", "anchor-prefix"]))
                    counts["lookup"] += 1
                if i % 25 == 0:
                    other = "prefix" if kinds[window[0]] == "prompt" else "prompt"
                    engine.add_adapter(window[0], paths[other])
                    kinds[window[0]] = other
                    counts["replace"] += 1
                if i % 100 == 0:
                    try:
                        engine.add_adapter("broken", truncated)
                        errors.append(f"cycle {i}: a truncated bundle was accepted")
                    except AdapterError:
                        counts["refused_truncated"] += 1
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"cycle {i}: {type(e).__name__}: {e}")
                if len(errors) > 20:
                    break
            done = i
            if i % check_every == 0:
                checks += 1
                got = outputs(window[-1], kinds[window[-1]])
                bad = {k: (reference[k], v) for k, v in got.items() if reference[k] != v}
                if bad:
                    mismatches.append({"cycle": i, "differ": bad})
            if i % sample_every == 0:
                samples.append({"cycle": i, "rss_mib": rss_now() / 2**20, "fds": fd_count(), "maps": maps_count(),
                                "t_s": round(time.perf_counter() - t0, 2)})
        wall = time.perf_counter() - t0
        while window:
            engine.remove_adapter(window.popleft())
            counts["unregister"] += 1
        stats = engine.stats().to_dict()
        if samples[-1]["cycle"] != done:
            samples.append({"cycle": done, "rss_mib": rss_now() / 2**20, "fds": fd_count(), "maps": maps_count(),
                            "t_s": round(wall, 2)})
        end = samples[-1]
    finally:
        engine.close()
        del engine
        closed = {"rss_mib": rss_now() / 2**20, "fds": fd_count(), "maps": maps_count()}
    store = stats["adapters"]
    after_warm = samples[1] if len(samples) > 2 else samples[0]
    return {
        "budget_bytes": budget, "cycles": done, "cycles_planned": cycles, "wall_s": wall,
        "bounded_out": done < cycles,
        "cycles_per_s": done / wall if wall else None, "operations": dict(counts),
        "evictions": store["evictions"], "misses": store["misses"], "hits": store["hits"],
        "registered_at_end": store["registered"], "generation_checks": checks, "check_mismatches": mismatches[:5],
        "errors": errors[:10], "n_errors": len(errors),
        "before_load": before, "start": samples[0], "end": end, "after_close": closed,
        "rss_growth_mib": end["rss_mib"] - samples[0]["rss_mib"],
        "rss_growth_after_first_sample_mib": end["rss_mib"] - after_warm["rss_mib"],
        "rss_slope_mib_per_1000_cycles": (slope_per_min([(s["cycle"], s["rss_mib"]) for s in samples]) or 0) / 60 * 1000
        if len(samples) >= 3 else None,
        "fd_growth": end["fds"] - samples[0]["fds"], "maps_growth": end["maps"] - samples[0]["maps"],
        "samples": samples,
    }


def engine_soak(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="soak-engine-"))
    try:
        from prefixport.adapters.bundle import load_bundle

        sizes = {k: load_bundle(args.export / "adapters" / f"{v}.safetensors").nbytes for k, v in BUNDLES.items()}
        budget = sizes["prefix"] + sizes["prompt"] + 1024  # the two anchors, or one churned prefix and a prompt
        phases = {}
        for label, b in (("no budget", None), (f"budget {budget} B", budget)):
            if time.perf_counter() > deadline - 10:
                say(f"engine soak ({label}): skipped, --max-seconds reached")
                continue
            say(f"engine soak ({label}): {args.cycles} register/unregister cycles ...")
            with Meter() as meter:
                phases[label] = engine_phase(args.export, b, args.cycles, deadline, args.check_every,
                                             args.sample_cycles, tmp)
            phases[label]["cpu"] = meter.result
            p = phases[label]
            say(f"  {p['cycles']} cycles in {p['wall_s']:.1f} s, RSS {p['start']['rss_mib']:.1f} -> "
                f"{p['end']['rss_mib']:.1f} MiB, fds {p['start']['fds']} -> {p['end']['fds']}, "
                f"{p['evictions']} evictions, {len(p['check_mismatches'])} check mismatches, {p['n_errors']} errors")
        return {"export": _rel(args.export), "bundle_bytes": sizes, "phases": phases}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- report ------------------------------------------------------------------------------------

def f1(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Soak: `prefixport serve` under mixed load, and adapter churn in the engine"
             f"{' (quick smoke run)' if result['quick'] else ''}", ""]
    s = result.get("server")
    if s:
        lat, ttft, rss, ch = s["latency_ms"] or {}, s["ttft_ms"] or {}, s["rss_mib"], s["adapter_churn"]
        det, cpu = s["deterministic"], s["cpu"]
        lines += [
            f"## Server: {s['requests_sent']} requests, {s['clients']} concurrent clients ({s['model']}, "
            f"`{s['export']}`)", "",
            f"Server: `{s['server_command']}`. Mix (not counting the bad ones): "
            + ", ".join(f"{k} x{v}" for k, v in s["mix"].items())
            + f"; {s['with_stop_strings']} with stop strings; max_tokens 16-24. Latency: send to last byte of "
            "the answers that completed (ok); TTFT: streamed ones, send to first chunk with a choice.", "",
            "| requests | ok | errors | cancelled on purpose | bad, expected 4xx ok | wall s | req/s | gen tok/s | "
            "latency p50 / p95 / p99 ms | TTFT p50 / p95 / p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {s['requests_sent']} | {s['ok']} | {s['errors']} | {s['cancelled']} | "
            f"{s['bad_expected_ok']}/{s['bad_sent']} | {s['wall_s']:.0f} | {s['requests_per_s']:.2f} | "
            f"{s['completion_tokens_per_s']:.1f} | {f1(lat.get('p50'), '.0f')} / {f1(lat.get('p95'), '.0f')} / "
            f"{f1(lat.get('p99'), '.0f')} | {f1(ttft.get('p50'), '.0f')} / {f1(ttft.get('p95'), '.0f')} / "
            f"{f1(ttft.get('p99'), '.0f')} |", "",
            f"| server RSS MiB (loaded, before any request: {f1(rss['loaded'])}) | start (idle, after a full-width "
            f"warm-up of {2 * s['clients']} requests, {f1(rss['warm_up_s'], '.0f')} s) | end (idle) | max | slope during the load |",
            "|---|---|---|---|---|",
            f"| /metrics `prefixport_memory_bytes{{kind=\"rss\"}}` | {f1(rss['start'])} | {f1(rss['end'])} | "
            f"{f1(rss['max'])} | {f1(rss['slope_per_min'], '+.2f')} MiB/min ({rss['samples']} samples; second "
            f"half {f1(rss['slope_per_min_second_half'], '+.2f')} MiB/min; {f1(rss['at_quarter'])} MiB a quarter "
            "of the way in) |",
            f"| /proc/PID/status VmRSS | {f1(rss['vmrss_start'])} | {f1(rss['vmrss_end'])} | {f1(rss['vmrss_max'])} | "
            f"{f1(rss['vmrss_slope_per_min'], '+.2f')} MiB/min |", "",
            f"Adapter churn over HTTP: {ch['cycles']} register/delete cycles of hot adapters "
            f"(POST p50 {f1((ch['post_ms'] or {}).get('p50'), '.0f')} ms, DELETE p50 "
            f"{f1((ch['delete_ms'] or {}).get('p50'), '.0f')} ms), {ch['hot_requests']} requests on hot adapters; "
            f"{ch['deleted_with_requests_running']} deletes happened with requests running on the adapter: "
            f"{ch['requests_running_at_delete']} such requests, outcomes "
            + (", ".join(f"{k} {v}" for k, v in ch["of_which"].items()) or "-") + ".",
            "",
            f"Determinism: {det['requests']} greedy or seeded requests from {det['templates_repeated']} templates "
            f"sent more than once; templates whose texts differed: greedy {det['greedy_differing']} of "
            f"{det['greedy_templates']}, seeded {det['seeded_differing']} of {det['seeded_templates']}"
            + (" (not errors: this export is quantized, and ONNX Runtime's MatMulNBits gives a row different "
               "logits in a batch than alone, so the batch composition changes greedy and seeded texts)"
               if s["quantized"] else
               " (not errors: in some batches a row's fp32 logits differ from alone by ~3e-5, which can flip a "
               "seeded sample across a boundary of the cumulative distribution, to the next token id that carries "
               "probability; greedy texts must not differ)")
            + ".", "",
            f"End: /health {json.dumps({k: s['health_end'].get(k) for k in ('status', 'running', 'waiting', 'adapters')})}"
            f"; max running {f1(s['max_running'], '.0f')}, max waiting {f1(s['max_waiting'], '.0f')}; server "
            f"request counters by status during the load: {json.dumps(s['server_status_counts'])} (client's view, "
            f"adapter POST/DELETE included, abandoned = 499: {json.dumps(s['client_status_counts'])}"
            f"{'' if s['status_counts_agree'] else ': they differ'}); server-side "
            f"cancellations {s['server_cancelled']:.0f} (client cancelled {s['cancelled']}).", "",
            f"CPU s during the load: server {f1(cpu['server_s'])}, client {f1(cpu['client_s'])}, other processes "
            f"{f1(cpu['others_s'])} ({100 * (cpu['others_share'] or 0):.0f}% of the cores)"
            + ("; busiest others: " + "; ".join(f"`{p['command'][:60]}` {p['cpu_s']} s" for p in cpu["busiest_others"])
               if cpu["busiest_others"] else "") + ".", "",
            "| outcome by kind | " + " | ".join(["ok", "error", "cancelled", "cancel_came_too_late",
                                                 "bad_expected_ok"]) + " |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in s["by_kind"].items():
            lines.append(f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in
                                                  ("ok", "error", "cancelled", "cancel_came_too_late",
                                                   "bad_expected_ok")) + " |")
        if s["first_errors"]:
            lines += ["", "First errors:", ""] + [f"- `{e[:300]}`" for e in s["first_errors"]]
        if s["bounded_out"]:
            lines += ["", f"**Bounded out:** {s['bounded_out']}."]
        lines.append("")
    e = result.get("engine")
    if e:
        lines += [f"## Engine: adapter register/unregister cycles (`{e['export']}`, in process)", "",
                  "| phase | cycles | wall s | cycles/s | evictions | re-reads | generation checks ok | errors | "
                  "RSS MiB start / end (growth) | RSS slope MiB/1000 cycles | fds start / end | maps start / end | "
                  "after close: RSS MiB / fds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, p in e["phases"].items():
            lines.append(
                f"| {label} | {p['cycles']} | {p['wall_s']:.1f} | {f1(p['cycles_per_s'], '.0f')} | {p['evictions']} | "
                f"{p['misses']} | {p['generation_checks'] - len(p['check_mismatches'])}/{p['generation_checks']} | "
                f"{p['n_errors']} | {p['start']['rss_mib']:.1f} / {p['end']['rss_mib']:.1f} "
                f"({p['rss_growth_mib']:+.1f}) | {f1(p['rss_slope_mib_per_1000_cycles'], '+.3f')} | "
                f"{p['start']['fds']} / {p['end']['fds']} | {p['start']['maps']} / {p['end']['maps']} | "
                f"{p['after_close']['rss_mib']:.1f} / {p['after_close']['fds']} |")
        first = next(iter(e["phases"].values()), None)
        lines += ["", "Per cycle: register a bundle (prompt and prefix alternating, 8 names, 3 registered at once), "
                  "unregister the oldest; a lookup every 7 cycles, a replacement every 25, a truncated bundle refused "
                  "every 100; greedy generation checks (base, both anchors, the newest churned name; 8 tokens) every "
                  f"{result['args']['check_every']} cycles against the reference made at the start. Operations "
                  f"(first phase): {json.dumps(first and first['operations'])}. RSS after gc.collect(), sampled every "
                  f"{result['args']['sample_cycles']} cycles: "
                  + "; ".join(f"{label}: " + ", ".join(f"{x['rss_mib']:.1f}" for x in p["samples"])
                              for label, p in e["phases"].items()) + "."]
        for label, p in e["phases"].items():
            if p["errors"] or p["check_mismatches"]:
                lines += [f"", f"{label}: errors {p['errors'][:3]}, mismatches {p['check_mismatches'][:2]}"]
        cut = [label for label, p in e["phases"].items() if p["bounded_out"]]
        if cut or len(e["phases"]) < 2:
            lines += ["", f"**Bounded out:** --max-seconds cut the engine soak short ({', '.join(cut) or 'a phase skipped'})."]
        ecpu = [p["cpu"] for p in e["phases"].values()]
        lines += ["", "CPU s by other processes during the engine phases: "
                  + ", ".join(f"{f1(c['others_s'])} ({100 * (c['others_share'] or 0):.0f}% of the cores"
                              + "".join(f"; `{p['command'][:60]}` {p['cpu_s']} s" for p in c["busiest_others"][:3])
                              + ")" for c in ecpu), ""]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; Python {m['python']}, "
              f"onnxruntime {m['versions'].get('onnxruntime')}, prefixport {m['versions'].get('prefixport')}. "
              f"Run began {result['began_utc']}.", "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
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
            f"RSS {f1(s['rss_mib']['start'])} -> {f1(s['rss_mib']['end'])} MiB")
    if not args.skip_engine:
        result["engine"] = engine_soak(args, deadline)
    result["machine"] = describe()
    result["seconds"] = time.perf_counter() - began
    result["command"] = ("python benchmarks/soak.py " + shlex.join(sys.argv[1:])).strip()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "soak" + ("_quick" if args.quick else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    md_path.write_text(table)
    print(table)
    s, e = result.get("server"), result.get("engine")
    summary: dict[str, Any] = {"benchmark": "soak", "quick": args.quick, "seconds": round(result["seconds"], 1),
                               "wrote": [str(json_path), str(md_path)]}
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
