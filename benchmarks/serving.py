"""`prefixport serve` under test, for serve_load, serve_vs_batch, attacks, lora_vs_llama and the soak
(tools/soak): the server in a subprocess, the seeded chat workload, streamed clients that send it
(over `prefixport bench serve`'s client, prefixport.bench.serve_client), and /metrics read back.
Needs httpx (the `serve` extra)."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx

from prefixport.bench.serve_client import api_url, new_client, request_body, stream_request

# Open-ended instructions (every request of serve_load generates max_tokens anyway: ignore_eos).
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


# --- the server ----------------------------------------------------------------------------------

def _die_with_parent() -> None:  # Linux: the server gets SIGTERM if this process dies (even SIGKILL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerProcess:
    """`prefixport serve` in a subprocess, its output in `log_path`; a context manager that always
    stops it."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefixport.cli", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown), SIGKILL 20 s later."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, base: str, timeout_s: float) -> float:
        """Seconds until GET /health answered 200; exits the run if the server dies or never does."""
        assert self.proc is not None, "the server is not started"
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


_SAMPLE = re.compile(r'^(prefixport_[a-z_]+)(\{.*\})? ([0-9.eE+-]+)$')  # labels may hold braces: {name}


def scrape_metrics(text: str) -> dict[str, float]:
    """prefixport's samples in a /metrics body: `name{labels}` -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m[1] + (m[2] or "")] = float(m[3])
    return out


# --- the chat workload and its clients -------------------------------------------------------------

@dataclass
class Request:
    index: int
    model: str
    length: str  # a key of LENGTHS
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


def prompt_text(rng: random.Random, sentences: int | Sequence[int]) -> str:
    """An instruction about a topic after `sentences` sentences of context (a count, or counts to
    draw one from), drawn with `rng`."""
    task = rng.choice(TASKS).format(topic=rng.choice(TOPICS))
    count = sentences if isinstance(sentences, int) else rng.choice(sentences)
    context = " ".join(rng.sample(CONTEXT, count))
    return f"{context}\n\n{task}" if context else task


def workload(models: list[str], n: int, seed: int) -> list[Request]:
    """n requests, the models in turn, prompt lengths and texts drawn with `seed`."""
    rng = random.Random(seed)
    lengths = list(LENGTHS)
    out = []
    for i in range(n):
        length = lengths[(i // len(models)) % len(lengths)] if n >= len(models) * len(lengths) else rng.choice(lengths)
        out.append(Request(i, models[i % len(models)], length, prompt_text(rng, LENGTHS[length])))
    return out


async def one_request(client: httpx.AsyncClient, base: str, req: Request, max_tokens: int) -> Outcome:
    """One streamed, greedy chat request with `ignore_eos`, timed from sending to the last byte: the
    client of `prefixport bench serve` (prefixport.bench.serve_client), its result as an Outcome.
    `client` may be anything with httpx.AsyncClient's `stream` (attacks.py's ChunkClock)."""
    body = request_body("chat", req.model, req.prompt, max_tokens, ignore_eos=True)
    r = await stream_request(client, api_url(base, "chat"), body)
    usage = r.usage or {}
    return Outcome(latency_s=r.latency_s, ttft_s=r.ttft_s, completion_tokens=usage.get("completion_tokens", 0),
                   prompt_tokens=usage.get("prompt_tokens", 0), text=r.text, finish_reason=r.finish_reason,
                   error=r.error)


async def http_run(base: str, requests: list[Request], clients: int, max_tokens: int) -> tuple[float, list[Outcome]]:
    """`clients` workers pull requests from the shared list; the wall time and the outcomes by index."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = iter(requests)
    async with new_client(clients + 4, timeout_s=300) as client:
        async def worker() -> None:
            for req in queue:  # one shared iterator: each request is taken once
                outcomes[req.index] = await one_request(client, base, req, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return wall, outcomes  # type: ignore[return-value]

