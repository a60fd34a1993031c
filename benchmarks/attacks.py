"""One tenant's attacks on another, side by side: how far each moves a victim tenant's latency.

One `prefixport serve EXPORT --keys KEYS --speculative prompt-lookup --max-batch 16` on a free
127.0.0.1 port, with three keys: `victim` (user), `attacker` (user), `admin`. The victim sends a
steady stream of ordinary requests (C streamed, greedy chat requests at a time, each prompt unique,
of about 50-200 tokens, max_tokens 32 with `ignore_eos`) and its time to first token and
inter-chunk gaps are measured per request. Phases of a fixed duration alternate, so that drift
cancels: a baseline (the victim alone), an attack (the victim beside the attacker's clients, each
sending its next request as soon as the last is answered), a baseline, the next attack, ...,
a baseline. Each attack's ratios are its p99s over those of the two baselines around it, pooled.

The attacks (the attacker's key; the same request types as anyone's):

  nan            repetition_penalty and/or temperature 1e-300 (expected: 400)
  stops          600,000 one-character stop strings with n 16, near the body limit (expected: 400)
  stops_allowed  the heaviest accepted stop: 4 strings of 256 characters, n 16, max_tokens 64, ignore_eos
  n16_control    context: stops_allowed's load without its stop strings
  salts          a new random cache_salt per request, short prompts, max_tokens 4
  surrogates     lone surrogates (JSON "\\ud800") in a prompt, chat messages, stop, /tokenize (expected: 400)
  schema         the largest accepted json_schema response_format (probed before the phases), a new
                 schema per request (grammar cache churn)
  long_prompt    context, another issue: prompts of about 2,000 tokens (capped by the model's context)

Then, apart (no victim), the server's RSS over --salt-requests requests of a new salt each
(concurrency 8, max_tokens 4): growth after a warm-up of a tenth of them, against a 5% goal.

The script assumes no behaviour of the server: it records every status code, the victim's failed
requests and whether the server stayed up. The attacker runs in a process of its own, so that its
CPU work and event loop do not delay the victim's timestamps (on one machine it still takes cores
from the server: its CPU seconds are reported per phase).

    python -m benchmarks.attacks [--export exports/smollm2-135m-instruct] [--seconds 40] [--threads N]
        [--salt-requests 10000] [--attacks nan stops ...] [--quick] [--out benchmarks/results/attacks]

Writes OUT/attacks.json and OUT/attacks.md (--quick, 5 s phases and 300 salt requests:
attacks_short.*), prints the report, then one JSON line. The server's log goes to the temp folder
(its path is printed). Needs the `serve` extra and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import random
import secrets
import shlex
import signal
import string
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import httpx

from benchmarks.common import (DEFAULT_EXPORT, RESULTS, CpuMeter, cell, command, distribution, free_port, machine,
                               machine_line, rel, say, vm_rss, write_report)
from benchmarks.serving import CONTEXT, Request, ServerProcess, one_request, prompt_text, scrape_metrics
from prefixport.manifest import MANIFEST_NAME

MAX_BATCH = 16
VICTIM_TOKENS = (50, 200)  # the victim's prompt lengths, capped by the model's context
DELIVERY_S = 0.001  # chunks arriving within 1 ms of the one before: one delivery (one step's tokens)
VICTIM_CAP = 10_000  # most victim requests in one phase
ATTACK_CAP = 200_000  # most attacker requests in one phase
LONG_PROMPT_TOKENS = 2_000
SCHEMA_BISECTIONS = 4  # after halving: the largest accepted schema found within 1/16 of the step
STOP_COUNT, STOP_CHARS, STOP_ALLOWED = 600_000, 256, 4
SALT_CLIENTS, SALT_MAX_TOKENS = 8, 4
GOAL_RATIO, RSS_GOAL = 1.2, 0.05  # the issue's goals: victim p99s under 1.2 x baseline; RSS growth under 5%
SHORT_PROMPTS = ["hello there", "Say hi.", "What is two plus two?", "Name a colour.", "Good morning!",
                 "Count to three.", "Tell me a fact.", "Spell cat."]
JSON_HEADERS = {"content-type": "application/json"}
ATTACKS: dict[str, tuple[str, bool]] = {  # name -> (what it sends, counted against the goal)
    "nan": ("repetition_penalty and/or temperature 1e-300, max_tokens 5 (expected 400)", True),
    "stops": (f"{STOP_COUNT:,} one-character stop strings, n 16 (expected 400)", True),
    "stops_allowed": (f"{STOP_ALLOWED} stop strings of {STOP_CHARS} characters, n 16, max_tokens 64, ignore_eos "
                      "(the heaviest accepted; n16_control is the same load without the stops)", True),
    "n16_control": ("context: stops_allowed without stop strings (n 16, max_tokens 64, ignore_eos)", False),
    "salts": (f"a new random cache_salt per request, short prompts, max_tokens {SALT_MAX_TOKENS}", True),
    "surrogates": ("lone surrogates (\\ud800, \\udfff) in prompt, messages, stop, /tokenize (expected 400)", True),
    "schema": ("the largest accepted json_schema, a new one per request (grammar cache churn)", True),
    "long_prompt": ("context, another issue: ~2,000-token prompts, max_tokens 4", False),
}


# --- the tenants and the server ------------------------------------------------------------------

def write_keys(path: Path) -> dict[str, str]:
    """A keys file of fresh keys (victim, attacker and one attacker key per attack, users; admin);
    their ids -> keys. Each attack phase sends with a key of its own, so that the server's
    per-key state (its penalty box for refused requests) starts clean in every phase."""
    keys = {"victim": "user", "attacker": "user", **{f"attacker-{a}": "user" for a in ATTACKS}, "admin": "admin"}
    secret = {name: f"sk-{name}-{secrets.token_hex(16)}" for name in keys}
    path.write_text("".join(f'[[key]]\nid = "{name}"\nkey = "{secret[name]}"\nrole = "{role}"\n\n'
                            for name, role in keys.items()))
    return secret


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_ready(server: ServerProcess, base: str, admin: str, timeout_s: float) -> float:
    """Seconds until GET /health with the admin key answered 200 (a keys file makes /health private:
    ServerProcess.wait_healthy asks without a key); exits the run if the server dies or never does."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if not server.alive():
            raise SystemExit(f"the server exited:\n{server.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", headers=auth(admin), timeout=2).status_code == 200:
                return time.perf_counter() - start
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy after {timeout_s:.0f} s:\n{server.tail()}")


def settle(base: str, admin: str, timeout_s: float = 60) -> dict[str, Any]:
    """Waits until the server runs and queues nothing (at most `timeout_s`); its last /health body."""
    body: dict[str, Any] = {}
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end:
        try:
            r = httpx.get(f"{base}/health", headers=auth(admin), timeout=5)
            body = {"http_status": r.status_code, **r.json()}
            if r.status_code != 200 or (body.get("running") == 0 and body.get("waiting") == 0):
                break
        except (httpx.HTTPError, ValueError) as e:
            body = {"http_status": None, "error": f"{type(e).__name__}: {e}"}
        time.sleep(0.5)
    time.sleep(1.0)
    return body


def server_gauges(base: str, admin: str) -> dict[str, float]:
    """The server's memory, prompt-cache and speculation figures from /metrics ({} if unreachable)."""
    try:
        samples = scrape_metrics(httpx.get(f"{base}/metrics", headers=auth(admin), timeout=10).text)
    except httpx.HTTPError:
        return {}
    keep = ("prefixport_memory_bytes", "prefixport_prompt_cache_", "prefixport_speculative_")
    return {k: v for k, v in samples.items() if k.startswith(keep)}


def count_tokens(client: httpx.Client, base: str, prompt: str | None = None, chat: bool = False) -> tuple[int, int]:
    """(tokens, the model's context) of a completion prompt or of a chat of one user message."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    r = client.post(f"{base}/tokenize", json=body)
    r.raise_for_status()
    return r.json()["count"], r.json()["max_model_len"]


# --- the victim ----------------------------------------------------------------------------------

@dataclass
class VictimRecord:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between consecutive deliveries of chunks
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class _TimedResponse:
    """A streamed response whose lines are stamped on arrival into `marks`."""

    def __init__(self, response: httpx.Response, marks: list[tuple[float, str]]) -> None:
        self._response, self._marks = response, marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    async def aiter_lines(self) -> AsyncIterator[str]:
        async for line in self._response.aiter_lines():
            self._marks.append((time.perf_counter(), line))
            yield line


class ChunkClock:
    """An httpx.AsyncClient seen through, for `serving.one_request`: each streamed line's arrival time
    is kept in `marks` (the SSE parsing stays serving.py's)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.marks: list[tuple[float, str]] = []

    @contextlib.asynccontextmanager
    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[_TimedResponse]:
        async with self.client.stream(*args, **kwargs) as response:
            yield _TimedResponse(response, self.marks)


def deliveries(marks: Sequence[tuple[float, str]]) -> list[float]:
    """When the chunks carrying a choice arrived (not the usage chunk, not [DONE]), those within
    DELIVERY_S of the one before counted once: the server sends a chunk per token, and a step that
    accepts several speculated tokens sends them together."""
    times: list[float] = []
    for t, line in marks:
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                has_choice = bool(json.loads(line[6:]).get("choices"))
            except ValueError:
                continue
            if has_choice and not (times and t - times[-1] < DELIVERY_S):
                times.append(t)
    return times


async def victim_request(client: httpx.AsyncClient, base: str, req: Request, max_tokens: int,
                         timeout_s: float) -> VictimRecord:
    """One streamed greedy chat request (`serving.one_request`), its chunks timed."""
    clock = ChunkClock(client)
    try:
        out = await asyncio.wait_for(one_request(clock, base, req, max_tokens), timeout_s)  # type: ignore[arg-type]
    except asyncio.TimeoutError:
        return VictimRecord(latency_s=timeout_s, error=f"no answer within {timeout_s:.0f} s")
    times = deliveries(clock.marks)
    return VictimRecord(ttft_s=out.ttft_s, gaps_s=[b - a for a, b in zip(times, times[1:])],
                        latency_s=out.latency_s, prompt_tokens=out.prompt_tokens,
                        completion_tokens=out.completion_tokens, error=out.error)


async def victim_phase(base: str, key: str, model: str, prompts: Sequence[str], clients: int, max_tokens: int,
                       seconds: float, first: int) -> list[VictimRecord]:
    """`clients` victims each sending its next request when the last ends, for `seconds` (in-flight
    requests finish); request i's prompt is prompts[i % len] behind a unique note (no cache hits)."""
    records: list[VictimRecord] = []
    numbers = itertools.count(first)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(connect=10, read=None, write=30, pool=None)
    async with httpx.AsyncClient(headers=auth(key), limits=limits, timeout=timeout) as client:
        async def worker() -> None:
            while time.perf_counter() < deadline and len(records) < VICTIM_CAP:
                i = next(numbers)
                req = Request(i, model, "medium", f"Note {i}. {prompts[i % len(prompts)]}")
                records.append(await victim_request(client, base, req, max_tokens, max(60.0, 3 * seconds)))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return records


def victim_prompts(client: httpx.Client, base: str, seed: int, candidates: int,
                   max_tokens: int) -> tuple[list[str], int]:
    """Seeded chat prompts of VICTIM_TOKENS tokens (the range capped to fit the context), and the
    model's context."""
    rng = random.Random(seed)
    texts = [prompt_text(rng, rng.randint(0, 10)) for _ in range(candidates)]
    counted = [(text, *count_tokens(client, base, text, chat=True)) for text in texts]
    context = counted[0][2]
    high = min(VICTIM_TOKENS[1], context - max_tokens - 16)
    low = min(VICTIM_TOKENS[0], high // 2)
    fits = [text for text, n, _ in counted if low <= n <= high]
    if len(fits) < 8:
        fits = [text for text, n, _ in counted if n <= high]
    if not fits:
        raise SystemExit(f"no victim prompt fits the model's context of {context} tokens")
    return fits, context


# --- the attacks ---------------------------------------------------------------------------------

def encode(body: dict[str, Any]) -> bytes:
    """JSON bytes, ASCII only: a lone surrogate goes out as its escape, \\ud800 (httpx's json= cannot)."""
    return json.dumps(body, separators=(",", ":")).encode()


PROPERTY_TYPES: list[dict[str, Any]] = [{"type": "integer"}, {"type": "string", "maxLength": 24}, {"type": "boolean"},
                                        {"type": "number"}, {"enum": ["red", "green", "blue"]}]


def new_tag() -> str:
    """A random tag of fixed length (so that every schema of n properties has one size)."""
    return secrets.token_hex(6)


def form_schema(properties: int, tag: str) -> dict[str, Any]:
    """An object schema of `properties` required fields of mixed types, named after `tag` (a new tag:
    a new schema, compiled anew)."""
    props = {f"f{tag}_{i}": PROPERTY_TYPES[i % len(PROPERTY_TYPES)] for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def properties_for(kib: float) -> int:
    """How many properties make a form_schema of about `kib` KiB."""
    per = len(json.dumps(form_schema(100, new_tag()))) / 100
    return max(1, int(kib * 1024 / per))


@dataclass
class AttackPlan:
    """What the attacker sends; picklable, for the attacker's process. request(attack, i) -> (variant,
    path, body)."""

    model: str
    long_text: str = ""
    schema_properties: int = 1
    seed: int = 0

    @cached_property
    def huge_stops(self) -> bytes:  # built once per process: 2.4 MB
        chars = string.ascii_letters + string.digits + string.punctuation
        stops = [chars[i % len(chars)] for i in range(STOP_COUNT)]
        return encode({"model": self.model, "prompt": "hello there", "max_tokens": 16, "n": 16, "stop": stops})

    def request(self, attack: str, i: int) -> tuple[str, str, bytes]:
        made: tuple[str, str, bytes] = getattr(self, f"_{attack}")(i)
        return made

    def _nan(self, i: int) -> tuple[str, str, bytes]:
        variant = ("repetition_penalty", "temperature", "both")[i % 3]
        body: dict[str, Any] = {"model": self.model, "prompt": "hello there", "max_tokens": 5}
        if variant != "temperature":
            body["repetition_penalty"] = 1e-300
        if variant != "repetition_penalty":
            body["temperature"] = 1e-300
        return variant, "/v1/completions", encode(body)

    def _stops(self, i: int) -> tuple[str, str, bytes]:
        return f"{STOP_COUNT} stops", "/v1/completions", self.huge_stops

    def _n16(self, stop: list[str] | None) -> bytes:
        body = {"model": self.model, "prompt": "hello there", "max_tokens": 64, "n": 16, "ignore_eos": True}
        return encode(body | ({"stop": stop} if stop else {}))

    def _stops_allowed(self, i: int) -> tuple[str, str, bytes]:
        # never matched whole, often partly (runs of spaces, newlines, "e"): text is held back and checked
        stops = [" " * STOP_CHARS, "\n" * STOP_CHARS, "e" * STOP_CHARS, ("the " * STOP_CHARS)[:STOP_CHARS]]
        return "4 x 256 chars", "/v1/completions", self._n16(stops[:STOP_ALLOWED])

    def _n16_control(self, i: int) -> tuple[str, str, bytes]:
        return "no stop", "/v1/completions", self._n16(None)

    def _salts(self, i: int) -> tuple[str, str, bytes]:
        body = {"model": self.model, "prompt": SHORT_PROMPTS[i % len(SHORT_PROMPTS)], "max_tokens": SALT_MAX_TOKENS,
                "temperature": 0, "cache_salt": uuid.uuid4().hex}
        return "new salt", "/v1/completions", encode(body)

    def _surrogates(self, i: int) -> tuple[str, str, bytes]:
        lone = ("\ud800", "\udfff")[i // 5 % 2]
        text = f"hello {lone} there"
        messages = [{"role": "user", "content": text}]
        variants: list[tuple[str, str, dict[str, Any]]] = [
            ("prompt", "/v1/completions", {"model": self.model, "prompt": text, "max_tokens": 4}),
            ("messages", "/v1/chat/completions", {"model": self.model, "messages": messages, "max_tokens": 4}),
            ("stop", "/v1/completions", {"model": self.model, "prompt": "hello", "max_tokens": 4, "stop": [lone]}),
            ("tokenize prompt", "/tokenize", {"prompt": text}),
            ("tokenize messages", "/tokenize", {"messages": messages})]
        variant, path, body = variants[i % len(variants)]
        return variant, path, encode(body)

    def schema_body(self, properties: int, tag: str, max_tokens: int = 16) -> bytes:
        fmt = {"type": "json_schema", "json_schema": {"name": f"form{tag}", "strict": True,
                                                      "schema": form_schema(properties, tag)}}
        return encode({"model": self.model, "messages": [{"role": "user", "content": "Fill in the form as JSON."}],
                       "max_tokens": max_tokens, "temperature": 0, "response_format": fmt})

    def _schema(self, i: int) -> tuple[str, str, bytes]:
        body = self.schema_body(self.schema_properties, new_tag())
        return f"{self.schema_properties} properties", "/v1/chat/completions", body

    def _long_prompt(self, i: int) -> tuple[str, str, bytes]:
        body = {"model": self.model, "prompt": f"{self.seed}-{i}. {self.long_text}", "max_tokens": 4, "temperature": 0}
        return "long prompt", "/v1/completions", encode(body)


class Tally:
    """The attacker's answers: counts by variant and status, a message per status, latencies."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self.cut = 0  # in flight at the phase's end: cancelled (the connection closed)

    def add(self, variant: str, status: str, message: str, latency_s: float | None = None) -> None:
        self.counts.setdefault(variant, Counter())[status] += 1
        self.examples.setdefault(status, message[:240])
        if latency_s is not None:
            self.latencies.append(latency_s)

    def result(self) -> dict[str, Any]:
        total: Counter[str] = sum(self.counts.values(), Counter())
        return {"sent": sum(total.values()) + self.cut, "by_status": dict(total), "cut_at_end": self.cut,
                "by_variant": {k: dict(v) for k, v in self.counts.items()}, "examples": self.examples,
                "latency_ms": distribution(self.latencies, 1000)}


def error_message(response: httpx.Response) -> str:
    """An answer's error message (OpenAI's error object), or the start of its body."""
    if response.status_code == 200:
        return "ok"
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:240]


async def attack_loop(base: str, key: str, plan: AttackPlan, attack: str, clients: int, cap: int,
                      deadline: float) -> Tally:
    """`clients` workers send `attack`'s requests, each its next when the last is answered, until
    the wall-clock `deadline` (in-flight ones are then cancelled) or `cap` requests in all."""
    tally, numbers = Tally(), itertools.count()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(connect=10, read=None, write=60, pool=None)
    async with httpx.AsyncClient(headers=auth(key) | JSON_HEADERS, limits=limits, timeout=timeout) as client:
        async def worker() -> None:
            while time.time() < deadline:
                i = next(numbers)
                if i >= cap:
                    return
                variant, path, body = plan.request(attack, i)
                start = time.perf_counter()
                try:
                    r = await asyncio.wait_for(client.post(f"{base}{path}", content=body), deadline - time.time())
                except asyncio.TimeoutError:
                    tally.cut += 1
                    return
                except httpx.HTTPError as e:
                    tally.add(variant, type(e).__name__, str(e))
                    await asyncio.sleep(0.1)  # the server gone or refusing connections: no hot spin
                    continue
                tally.add(variant, str(r.status_code), error_message(r), time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return tally


def attacker_process(conn: Any, base: str, key: str, plan: AttackPlan, attack: str, clients: int, cap: int) -> None:
    """The attacker's process: prepares, says "ready", waits for the wall-clock deadline (None: stop),
    attacks until it, sends back its tally and CPU seconds."""
    if attack == "stops":
        plan.huge_stops  # noqa: B018 (built before the phase starts)
    conn.send("ready")
    deadline = conn.recv()
    if deadline is None:
        return
    began = time.process_time()
    result = asyncio.run(attack_loop(base, key, plan, attack, clients, cap, deadline)).result()
    conn.send(result | {"cpu_s": time.process_time() - began})


class Attacker:
    """The attacker's clients in a process of their own (spawned), for one phase; a context manager
    that always ends it."""

    def __init__(self, base: str, key: str, plan: AttackPlan, attack: str, clients: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=attacker_process, args=(child, base, key, plan, attack, clients, ATTACK_CAP),
                                   daemon=True)

    def __enter__(self) -> Attacker:
        self.process.start()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise SystemExit("the attacker's process did not start")
        return self

    def go(self, deadline: float) -> None:
        self.conn.send(deadline)

    def result(self, timeout_s: float) -> dict[str, Any]:
        if not self.conn.poll(timeout_s):
            return {"sent": 0, "by_status": {}, "error": f"the attacker's process sent nothing in {timeout_s:.0f} s"}
        result: dict[str, Any] = self.conn.recv()
        return result

    def __exit__(self, *exc: object) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# --- setup: prompts, the long prompt, the schema probe ---------------------------------------------

def long_text(client: httpx.Client, base: str, context: int) -> tuple[str, int]:
    """A text of CONTEXT sentences in turn of about LONG_PROMPT_TOKENS tokens (capped to fit the
    context with a few to spare); the text and its count."""
    target = min(LONG_PROMPT_TOKENS, context - 24)
    per = [count_tokens(client, base, s + " ")[0] for s in CONTEXT]
    sentences: list[str] = []
    while sum(per[i % len(per)] for i in range(len(sentences))) < target:
        sentences.append(CONTEXT[len(sentences) % len(CONTEXT)])
    while sentences:
        text = " ".join(sentences)
        n = count_tokens(client, base, text)[0]
        if n <= target:
            return text, n
        sentences.pop()
    return "", 0


def try_schema(client: httpx.Client, base: str, plan: AttackPlan, properties: int) -> dict[str, Any]:
    """One chat request (max_tokens 1) with a new form_schema of `properties`: size, status, seconds, message."""
    body = plan.schema_body(properties, new_tag(), max_tokens=1)
    start = time.perf_counter()
    try:
        r = client.post(f"{base}/v1/chat/completions", content=body)
        status, message = r.status_code, error_message(r)
    except httpx.HTTPError as e:
        status, message = None, f"{type(e).__name__}: {e}"
    return {"properties": properties, "body_bytes": len(body), "status": status,
            "seconds": round(time.perf_counter() - start, 3), "message": message[:240]}


def probe_schema(base: str, key: str, plan: AttackPlan, max_kib: float) -> tuple[int, list[dict[str, Any]]]:
    """The largest form_schema the server accepts: max_kib, halved down to 1 KiB until one is accepted,
    then SCHEMA_BISECTIONS bisections between it and the refused size above (a new schema each try).
    Its properties, and every try."""
    tries: list[dict[str, Any]] = []
    kib, accepted, refused = max_kib, 0, 0
    with httpx.Client(headers=auth(key) | JSON_HEADERS, timeout=httpx.Timeout(120, connect=10)) as client:
        while kib >= 1 and not accepted:
            tries.append(try_schema(client, base, plan, properties_for(kib)))
            if tries[-1]["status"] == 200:
                accepted = tries[-1]["properties"]
            else:
                refused = tries[-1]["properties"]
            kib /= 2
        for _ in range(SCHEMA_BISECTIONS if accepted and refused else 0):
            middle = (accepted + refused) // 2
            if middle in (accepted, refused):
                break
            tries.append(try_schema(client, base, plan, middle))
            accepted, refused = (middle, refused) if tries[-1]["status"] == 200 else (accepted, middle)
    return accepted or (tries[-1]["properties"] if tries else 1), tries


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Setting:
    """What every phase shares."""

    base: str
    keys: dict[str, str]
    model: str
    prompts: list[str]
    plan: AttackPlan
    server: ServerProcess
    seconds: float
    victim_clients: int
    attacker_clients: int
    max_tokens: int
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(0, 100_000))


def run_phase(s: Setting, name: str, attack: str | None) -> dict[str, Any]:
    """One phase: the victim for s.seconds, beside `attack` if given; its raw records and figures."""
    say(f"phase {name}: {s.seconds:.0f} s" + (f", attack {attack}" if attack else ", the victim alone"))
    rss_before = vm_rss(s.server.pid)
    attacker = Attacker(s.base, s.keys[f"attacker-{attack}"], s.plan, attack, s.attacker_clients) if attack else None
    tally: dict[str, Any] | None = None
    with attacker or contextlib.nullcontext(), CpuMeter(s.server.pid) as meter:
        start = time.perf_counter()
        if attacker:
            attacker.go(time.time() + s.seconds)
        records = asyncio.run(victim_phase(s.base, s.keys["victim"], s.model, s.prompts, s.victim_clients,
                                           s.max_tokens, s.seconds, next(s.numbers)))
        if attacker:
            tally = attacker.result(timeout_s=max(0.0, s.seconds - (time.perf_counter() - start)) + 60)
    health = settle(s.base, s.keys["admin"])
    cpu = meter.result
    attacker_cpu = (tally or {}).get("cpu_s") or 0.0
    return {"name": name, "attack": attack, "records": records, "attacker": tally,
            "wall_s": cpu["wall_s"], "alive": s.server.alive(), "health_after": health,
            "rss_mib": [None if v is None else v / 2**20 for v in (rss_before, vm_rss(s.server.pid))],
            "cpu_s": {"server": cpu["server_s"], "victim_client": cpu["client_s"], "attacker": attacker_cpu,
                      "others": None if cpu["others_s"] is None else max(0.0, cpu["others_s"] - attacker_cpu)},
            "others_share": cpu["others_share"], "gauges_after": server_gauges(s.base, s.keys["admin"])}


def salt_sample(s: Setting, requests: int) -> dict[str, Any]:
    """The server's RSS (MiB) and its prompt cache's bytes and blocks after `requests` salt requests."""
    gauges = server_gauges(s.base, s.keys["admin"])
    return {"requests": requests, "rss_mib": (vm_rss(s.server.pid) or 0) / 2**20,
            "prompt_cache_mib": gauges.get("prefixport_prompt_cache_bytes", 0) / 2**20,
            "prompt_cache_blocks": gauges.get("prefixport_prompt_cache_blocks")}


def salt_memory(s: Setting, requests: int, timeout_s: float) -> dict[str, Any]:
    """The server's RSS over `requests` requests of a new cache_salt each (SALT_CLIENTS at a time, no
    victim): after a warm-up of a tenth, then after each further tenth."""
    say(f"salt memory: {requests} requests, a new cache_salt each, {SALT_CLIENTS} at a time ...")
    end = time.time() + timeout_s
    warm = max(1, requests // 10)
    slices = [warm] + [(requests - warm) // 9 + (1 if i < (requests - warm) % 9 else 0) for i in range(9)]
    samples = [salt_sample(s, 0)]
    statuses: Counter[str] = Counter()
    done = 0
    for n in (n for n in slices if n):
        tally = asyncio.run(attack_loop(s.base, s.keys["attacker"], s.plan, "salts", SALT_CLIENTS, n, end)).result()
        statuses.update(tally["by_status"])
        done += tally["sent"]
        samples.append(salt_sample(s, done))
        say(f"  {done} requests, server RSS {samples[-1]['rss_mib']:.1f} MiB")
        if time.time() >= end or not s.server.alive():
            break
    first, after_warm, last = (samples[i]["rss_mib"] for i in (0, 1, -1))
    growth = (last - after_warm) / after_warm
    gauges = server_gauges(s.base, s.keys["admin"])
    return {"requests": requests, "sent": done, "by_status": dict(statuses), "warmup_requests": warm,
            "samples": samples, "rss_start_mib": first, "rss_after_warmup_mib": after_warm, "rss_end_mib": last,
            "growth_after_warmup": growth, "growth_from_start": (last - first) / first,
            "goal_met": growth < RSS_GOAL and done >= requests,
            "prompt_cache_budget_mib": gauges.get("prefixport_prompt_cache_budget_bytes", 0) / 2**20,
            "gauges_after": gauges}


def warm_up(s: Setting) -> None:
    """A few victim requests, then one n-16 request (batch buffers at full width), from the admin key."""
    say("warming up ...")
    asyncio.run(victim_phase(s.base, s.keys["admin"], s.model, s.prompts, s.victim_clients, 4, 0.5, 90_000_000))
    body = encode({"model": s.model, "prompt": "hello there", "max_tokens": 8, "n": MAX_BATCH, "ignore_eos": True})
    httpx.post(f"{s.base}/v1/completions", content=body, headers=auth(s.keys["admin"]) | JSON_HEADERS, timeout=300)
    settle(s.base, s.keys["admin"])


# --- summary ---------------------------------------------------------------------------------------

def victim_figures(records: Sequence[VictimRecord], max_tokens: int) -> dict[str, Any]:
    """The victim's figures over records: counts, TTFT and inter-chunk gaps (ms), errors."""
    ok = [r for r in records if r.error is None]
    errors = Counter((r.error or "")[:160] for r in records if r.error is not None)
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
            "short_answers": sum(r.completion_tokens < max_tokens for r in ok),
            "errors": dict(errors.most_common(5)),
            "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
            "itl_ms": distribution([g for r in ok for g in r.gaps_s], 1000),
            "prompt_tokens": distribution([r.prompt_tokens for r in ok if r.prompt_tokens])}


def ratio(value: dict[str, float] | None, reference: dict[str, float] | None, key: str = "p99") -> float | None:
    return value[key] / reference[key] if value and reference and reference[key] else None


def summarize(phases: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Each phase's figures; an attack's ratios over the baselines just before and after it, pooled."""
    out: dict[str, Any] = {}
    baselines = [p for p in phases if p["attack"] is None]
    for i, p in enumerate(phases):
        fig = victim_figures(p["records"], max_tokens)
        row = {k: v for k, v in p.items() if k != "records"} | {"victim": fig}
        row["raw"] = {"ttft_s": [None if r.ttft_s is None else round(r.ttft_s, 5) for r in p["records"]],
                      "gaps_s": [[round(g, 5) for g in r.gaps_s] for r in p["records"]]}
        if p["attack"] is not None:
            around = [q for q in (phases[i - 1] if i else None, phases[i + 1] if i + 1 < len(phases) else None)
                      if q is not None and q["attack"] is None]
            ref = victim_figures([r for q in around for r in q["records"]], max_tokens)
            in_goal = ATTACKS[p["attack"]][1]
            row |= {"baselines": [q["name"] for q in around], "baseline_victim": ref,
                    "ttft_p99_ratio": ratio(fig["ttft_ms"], ref["ttft_ms"]),
                    "itl_p99_ratio": ratio(fig["itl_ms"], ref["itl_ms"]), "in_goal": in_goal}
            ratios = (row["ttft_p99_ratio"], row["itl_p99_ratio"])
            row["goal_met"] = None if not in_goal else (
                fig["failed"] == 0 and all(r is not None and r < GOAL_RATIO for r in ratios))
        out[p["name"]] = row
    pooled = victim_figures([r for p in baselines for r in p["records"]], max_tokens)
    return {"phases": out, "baseline_pooled": pooled}


def status_text(tally: dict[str, Any] | None) -> str:
    if not tally:
        return "-"
    parts = [f"{k} x{v}" for k, v in sorted(tally.get("by_status", {}).items())]
    if tally.get("cut_at_end"):
        parts.append(f"cut at end x{tally['cut_at_end']}")
    return ", ".join(parts) or tally.get("error", "none")


def pair(d: dict[str, float] | None) -> str:
    return f"{d['p50']:.0f} / {d['p99']:.0f}" if d else "-"


def goal_text(row: dict[str, Any]) -> str:
    if row["attack"] is None:
        return ""
    if not row["in_goal"]:
        return "context"
    return "**met**" if row["goal_met"] else "**missed**"


def phase_table(result: dict[str, Any]) -> list[str]:
    lines = ["| phase | victim ok / failed | TTFT p50 / p99 ms | ITL p50 / p99 ms | TTFT p99 x base | "
             "ITL p99 x base | attacker requests by status | goal |", "|---|---|---|---|---|---|---|---|"]
    pooled = result["baseline_pooled"]
    lines.append(f"| baselines pooled | {pooled['completed']} / {pooled['failed']} | {pair(pooled['ttft_ms'])} | "
                 f"{pair(pooled['itl_ms'])} | 1.00 | 1.00 | - | |")
    for name, row in result["phases"].items():
        v = row["victim"]
        label = name if row["attack"] is None else f"**{name}**"
        lines.append(f"| {label} | {v['completed']} / {v['failed']} | {pair(v['ttft_ms'])} | {pair(v['itl_ms'])} | "
                     f"{cell(row.get('ttft_p99_ratio'), '.2f')} | {cell(row.get('itl_p99_ratio'), '.2f')} | "
                     f"{status_text(row['attacker'])} | {goal_text(row)} |")
    return lines


def detail_lines(result: dict[str, Any]) -> list[str]:
    """Per attack: what it sent, statuses by variant, one message per status; CPU; victim errors."""
    lines = ["## The attacks", ""]
    for name, row in result["phases"].items():
        if row["attack"] is None:
            continue
        tally, cpu = row["attacker"] or {}, row["cpu_s"]
        lines.append(f"- **{name}**: {ATTACKS[row['attack']][0]}. "
                     + "; ".join(f"{variant}: {status_text({'by_status': c})}"
                                 for variant, c in (tally.get("by_variant") or {}).items())
                     + (f". Attacker latency p50 / p99 {pair(tally['latency_ms'])} ms"
                        if tally.get("latency_ms") else "")
                     + f". CPU s: server {cell(cpu['server'])}, victim client {cell(cpu['victim_client'])}, "
                       f"attacker {cell(cpu['attacker'])}, others {cell(cpu['others'])}."
                     + ("" if row["alive"] else " **The server died.**"))
        for status, message in (tally.get("examples") or {}).items():
            if status != "200":
                lines.append(f"  - {status}: `{message[:160]}`")
        for error, n in row["victim"]["errors"].items():
            lines.append(f"  - victim failure x{n}: `{error}`")
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    """The report: the phases' table, the attacks' details, the salt memory, the schema probe, the machine."""
    v = result["baseline_pooled"]
    tokens = v["prompt_tokens"] or {"min": 0, "max": 0, "p50": 0}
    lines = [
        f"# Tenant attacks: a victim's latency beside each attack ({result['model']}, {result['export']})", "",
        f"Server: `{result['server_command']}`. Victim (key `victim`): {result['victim_clients']} streamed greedy chat "
        f"requests at a time, each prompt unique ({tokens['min']:.0f}-{tokens['max']:.0f} tokens, median "
        f"{tokens['p50']:.0f}), max_tokens {result['max_tokens']} with ignore_eos. Attacker (key `attacker`): "
        f"{result['attacker_clients']} clients in a process of their own, each sending its next request as soon as "
        f"the last is answered. Phases of {result['seconds']:.0f} s, a baseline (the victim alone) before and after "
        "each attack; \"x base\" is the attack's p99 over the p99 of the two baselines around it, pooled. TTFT: "
        "request sent to the first chunk with a choice; ITL: the gaps between consecutive deliveries of such chunks "
        f"(chunks within {1000 * DELIVERY_S:g} ms of the one before are one delivery: the server sends a chunk per "
        "token, and a step that accepts several tokens of prompt lookup sends them together). "
        "Goal (the attacks counted against it): "
        f"victim p99s under {GOAL_RATIO} x baseline and no failed victim request; context rows are not attacks "
        "of this issue (long_prompt stalls the victim: another issue).", ""]
    lines += phase_table(result) + [""] + detail_lines(result)
    noisy = {k: r["others_share"] for k, r in result["phases"].items() if (r["others_share"] or 0) > 0.1}
    if noisy:
        lines += ["**Noisy machine:** other processes (the attacker's excluded) used "
                  + ", ".join(f"{100 * s:.0f}% of the cores during {k}" for k, s in noisy.items())
                  + "; these figures are not clean.", ""]
    salt = result.get("salt_memory")
    if salt:
        lines += ["## Memory: per-salt state", "",
                  f"{salt['sent']} requests from the attacker key, each with a new random cache_salt "
                  f"({SALT_CLIENTS} at a time, max_tokens {SALT_MAX_TOKENS}, no victim; statuses: "
                  f"{status_text({'by_status': salt['by_status']})}). Server RSS {salt['rss_start_mib']:.1f} MiB "
                  f"before, {salt['rss_after_warmup_mib']:.1f} MiB after the warm-up ({salt['warmup_requests']} "
                  f"requests), {salt['rss_end_mib']:.1f} MiB at the end: **{100 * salt['growth_after_warmup']:+.1f}%** "
                  f"after the warm-up (goal under {100 * RSS_GOAL:.0f}%: {'met' if salt['goal_met'] else 'missed'}), "
                  f"{100 * salt['growth_from_start']:+.1f}% from before. The prompt cache's blocks count in RSS up to "
                  f"its budget ({salt['prompt_cache_budget_mib']:.0f} MiB, `--prompt-cache-mb`).",
                  "", "| requests | RSS MiB | prompt cache MiB | prompt cache blocks |",
                  "|---|---|---|---|"]
        lines += [f"| {p['requests']} | {p['rss_mib']:.1f} | {p['prompt_cache_mib']:.1f} | "
                  f"{cell(p['prompt_cache_blocks'], '.0f')} |" for p in salt["samples"]] + [""]
    probe = result.get("schema_probe")
    if probe:
        lines += ["## The schema attack's size", "",
                  "Probed before the phases: halving from the largest, then bisecting (a new schema each, "
                  f"max_tokens 1); the schema attack sent {result['schema_properties']} properties per schema.", "",
                  "| properties | body bytes | status | s | message |", "|---|---|---|---|---|"]
        lines += [f"| {t['properties']} | {t['body_bytes']} | {t['status']} | {t['seconds']} | "
                  f"{t['message'][:100] if t['status'] != 200 else ''} |" for t in probe] + [""]
    if result.get("aborted"):
        lines += [f"**Run cut short:** {result['aborted']}", ""]
    lines += [machine_line(result["machine"]), "",
              f"Command: `{result['command']}` ({result['seconds_total']:.0f} s in all)", ""]
    return "\n".join(lines)


def summary_line(result: dict[str, Any], wrote: list[Path]) -> dict[str, Any]:
    """The closing JSON line: per attack the ratios, failures, attacker statuses and the goal."""
    phases = {name: {"ttft_p99_ratio": row.get("ttft_p99_ratio") and round(row["ttft_p99_ratio"], 3),
                     "itl_p99_ratio": row.get("itl_p99_ratio") and round(row["itl_p99_ratio"], 3),
                     "victim_failed": row["victim"]["failed"], "attacker": (row["attacker"] or {}).get("by_status"),
                     "goal_met": row.get("goal_met")}
              for name, row in result["phases"].items() if row["attack"] is not None}
    salt = result.get("salt_memory") or {}
    return {"benchmark": "attacks", "quick": result["quick"], "seconds": round(result["seconds_total"], 1),
            "wrote": [str(p) for p in wrote], "attacks": phases,
            "salt_rss_growth": salt.get("growth_after_warmup") and round(salt["growth_after_warmup"], 4),
            "salt_goal_met": salt.get("goal_met"), "aborted": result.get("aborted")}


# --- main --------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT, help="the export folder to serve")
    parser.add_argument("--seconds", type=float, help="seconds per phase (default 40; --quick 5)")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS),
                        help="attacks to run, in order (default: all)")
    parser.add_argument("--salt-requests", type=int, help="requests of the salt memory phase (default 10000; "
                                                           "--quick 300; 0: skip it)")
    parser.add_argument("--salt-timeout", type=float, default=1800, help="most seconds of the salt memory phase")
    parser.add_argument("--victim-clients", type=int, default=2)
    parser.add_argument("--attacker-clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="the victim's max_tokens")
    parser.add_argument("--schema-kib", type=float, default=64, help="the largest schema probed, KiB (then halved)")
    parser.add_argument("--threads", type=int, default=None, help="server --threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 s phases, 300 salt requests: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "attacks")
    args = parser.parse_args()
    args.attacks = list(dict.fromkeys(args.attacks))  # each once: phases are named after their attack
    args.seconds = args.seconds or (5.0 if args.quick else 40.0)
    args.salt_requests = args.salt_requests if args.salt_requests is not None else (300 if args.quick else 10_000)
    return args


def serve_options(threads: int | None) -> list[str]:
    """`prefixport serve`'s options after EXPORT and --keys KEYS (host and port aside)."""
    out = ["--speculative", "prompt-lookup", "--max-batch", str(MAX_BATCH)]
    return out + (["--threads", str(threads)] if threads else [])


def setup(args: argparse.Namespace, base: str, keys: dict[str, str],
          server: ServerProcess) -> tuple[Setting, dict[str, Any]]:
    """The victim's prompts, the long prompt, the schema size; the shared setting and what setup found."""
    with httpx.Client(headers=auth(keys["victim"]), timeout=60) as client:
        listing = client.get(f"{base}/v1/models").json()["data"]
        model = next(m["id"] for m in listing if not m.get("parent"))
        prompts, context = victim_prompts(client, base, args.seed, 100 if args.quick else 300, args.max_tokens)
        text, long_tokens = long_text(client, base, context) if "long_prompt" in args.attacks else ("", 0)
    plan = AttackPlan(model, text, 1, args.seed)
    found: dict[str, Any] = {"model": model, "context": context, "victim_prompt_pool": len(prompts),
                             "long_prompt_tokens": long_tokens}
    if "schema" in args.attacks:
        say(f"probing the largest schema accepted (from {args.schema_kib:g} KiB down) ...")
        plan.schema_properties, found["schema_probe"] = probe_schema(base, keys["attacker"], plan, args.schema_kib)
        found["schema_properties"] = plan.schema_properties
    setting = Setting(base, keys, model, prompts, plan, server, args.seconds, args.victim_clients,
                      args.attacker_clients, args.max_tokens)
    return setting, found


def run_all(s: Setting, attacks: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]:
    """baseline, attack, baseline, attack, ..., baseline; stops early if the server dies or is unhealthy."""
    phases = [run_phase(s, "baseline 1", None)]
    for k, attack in enumerate(attacks):
        for name, which in ((attack, attack), (f"baseline {k + 2}", None)):
            phases.append(run_phase(s, name, which))
            p = phases[-1]
            if not p["alive"] or p["health_after"].get("http_status") != 200:
                return phases, f"after phase {name} the server was {'gone' if not p['alive'] else 'unhealthy'}: " \
                               f"{json.dumps(p['health_after'])[:300]}"
    return phases, None


def main() -> int:
    args = parse_args()
    if not (args.export / MANIFEST_NAME).is_file():
        print(f"no export at {args.export}: make the default one with "
              "`prefixport export exports/smollm2-135m-instruct` (README), or name one with --export DIR",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped too
    began = time.perf_counter()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="attacks-", suffix=".log")[1])
    with tempfile.TemporaryDirectory(prefix="attacks-keys-") as folder:
        keys_file = Path(folder) / "keys.toml"
        keys = write_keys(keys_file)
        args_serve = ["serve", str(args.export), "--keys", str(keys_file), *serve_options(args.threads),
                      "--host", "127.0.0.1", "--port", str(port)]
        say(f"starting prefixport {shlex.join(args_serve)} (log: {log_path}) ...")
        with ServerProcess(args_serve, log_path) as server:
            load_s = wait_ready(server, base, keys["admin"], 300)
            setting, found = setup(args, base, keys, server)
            warm_up(setting)
            rss_warm = vm_rss(server.pid)
            phases, aborted = run_all(setting, args.attacks)
            salt = salt_memory(setting, args.salt_requests, args.salt_timeout) \
                if args.salt_requests and not aborted else None
            alive_at_end = server.alive()
    say(f"server stopped (log: {log_path})")
    shown = ["serve", rel(args.export), "--keys", "KEYS", *serve_options(args.threads)]
    result = {"benchmark": "attacks", "quick": args.quick, "export": rel(args.export), **found,
              "seconds": args.seconds, "victim_clients": args.victim_clients, "attacker_clients": args.attacker_clients,
              "max_tokens": args.max_tokens, "max_batch": MAX_BATCH, "threads": args.threads, "seed": args.seed,
              "attacks": {a: ATTACKS[a][0] for a in args.attacks}, "server_command": "prefixport " + shlex.join(shown),
              "server_load_s": load_s, "server_rss_after_warmup_mib": rss_warm and rss_warm / 2**20,
              "server_alive_at_end": alive_at_end, "aborted": aborted,
              **summarize(phases, args.max_tokens), "salt_memory": salt,
              "goal": {"victim_p99_ratio_below": GOAL_RATIO, "victim_failed": 0, "salt_rss_growth_below": RSS_GOAL},
              "definitions": {
                  "ttft": "victim client: request sent to the first SSE chunk with a choice",
                  "itl": f"victim client: gaps between deliveries of chunks with a choice (chunks within "
                         f"{1000 * DELIVERY_S:g} ms of the one before: one delivery)",
                  "ratio": "an attack's p99 over the p99 of the baselines just before and after it, pooled",
                  "cut_at_end": "attacker requests in flight at the phase's end, cancelled (connection closed)",
                  "rss": "the server process's VmRSS (/proc)"},
              "command": command("attacks"), "machine": machine(), "seconds_total": time.perf_counter() - began}
    report = markdown(result)
    wrote = write_report(args.out, "attacks" + ("_short" if args.quick else ""), result, report)
    print(report)
    print(json.dumps(summary_line(result, wrote)))
    return 1 if aborted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server is already stopped (the `with` above)
        print("interrupted; the server is stopped", file=sys.stderr)
        sys.exit(130)
