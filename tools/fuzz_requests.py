"""Fuzzing of the HTTP server's request bodies: `prefixport serve` in a subprocess on 127.0.0.1 fed
malformed, extreme and hostile requests, every answer classified.

The server runs as deployed for tenants: `--keys` (an admin key, a user key that sends most cases,
a user key scoped to the base model, and a second user key only for the health probes),
`--allow-adapter-admin`, `--speculative prompt-lookup`, `--threads 1`, and an adapters folder
holding the seed bundles (served under their names) plus decoy files (empty, text, zeros, a folder
named like a bundle). Cases are made by tools/fuzz_request_cases.py, whose docstring lists the
families (valid, types, numbers, unicode, nesting, sizes, stop, token_ids, json_syntax,
content_type, schema, sampling, logprobs, chat_messages, adapters, auth, random). Case i of seed S
is made from `random.Random(f"{S}:{i}")` alone, so `--replay S:i` rebuilds and resends it. They are
sent with httpx, `--concurrency` (4) at a time, each within `--timeout` (30) seconds, and classified:

  ok            2xx with the body the OpenAI API returns for the route (a completion, a chat
                completion, an SSE stream of chunks ending in [DONE], tokens, a model, an adapter)
  refused       4xx with an OpenAI error object {"error": {"message": non-empty, ...}} (also an
                error event in a stream that is not a server error, and a redirect: FastAPI's
                answer to a path with a trailing slash)
  server_error  any 5xx, or a stream's error event of type server_error (reproducer kept)
  crash         the connection was refused or broken, or the server process died: it is restarted
                and the run goes on (reproducer kept)
  hang          no full answer within --timeout: if /health does not answer either, the server is
                restarted (reproducer kept)
  bad_shape     a 2xx or 4xx whose body is not what the OpenAI API returns (not JSON, a 4xx without
                an error object, a stream without [DONE], any other status)

A request that fails on a kept-alive connection while the server lives on is sent once more (the
server may have closed that connection after an earlier answer: uvicorn does after a 500) and
counted by its second answer; a crash is a case that fails again. Every --probe-every (500) cases
and at the end, the probe key sends a greedy chat request to the base model and a completion to
an adapter: the server must still answer them, with the same text as at the start; its RSS is read
then too. After the run:

- the failures are grouped by cause: a 500 by the traceback the server logged under its request id
  (the exception and the innermost prefixport frame), anything else by route and message;
- each time the server died, the cases that were in flight are resent alone until one kills it
  again (its exit status and the log's end are kept: a segfault is -11);
- each group's three smallest cases are resent alone (does it fail by itself?), and the smallest
  is kept under OUT/reproducers/: the request, its body, the traceback.

Seeds: `--export DIR [--seeds DIR]` serves that export with the bundles *.safetensors in --seeds
(default: EXPORT/adapters). Otherwise a tiny random Llama with its adapters is built into --work
(default: a temp folder, removed after) by `tools.fuzz_adapters.build_seeds` (about 30 s; the
`export` extra), so the fuzzer runs without the default model.

    python -m tools.fuzz_requests [--cases 10000] [--seed 0] [--concurrency 4] [--timeout 30] \\
        [--family NAME ...] [--export DIR [--seeds DIR] | --work DIR] [--out benchmarks/results/fuzz_requests]
    python -m tools.fuzz_requests --replay SEED:INDEX [--export DIR ...]  # one case, alone

Writes OUT/fuzz_requests.json and OUT/fuzz_requests.md (runs of fewer than 10,000 cases, or of
some families only: fuzz_requests_short.*, so a smoke run never overwrites the figures); prints the
table, then one JSON line. The tests (tests/test_fuzz_requests.py) run a few hundred cases through
`run_fuzz`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import httpx

from benchmarks.common import RESULTS, command, free_port, machine, machine_line, say, vm_rss, write_report
from tools.fuzz_request_cases import DECOY_DIR, DECOYS, FAMILIES, Case, Target, make_case, schedule
from benchmarks.serving import ServerProcess
from prefixport import manifest as mf

OUTCOMES = ("ok", "refused", "server_error", "crash", "hang", "bad_shape")
FAILURES = ("server_error", "crash", "hang", "bad_shape")
FULL_RUN = 10_000
BASE_NAME = "fuzz-base"
KEYS = {"admin": "sk-fuzz-admin", "user": "sk-fuzz-user", "scoped": "sk-fuzz-scoped", "probe": "sk-fuzz-probe"}
ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}
KEEP_FAILURES = 2000  # failures listed one by one in the JSON (the groups count them all)
CONFIRM_PER_GROUP = 3  # examples of each failure group resent alone after the run
MAX_READ = 16 << 20  # bytes of an answer read


# --- the server -----------------------------------------------------------------------------------

def keys_toml() -> str:
    """The keys file: an admin, the fuzzing user, a user scoped to the base model, the prober."""
    roles = {"admin": "admin", "user": "user", "scoped": "user", "probe": "user"}
    out = []
    for name, key in KEYS.items():
        out += ["[[key]]", f'id = "fuzz-{name}"', f'key = "{key}"', f'role = "{roles[name]}"']
        if name == "scoped":
            out.append(f'models = ["{BASE_NAME}"]')
        out.append("")
    return "\n".join(out)


def prepare_adapters(bundles: Sequence[Path], folder: Path, export: Path) -> Target:
    """Copy the bundles and the decoys into `folder`; the `Target` the cases are made for."""
    folder.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        shutil.copy(bundle, folder / bundle.name)
    for name, data in DECOYS.items():
        (folder / name).write_bytes(data)
    (folder / DECOY_DIR).mkdir(exist_ok=True)
    manifest = mf.Manifest.load(export)
    names = sorted(b.name for b in bundles)
    return Target(BASE_NAME, tuple(n.removesuffix(".safetensors") for n in names), tuple(names),
                  manifest.vocab_size, manifest.max_positions)


class FuzzServer:
    """`prefixport serve` under the fuzzer: started on a free port, restarted after a crash or a
    hang, its log (one file per start) read back for tracebacks."""

    def __init__(self, export: Path, adapters: Path, work: Path, threads: int = 1,
                 say: Callable[[str], None] = lambda m: None) -> None:
        self.export, self.adapters, self.work, self.threads, self.say = export, adapters, work, threads, say
        self.keys = work / "keys.toml"
        self.keys.write_text(keys_toml())
        self.proc: ServerProcess | None = None
        self.starts, self.base, self.log_path = 0, "", work / "server-0.log"

    def args(self, port: int) -> list[str]:
        return ["serve", str(self.export), "--keys", str(self.keys), "--adapters", str(self.adapters),
                "--allow-adapter-admin", "--speculative", "prompt-lookup", "--threads", str(self.threads),
                "--max-refused-per-minute", "1000000",  # the penalty box off: every case reaches validation
                "--model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port)]

    def start(self, timeout_s: float = 300) -> float:
        """Start it and wait until /health answers 200 to the admin key (with a keys file /health is
        private); the seconds that took. Exits the run if it dies or never does."""
        port = free_port()
        self.log_path = self.work / f"server-{self.starts}.log"
        self.starts += 1
        saved = os.environ.get("PYTHONFAULTHANDLER")
        os.environ["PYTHONFAULTHANDLER"] = "1"  # a native crash logs every thread's Python stack
        try:
            self.proc = ServerProcess(self.args(port), self.log_path).__enter__()
        finally:
            if saved is None:
                del os.environ["PYTHONFAULTHANDLER"]
            else:
                os.environ["PYTHONFAULTHANDLER"] = saved
        self.base = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if not self.proc.alive():
                raise SystemExit(f"the server exited:\n{self.proc.tail()}")
            try:
                if httpx.get(f"{self.base}/health", headers=ADMIN, timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"the server was not healthy after {timeout_s:.0f} s:\n{self.proc.tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self, why: str) -> None:
        self.say(f"  restarting the server: {why}")
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def exit_status(self) -> int | None:
        """The dead server's exit status (negative: the signal that killed it); None while it runs."""
        return self.proc.proc.returncode if self.proc is not None and self.proc.proc is not None else None

    def death(self) -> dict[str, Any]:
        """How the server died: its exit status and the last lines of its log."""
        tail = self.proc.tail(400) if self.proc else ""
        fatal = tail.rfind("Fatal Python error")  # faulthandler's report of a native crash, if any
        return {"exit_status": self.exit_status(), "log_tail": tail[fatal:][:6000] if fatal >= 0 else tail[-3000:]}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float | None:
        rss = vm_rss(self.pid) if self.alive() else None
        return None if rss is None else rss / 2**20

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return ""


# --- one request ----------------------------------------------------------------------------------

@dataclass
class Answer:
    """What came back for a case: the status and body, or the transport error, or nothing in time."""

    status: int | None = None
    content_type: str = ""
    body: bytes = b""
    seconds: float = 0.0
    error: str | None = None  # connection refused / reset / broken
    timed_out: bool = False
    location: str | None = None  # a redirect's
    request_id: str | None = None  # a 500's X-Request-Id: its traceback in the server's log
    resent: bool = False  # the first try hit a connection the server had dropped (see `fuzz_loop`)


def headers_for(case: Case) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    if case.auth is not None:
        headers["authorization"] = case.auth
    elif case.key != "none":
        headers["authorization"] = f"Bearer {KEYS[case.key]}"
    return headers


async def chunks(body: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


async def exchange(client: httpx.AsyncClient, base: str, case: Case) -> Answer:
    """Send a case and read its whole answer (at most MAX_READ bytes)."""
    content: Any = case.body
    if case.chunked and case.body is not None:
        content = chunks(case.body)
    request = client.build_request(case.method, base + case.path, content=content, headers=headers_for(case))
    response = await client.send(request, stream=True)
    try:
        body = bytearray()
        async for part in response.aiter_raw():
            body += part
            if len(body) > MAX_READ:
                break
        return Answer(response.status_code, response.headers.get("content-type", ""), bytes(body),
                      location=response.headers.get("location"), request_id=response.headers.get("x-request-id"))
    finally:
        await response.aclose()


async def send(client: httpx.AsyncClient, base: str, case: Case, timeout: float) -> Answer:
    """`exchange` timed, within `timeout` seconds; a transport error or the time out as such."""
    start = time.perf_counter()
    try:
        answer = await asyncio.wait_for(exchange(client, base, case), timeout)
    except asyncio.TimeoutError:
        answer = Answer(timed_out=True)
    except httpx.LocalProtocolError:  # the client would not send it: a case this harness cannot make
        raise
    except httpx.TimeoutException as e:
        answer = Answer(timed_out=True, error=f"{type(e).__name__}: {e}")
    except (httpx.TransportError, OSError) as e:
        answer = Answer(error=f"{type(e).__name__}: {e}"[:300])
    answer.seconds = time.perf_counter() - start
    return answer


# --- what an answer is ----------------------------------------------------------------------------

def error_message(data: Any) -> str | None:
    """The message of an OpenAI error object (None: not one, or an empty message)."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        if isinstance(message, str) and message.strip():
            return message
    return None


def choice_problem(choice: Any, text_key: str) -> str | None:
    if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
        return "a choice without an index"
    if text_key == "text" and not isinstance(choice.get("text"), str):
        return "a completion choice without text"
    if text_key in ("message", "delta"):
        inner = choice.get(text_key)
        if not isinstance(inner, dict) or not isinstance(inner.get("content", ""), (str, type(None))):
            return f"a chat choice without a {text_key}"
    return None


def response_problem(case: Case, data: Any) -> str | None:
    """What is wrong with a 2xx JSON body for the case's route (None: it is what OpenAI returns)."""
    if not isinstance(data, dict):
        return "the body is not a JSON object"
    route = case.route
    if route in ("completions", "chat"):
        kind, key = ("text_completion", "text") if route == "completions" else ("chat.completion", "message")
        if data.get("object") != kind or not isinstance(data.get("choices"), list):
            return f"not a {kind} object"
        if not isinstance(data.get("usage"), dict):
            return "no usage"
        return next(filter(None, (choice_problem(c, key) for c in data["choices"])), None)
    if route == "tokenize":
        tokens = data.get("tokens")
        ok = isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) and data.get("count") == len(tokens)
        return None if ok else "no tokens / count"
    if route == "detokenize":
        return None if isinstance(data.get("prompt"), str) else "no prompt"
    if route == "adapter_load":
        return None if data.get("object") == "adapter" and isinstance(data.get("id"), str) else "not an adapter object"
    if route == "adapter_delete":
        return None if data.get("deleted") is True else "not a deletion"
    if route == "model_get":
        return None if data.get("object") == "model" and isinstance(data.get("id"), str) else "not a model object"
    if route == "models":
        return None if data.get("object") == "list" and isinstance(data.get("data"), list) else "not a list"
    return None


def stream_outcome(case: Case, body: bytes) -> tuple[str, str]:
    """A 2xx server-sent-event stream: its chunks must be the route's, ending with [DONE]; an error
    event ends it early (a server_error if of that type, else refused)."""
    kind, key = ("text_completion", "text") if case.route == "completions" else ("chat.completion.chunk", "delta")
    text = body.decode("utf-8", "replace")
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    if not events:
        return "bad_shape", "an empty event stream"
    for event in events:
        if event == "[DONE]":
            return ("ok", "") if event is events[-1] else ("bad_shape", "events after [DONE]")
        try:
            chunk = json.loads(event)
        except ValueError:
            return "bad_shape", f"an event that is not JSON: {event[:80]}"
        message = error_message(chunk)
        if message is not None:
            server = chunk["error"].get("type") == "server_error" or message.startswith("internal error")
            return ("server_error" if server else "refused"), f"in the stream: {message}"
        if not isinstance(chunk, dict) or chunk.get("object") != kind or not isinstance(chunk.get("choices"), list):
            return "bad_shape", f"a chunk that is not a {kind}"
        problem = next(filter(None, (choice_problem(c, key) for c in chunk["choices"])), None)
        if problem:
            return "bad_shape", problem
    return "bad_shape", "the stream ended without [DONE]"


def classify(case: Case, answer: Answer) -> tuple[str, str]:
    """(outcome, message): the message is the error's, or what was wrong."""
    if answer.timed_out:
        return "hang", "no answer in time"
    if answer.error is not None:
        return "crash", answer.error
    status = answer.status or 0
    if answer.content_type.startswith("text/event-stream") and 200 <= status < 300:
        return stream_outcome(case, answer.body)
    try:
        data = json.loads(answer.body)
    except ValueError:
        data = None
    message = error_message(data)
    if status >= 500:
        return "server_error", message or answer.body[:300].decode("utf-8", "replace")
    if 400 <= status < 500:
        return ("refused", message) if message else ("bad_shape", f"a {status} without an error object: "
                                                                   f"{answer.body[:200]!r}")
    if 200 <= status < 300:
        if data is None:
            return "bad_shape", f"a {status} whose body is not JSON: {answer.body[:200]!r}"
        problem = response_problem(case, data)
        return ("bad_shape", problem) if problem else ("ok", "")
    if 300 <= status < 400 and answer.location:  # a path answered with where it is (FastAPI's trailing slash)
        return "refused", f"redirect {status} to {answer.location}"
    return "bad_shape", f"status {status}"


def normalize(message: str, adapters: Path | None = None) -> str:
    """A message with the paths and numbers that vary between cases taken out, cut short."""
    if adapters is not None:
        message = message.replace(str(adapters), "ADAPTERS")
    message = re.sub(r"(cmpl|chatcmpl|req)-[0-9a-f]{32}", "ID", message)
    message = re.sub(r"""(['"`])[^'"`\s]{20,}\1""", r"\1...\1", message)  # long quoted values: names, paths
    message = re.sub(r"\d+", "N", message)
    return re.sub(r"\s+", " ", message)[:160]


def tracebacks(log: str) -> list[str]:
    """The Python tracebacks in a stretch of the server's log (each up to its exception line)."""
    out, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace():
                out.append("\n".join(current))
                current = None
    return out


def logged_tracebacks(logs: Sequence[Path]) -> dict[str, str]:
    """request id -> the traceback logged under it ("internal error (request id ID)" and its traceback)."""
    out = {}
    for path in logs:
        text = path.read_text("utf-8", "replace") if path.is_file() else ""
        for match in re.finditer(r"internal error \(request id (req-[0-9a-f]+)\)\n", text):
            found = tracebacks(text[match.end():match.end() + 200_000])
            if found:
                out[match[1]] = found[0]
    return out


def cause(tb: str) -> str:
    """A traceback's cause, the same for every case it comes from: the exception type and the
    innermost frame in prefixport (file and function, no line numbers)."""
    lines = tb.splitlines()
    exc_type = lines[-1].split(":", 1)[0].strip()
    frames = re.findall(r'File ".*?/(prefixport/[^"]+)", line \d+, in (\S+)', tb)
    return f"{exc_type} in {frames[-1][0]} {frames[-1][1]}" if frames else exc_type


def traceback_summary(tb: str) -> str:
    """A traceback's exception line and its innermost frame in prefixport."""
    lines = tb.splitlines()
    frames = [line.strip() for line in lines if line.strip().startswith("File ") and "/prefixport/" in line]
    where = re.sub(r'^File ".*?/(prefixport/[^"]+)"', r"\1", frames[-1]) if frames else "?"
    return f"{lines[-1].strip()[:200]} (at {where})"


# --- the run --------------------------------------------------------------------------------------

PROBE_CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}


async def probe(client: httpx.AsyncClient, server: FuzzServer, target: Target, after: int) -> dict[str, Any]:
    """The probe key's plain requests (the base model's chat, an adapter's completion): answered?"""
    headers = {"authorization": f"Bearer {KEYS['probe']}"}
    requests = [("/v1/chat/completions", PROBE_CHAT | {"model": target.base}),
                ("/v1/completions", {"model": target.adapters[0] if target.adapters else target.base,
                                     "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})]
    out: dict[str, Any] = {"after_cases": after, "ok": True, "answers": []}
    start = time.perf_counter()
    for path, body in requests:
        try:
            response = await client.post(server.base + path, json=body, headers=headers, timeout=60)
            data = response.json()
            text = data["choices"][0].get("text", data["choices"][0].get("message", {}).get("content"))
            good = response.status_code == 200 and isinstance(text, str)
            out["answers"].append(text if good else f"HTTP {response.status_code}: {response.text[:200]}")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            good = False
            out["answers"].append(f"{type(e).__name__}: {e}"[:200])
        out["ok"] = out["ok"] and good
    out["seconds"] = time.perf_counter() - start
    out["rss_mb"] = server.rss_mb()
    out["server_start"] = server.starts
    return out


@dataclass
class Tally:
    """The counts of a run, filled as answers come; every failure kept (grouped after the run)."""

    seed: int
    adapters: Path
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)  # cases whose first try met a dropped connection
    deaths: list[dict[str, Any]] = field(default_factory=list)  # the server died: how, and the cases in flight

    def __post_init__(self) -> None:
        self.families = {name: {"what": what, "cases": 0, **{o: 0 for o in OUTCOMES}, "slowest_s": 0.0,
                                "slowest": None, "kinds": Counter(), "statuses": Counter(), "messages": Counter()}
                         for name, (_, _, what) in FAMILIES.items()}

    def add(self, case: Case, answer: Answer, outcome: str, message: str) -> None:
        fam, name = self.families[case.family], f"{self.seed}:{case.index}"
        fam["cases"] += 1
        fam[outcome] += 1
        fam["kinds"][(case.kind, outcome)] += 1
        fam["statuses"][str(answer.status or outcome)] += 1
        if answer.seconds > fam["slowest_s"]:
            fam["slowest_s"], fam["slowest"] = answer.seconds, f"{name} {case.kind}: {case.desc}"[:200]
        if outcome == "refused":
            fam["messages"][f"{answer.status} {normalize(message, self.adapters)}"] += 1
        if answer.resent:
            self.resent.append(name)
        if outcome in FAILURES:
            self.failures.append({
                "case": name, "index": case.index, "family": case.family, "kind": case.kind, "desc": case.desc,
                "route": case.route, "method": case.method, "path": case.path[:300], "key": case.key,
                "outcome": outcome, "status": answer.status, "message": message[:500],
                "request_id": answer.request_id, "seconds": round(answer.seconds, 3),
                "body_bytes": len(case.body or b""), "body_head": (case.body or b"")[:300].decode("utf-8", "replace"),
                "answer": answer.body[:500].decode("utf-8", "replace")})

    def totals(self) -> dict[str, int]:
        return {o: sum(f[o] for f in self.families.values()) for o in ("cases", *OUTCOMES)}


async def fuzz_loop(server: FuzzServer, target: Target, tally: Tally, cases: Sequence[int], concurrency: int,
                    timeout: float, probe_every: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Send the cases, `concurrency` at a time, restarting the server where it died or hung; the
    probes (one before, every `probe_every` cases, one after).

    A connection error while the server lives on, with no restart meanwhile, is tried once more: a
    kept-alive connection the server closed after an earlier answer (uvicorn does after a 500)
    fails the next request sent on it, whatever that request; the resent case is counted by its
    own answer and listed in `resent`. It is a crash if it fails again."""
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    lock = asyncio.Lock()
    probes: list[dict[str, Any]] = []
    indices = iter(cases)
    in_flight: set[int] = set()
    began = last_say = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout + 10)) as client:
        probes.append(await probe(client, server, target, 0))

        async def recover(start: int, index: int) -> None:
            why = f"case {tally.seed}:{index}"
            async with lock:
                if server.starts != start:
                    return  # another case restarted it meanwhile
                if not server.alive():
                    tally.deaths.append({"noticed_at": why, "in_flight": sorted(in_flight | {index}),
                                         **server.death()})
                    await asyncio.to_thread(server.restart, f"it died ({why})")
                    return
                try:
                    healthy = (await client.get(server.base + "/health", headers=ADMIN, timeout=10)).status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if not healthy:
                    await asyncio.to_thread(server.restart, f"/health does not answer ({why})")

        taken = 0

        async def worker() -> None:
            nonlocal last_say
            nonlocal taken
            for index in indices:  # one shared iterator: each index is taken once
                taken += 1
                if taken % probe_every == 0:
                    probes.append(await probe(client, server, target, taken))
                case = make_case(tally.seed, index, target)
                start = server.starts
                in_flight.add(index)
                answer = await send(client, server.base, case, timeout)
                if answer.error and not answer.timed_out and server.alive() and server.starts == start:
                    answer = await send(client, server.base, case, timeout)
                    answer.resent = True
                in_flight.discard(index)
                outcome, message = classify(case, answer)
                if outcome in ("crash", "hang"):
                    message += "" if server.alive() else "; the server died"
                    await recover(start, index)
                tally.add(case, answer, outcome, message)
                if time.perf_counter() - last_say > 15:
                    last_say = time.perf_counter()
                    t = tally.totals()
                    say(f"  {t['cases']}/{len(cases)} cases, " + ", ".join(f"{t[o]} {o}" for o in OUTCOMES)
                        + f" ({last_say - began:.0f} s)")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        probes.append(await probe(client, server, target, len(cases)))
    return probes


def group_failures(tally: Tally, logs: dict[str, str]) -> list[dict[str, Any]]:
    """The failures grouped by cause: a 500 by the traceback logged under its request id (the
    exception and the innermost prefixport frame), anything else by outcome, route and message.
    Biggest group first; each failure gets its group's `cause`."""
    groups: dict[str, dict[str, Any]] = {}
    for f in tally.failures:
        tb = logs.get(f["request_id"] or "")
        if tb is not None:
            f["traceback"] = tb
            key = f"{f['outcome']} {f['status']}: {cause(tb)}"
        else:
            key = f"{f['outcome']} {f['status'] or ''} {f['route']}: {normalize(f['message'], tally.adapters)}"
        f["cause"] = key
        g = groups.setdefault(key, {"cause": key, "outcome": f["outcome"], "status": f["status"], "count": 0,
                                    "routes": Counter(), "families": Counter(), "cases": [], "examples": [],
                                    "message": f["message"],
                                    "summary": traceback_summary(tb) if tb else None, "traceback": tb})
        g["count"] += 1
        g["routes"][f["route"]] += 1
        g["families"][f["family"]] += 1
        g["cases"].append(f["case"])
    for g in groups.values():  # the smallest bodies are the clearest reproducers
        members = sorted((f for f in tally.failures if f["cause"] == g["cause"]), key=lambda f: f["body_bytes"])
        g["examples"] = [f["index"] for f in members[:CONFIRM_PER_GROUP]]
        g["cases"] = g["cases"][:20]
        g["routes"], g["families"] = dict(g["routes"]), dict(g["families"])
    return sorted(groups.values(), key=lambda g: -g["count"])


async def confirm(server: FuzzServer, target: Target, groups: list[dict[str, Any]], seed: int, timeout: float,
                  say: Callable[[str], None]) -> None:
    """Resend each group's examples alone, one at a time: the outcome each gets and the traceback it
    logs (at most 3 hangs are waited for)."""
    hangs = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout + 10)) as client:
        for group in groups:
            group["confirmed"] = []
            for index in group["examples"]:
                if group["outcome"] == "hang":
                    hangs += 1
                    if hangs > 3:
                        break
                case = make_case(seed, index, target)
                start, offset = server.starts, server.log_size()
                answer = await send(client, server.base, case, timeout)
                outcome, message = classify(case, answer)
                await asyncio.sleep(0.3)  # the log's last lines
                log = server.log_since(offset) if server.starts == start else ""
                if not server.alive():
                    log = log or (server.proc.tail(80) if server.proc else "")
                    await asyncio.to_thread(server.restart, f"confirming {seed}:{index}")
                elif outcome == "hang":
                    await asyncio.to_thread(server.restart, f"confirming the hang {seed}:{index}")
                found = tracebacks(log)
                group["confirmed"].append({"case": f"{seed}:{index}", "outcome": outcome, "status": answer.status,
                                           "message": message[:300], "summary": traceback_summary(found[0]) if found
                                           else None})
                if found and not group["traceback"]:
                    group["traceback"], group["summary"] = found[0], traceback_summary(found[0])
            say(f"  {group['count']} x {group['cause'][:100]}: alone {[c['outcome'] for c in group['confirmed']]}")


async def find_killers(server: FuzzServer, target: Target, deaths: list[dict[str, Any]], seed: int,
                       timeout: float, say: Callable[[str], None], most: int = 10) -> None:
    """For each of the first `most` deaths of the server, resend the cases that were in flight one at a
    time until one kills it again: that case is the death's `killer` (None: none did alone)."""
    tried: dict[int, dict[str, Any] | None] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout + 10)) as client:
        for death in deaths[:most]:
            death["killer"] = None
            for index in death["in_flight"]:
                if index not in tried:
                    case = make_case(seed, index, target)
                    answer = await send(client, server.base, case, timeout)
                    await asyncio.sleep(0.5)
                    tried[index] = None
                    if not server.alive():
                        outcome, message = classify(case, answer)
                        tried[index] = {"case": f"{seed}:{index}", "family": case.family, "kind": case.kind,
                                        "desc": case.desc, "route": case.route, "outcome": outcome,
                                        "message": message[:300], **server.death()}
                        await asyncio.to_thread(server.restart, f"{seed}:{index} killed it alone")
                if tried[index] is not None:
                    death["killer"] = tried[index]
                    break
            killer = death["killer"]
            say(f"  the server's death ({death['noticed_at']}, exit {death['exit_status']}): "
                + (f"{killer['case']} {killer['family']}/{killer['kind']} kills it alone" if killer else
                   f"none of {death['in_flight']} kills it alone"))


def keep_reproducers(groups: list[dict[str, Any]], target: Target, seed: int, folder: Path) -> None:
    """Per failure group, its smallest example: the request, its body, the answer, the traceback."""
    for group in groups:
        case = make_case(seed, group["examples"][0], target)
        dest = folder / f"{case.index:06d}-{case.family}-{group['outcome']}"
        dest.mkdir(parents=True, exist_ok=True)
        request = {"case": f"{seed}:{case.index}",
                   "replay": f"python -m tools.fuzz_requests --replay {seed}:{case.index}",
                   **{k: v for k, v in asdict(case).items() if k not in ("body", "auth")},
                   "auth": None if case.auth is None else case.auth.decode("latin-1"),
                   "body_bytes": len(case.body or b""), "cause": group["cause"], "group_count": group["count"],
                   "message": group["message"], "confirmed": (group.get("confirmed") or [None])[0]}
        (dest / "request.json").write_text(json.dumps(request, indent=2) + "\n")
        if case.body is not None and len(case.body) <= 1 << 20:
            (dest / "body.bin").write_bytes(case.body)
        if group.get("traceback"):
            (dest / "traceback.txt").write_text(group["traceback"] + "\n")


def plain_families(tally: Tally) -> dict[str, Any]:
    """The families with their counters made plain (kinds: sub-kind -> outcome -> cases)."""
    for f in tally.families.values():
        kinds: dict[str, dict[str, int]] = {}
        for (kind, outcome), count in sorted(f["kinds"].items()):
            kinds.setdefault(kind, {})[outcome] = count
        f["kinds"] = kinds
        f["statuses"] = dict(sorted(f["statuses"].items()))
        f["messages"] = [{"count": n, "message": m} for m, n in f["messages"].most_common(5)]
    return tally.families


def rss_figures(probes: list[dict[str, Any]], starts: int) -> dict[str, Any]:
    """RSS at the probes of the last server start: after the first probe, at the end, the peak."""
    series = [p["rss_mb"] for p in probes if p["server_start"] == starts and p["rss_mb"]]
    return {"rss_start_mb": series[0] if series else None, "rss_end_mb": series[-1] if series else None,
            "rss_peak_mb": max(series) if series else None,
            "rss_growth_mb": series[-1] - series[0] if len(series) > 1 else None,
            "rss_series_mb": [(p["after_cases"], round(p["rss_mb"])) for p in probes if p["rss_mb"]],
            "rss_note": "VmRSS at the probes (every probe_every cases) of the last server start"}


def run_fuzz(export: Path, bundles: Sequence[Path], cases: int, seed: int = 0, concurrency: int = 4,
             timeout: float = 30.0, threads: int = 1, probe_every: int = 500, work: Path | None = None,
             reproducers: Path | None = None, families: Sequence[str] | None = None,
             say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Start the server, send cases 0..`cases`-1 (of `families` only, if given), group and confirm
    the failures; the counts and figures as a dict (see the module docstring)."""
    order = schedule()
    indices = [i for i in range(cases) if families is None or order[i % len(order)] in families]
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="fuzz-requests-")) if work is None else work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    adapters = work / "adapters"
    target = prepare_adapters([Path(b) for b in bundles], adapters, Path(export))
    server = FuzzServer(Path(export), adapters, work, threads, say)
    tally = Tally(seed, adapters)
    try:
        load_s = server.start()
        served = httpx.get(server.base + "/v1/models", headers=ADMIN).json()
        missing = set(target.models) - {m["id"] for m in served["data"]}
        if missing:
            tail = server.proc.tail() if server.proc else ""
            raise SystemExit(f"the server does not serve {sorted(missing)}:\n{tail}")
        say(f"server up in {load_s:.1f} s ({target.base} and {len(target.adapters)} adapters); fuzzing ...")
        began = time.perf_counter()
        probes = asyncio.run(fuzz_loop(server, target, tally, indices, concurrency, timeout, probe_every, say))
        fuzz_s = time.perf_counter() - began
        starts = server.starts
        groups = group_failures(tally, logged_tracebacks(sorted(work.glob("server-*.log"))))
        if tally.deaths:
            say(f"the server died {len(tally.deaths)} time(s): resending the cases in flight alone ...")
            asyncio.run(find_killers(server, target, tally.deaths, seed, timeout, say))
        if groups:
            say(f"resending up to {CONFIRM_PER_GROUP} examples of each of {len(groups)} failure groups alone ...")
            asyncio.run(confirm(server, target, groups, seed, timeout, say))
            if reproducers is not None:
                keep_reproducers(groups, target, seed, reproducers)
    finally:
        server.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    stats = plain_families(tally)
    slowest = max(stats.values(), key=lambda f: f["slowest_s"])
    failures = tally.failures[:KEEP_FAILURES]
    for f in failures:
        f.pop("traceback", None)  # once per group is enough
    return {
        "cases": len(indices), "seed": seed, "families_run": list(families or FAMILIES), "concurrency": concurrency,
        "timeout_s": timeout, "families": stats,
        "totals": tally.totals(), "groups": groups, "failures": failures, "failures_listed": len(failures),
        "resent_after_a_dropped_connection": {"count": len(tally.resent), "cases": tally.resent[:50]},
        "deaths": tally.deaths,
        "slowest_case": {"seconds": slowest["slowest_s"], "case": slowest["slowest"]},
        "probes": probes, "still_answers": probes[-1]["ok"], "probes_ok": sum(p["ok"] for p in probes),
        "probe_answers_unchanged": probes[-1]["answers"] == probes[0]["answers"],
        "server": {"starts": starts, "load_s": load_s, "args": [Path(a).name if Path(a).is_absolute() else a for a in server.args(0)[:-2]], **rss_figures(probes, starts)},
        "target": asdict(target), "seconds_fuzzing": fuzz_s, "cases_per_s": len(indices) / fuzz_s if fuzz_s else None,
    }


# --- the report -----------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    """The report: outcomes by family, the probes and RSS, the failure groups, the machine."""
    t, s = result["totals"], result["server"]
    lines = [
        f"# Fuzzing the request bodies: {t['cases']:,} cases", "",
        f"Mutations of valid requests to `prefixport serve` (a tiny {result['target']['vocab']}-token random Llama, "
        f"{len(result['target']['adapters'])} adapters, `--keys` with admin, user and scoped keys, adapter admin on, "
        f"prompt-lookup speculation, one thread) sent {result['concurrency']} at a time over HTTP, each within "
        f"{result['timeout_s']:g} s. ok: 2xx with the body the OpenAI API returns; refused: 4xx with an OpenAI error "
        "object (or a redirect); server error: 5xx (or a stream's server_error event); crash: the connection broke "
        "or the server died (restarted); hang: no answer in time; bad shape: any other body. A case is named "
        "seed:index: `python -m tools.fuzz_requests --replay seed:index` rebuilds and resends it.", "",
        "| family | what | cases | ok | refused | server error | crash | hang | bad shape | slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in result["families"].items():
        lines.append(f"| {name} | {f['what']} | {f['cases']} | {f['ok']} | {f['refused']} | {f['server_error']} | "
                     f"{f['crash']} | {f['hang']} | {f['bad_shape']} | {1000 * f['slowest_s']:.0f} |")
    lines.append(f"| **all** | | **{t['cases']}** | **{t['ok']}** | **{t['refused']}** | **{t['server_error']}** | "
                 f"**{t['crash']}** | **{t['hang']}** | **{t['bad_shape']}** | "
                 f"{1000 * result['slowest_case']['seconds']:.0f} |")
    growth, resent = s["rss_growth_mb"] or 0.0, result["resent_after_a_dropped_connection"]["count"]
    lines += ["", f"Probes (a second user key's greedy chat to the base model and completion to an adapter: before, "
              f"every {result['probes'][1]['after_cases'] if len(result['probes']) > 2 else '-'} cases, after): "
              f"{result['probes_ok']}/{len(result['probes'])} answered; at the end "
              f"{'**answered**' if result['still_answers'] else '**NOT answered**'}, "
              f"{'the same' if result['probe_answers_unchanged'] else 'another'} text as at the start. "
              f"Server RSS {s['rss_start_mb'] or 0:.0f} MiB after the first probe, "
              f"peak {s['rss_peak_mb'] or 0:.0f} MiB, "
              f"{s['rss_end_mb'] or 0:.0f} MiB at the end ({growth:+.0f} MiB); {s['starts']} server start(s). "
              f"{resent} case(s) met a kept-alive connection the server had dropped and were resent. "
              f"Slowest case: {1000 * result['slowest_case']['seconds']:.0f} ms ({result['slowest_case']['case']}); "
              f"{result['cases_per_s']:.0f} cases/s."]
    if result["deaths"]:
        killers = Counter(f"{d['killer']['family']}/{d['killer']['kind']}" for d in result["deaths"] if d.get("killer"))
        lines += ["", f"**The server died {len(result['deaths'])} times** (exit status "
                  f"{', '.join(sorted({str(d['exit_status']) for d in result['deaths']}))}); resent alone, the cases "
                  f"in flight killed it again for {sum(killers.values())} of the first "
                  f"{min(10, len(result['deaths']))} deaths: " + (", ".join(f"{k} x{n}" for k, n in killers.items())
                                                                 or "none") + "."]
    if result["groups"]:
        lines += ["", f"**{sum(g['count'] for g in result['groups'])} failures, {len(result['groups'])} causes** "
                  "(each cause's smallest examples resent alone; reproducers under `reproducers/`):", ""]
        for g in result["groups"]:
            again = "/".join(c["outcome"] for c in g.get("confirmed") or []) or "-"
            detail = g["summary"] or repr(g["message"][:160])
            lines.append(f"- {g['count']} x {g['outcome']} {g['status'] or ''} on "
                         f"{', '.join(g['routes'])} ({', '.join(f'{k} {v}' for k, v in g['families'].items())}), "
                         f"smallest `{result['seed']}:{g['examples'][0]}`, alone: {again}: {detail[:240]}")
    else:
        lines += ["", "No server error, crash, hang or bad shape."]
    lines += ["", "Most common refusals per family:", ""]
    for name, f in result["families"].items():
        top = "; ".join(f"{m['count']} x {m['message'][:90]}" for m in f["messages"][:3])
        lines.append(f"- {name}: {top or '-'}")
    lines += ["", machine_line(result["machine"], ("httpx", "fastapi", "uvicorn", "prefixport")), "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all, "
              f"{result['seconds_fuzzing']:.0f} s fuzzing)", ""]
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


# --- the command ----------------------------------------------------------------------------------

def replay(spec: str, export: Path, bundles: Sequence[Path], timeout: float, threads: int) -> None:
    """Rebuild case SEED:INDEX, send it alone to a fresh server and print what happened."""
    seed, index = (int(x) for x in spec.split(":"))
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-") as tmp:
        work = Path(tmp)
        target = prepare_adapters(list(bundles), work / "adapters", export)
        case = make_case(seed, index, target)
        print(f"case {spec}: {case.family} / {case.kind}: {case.desc}")
        print(f"{case.method} {case.path} key={case.key} content-type={case.content_type!r} "
              f"{len(case.body or b''):,} bytes{' chunked' if case.chunked else ''}")
        print((case.body or b"")[:2000].decode("utf-8", "backslashreplace"))
        server = FuzzServer(export, work / "adapters", work, threads)
        try:
            server.start()
            offset = server.log_size()

            async def once() -> Answer:
                async with httpx.AsyncClient(timeout=httpx.Timeout(timeout + 10)) as client:
                    return await send(client, server.base, case, timeout)

            answer = asyncio.run(once())
            time.sleep(0.3)
            outcome, message = classify(case, answer)
            print(f"\n-> {outcome}: HTTP {answer.status} in {1000 * answer.seconds:.0f} ms {message[:500]}")
            print(answer.body[:2000].decode("utf-8", "backslashreplace") or answer.error or "")
            print(f"server alive: {server.alive()}")
            for tb in tracebacks(server.log_since(offset))[:1]:
                print(tb)
        finally:
            server.stop()


def seeds_for(args: argparse.Namespace) -> tuple[Path, list[Path], str | None]:
    """(export, bundles, a temp folder to remove): --export/--seeds, or seeds built into --work."""
    tmp = None
    if args.export is not None:
        export, seeds = args.export.resolve(), (args.seeds or args.export / "adapters")
    else:
        from tools.fuzz_adapters import build_seeds

        work = args.work or Path(tmp := tempfile.mkdtemp(prefix="fuzz-seeds-"))
        export, seeds = build_seeds(work, say=say)
    bundles = sorted(Path(seeds).glob("*.safetensors"))
    if not bundles:
        raise SystemExit(f"no adapter bundles (*.safetensors) in {seeds}")
    return export, bundles, tmp


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz_requests", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=FULL_RUN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request before it counts as a hang")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads")
    parser.add_argument("--probe-every", type=int, default=500, help="cases between two probes of the server")
    parser.add_argument("--export", type=Path, help="an export folder to serve (default: a tiny Llama built here)")
    parser.add_argument("--seeds", type=Path, help="its bundles *.safetensors (default: EXPORT/adapters)")
    parser.add_argument("--work", type=Path, help="build the seeds here and keep them (reused when present)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_requests")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="only this family's cases among the first --cases (repeatable)")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="rebuild one case and send it alone to a fresh server")
    args = parser.parse_args()
    began = time.perf_counter()
    export, bundles, tmp = seeds_for(args)
    try:
        if args.replay:
            replay(args.replay, export, bundles, args.timeout, args.threads)
            return
        stem = "fuzz_requests" + ("" if args.cases >= FULL_RUN and not args.family else "_short")
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        repro = out / ("reproducers" if stem == "fuzz_requests" else "reproducers_short")
        shutil.rmtree(repro, ignore_errors=True)
        say(f"fuzzing: {args.cases} cases, seed {args.seed}, {len(schedule())}-slot schedule, export {export} ...")
        result = run_fuzz(export, bundles, args.cases, args.seed, args.concurrency, args.timeout, args.threads,
                          args.probe_every, reproducers=repro, families=args.family, say=say)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info = machine("httpx", "fastapi", "uvicorn")
    result = {"benchmark": "fuzz_requests", "command": command("fuzz_requests", "tools"), **result, "machine": info,
              "seconds": time.perf_counter() - began}
    table = markdown(result)
    wrote = write_report(out, stem, result, table)
    print(table)
    t = result["totals"]
    print(json.dumps({"benchmark": "fuzz_requests", "cases": t["cases"], "seed": args.seed,
                      "seconds": round(result["seconds"], 1), **{o: t[o] for o in OUTCOMES},
                      "failure_groups": len(result["groups"]), "still_answers": result["still_answers"],
                      "rss_growth_mb": None if result["server"]["rss_growth_mb"] is None
                      else round(result["server"]["rss_growth_mb"], 1),
                      "server_starts": result["server"]["starts"],
                      "slowest_case_ms": round(1000 * result["slowest_case"]["seconds"]),
                      "wrote": [str(p) for p in wrote]}))


if __name__ == "__main__":
    main()
