"""The serving benchmark's client: one streamed (SSE) request to an OpenAI-compatible endpoint,
timed chunk by chunk, and the two ways of sending a workload: a fixed concurrency (closed loop)
and Poisson arrivals at a rate (open loop). Needs httpx (the `serve` extra), imported lazily."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from ..errors import PrefixportError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
T = TypeVar("T")
R = TypeVar("R")


def require_httpx() -> Any:
    """The httpx module, or a PrefixportError saying how to install it."""
    try:
        import httpx
    except ImportError:
        raise PrefixportError("the serving benchmark needs httpx: pip install prefixport[serve]") from None
    return httpx


def api_url(base_url: str, endpoint: str) -> str:
    """The URL of `endpoint` ("completions" or "chat") under a server's base URL, given with or
    without its trailing /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + ENDPOINTS[endpoint]


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    """A streamed, greedy request body asking for the usage at the end: the prompt text
    (completions) or one user message holding it (chat); `ignore_eos` as vLLM names it."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


@dataclass
class StreamResult:
    """One streamed request as the client saw it. Times in seconds from sending it; a chunk counts
    where it carries output text (a completion's `text`, a chat delta's `content`): the first one
    is the time to first token, the gaps between them the inter-token latencies."""

    start: float = 0.0  # time.perf_counter() when it was sent
    latency_s: float = 0.0  # to the end of the stream (or the error)
    chunk_times_s: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None  # the server's, where it sent one
    status: int | None = None
    error: str | None = None
    chunks: int = 0  # events carrying choices, output text or not (a chat stream's role-only first one too)
    done: bool = False  # the stream's [DONE] was read
    left: bool = False  # the client left mid-stream (`leave_after`)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def gaps_s(self) -> list[float]:
        """Every gap between consecutive output chunks."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]


def _chunk_text(choice: dict[str, Any]) -> str:
    """A chunk's output text: a completion's `text`, a chat delta's `content` (or a reasoning
    model's `reasoning_content`, as vLLM's benchmark counts it)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


async def stream_request(client: Any, url: str, body: dict[str, Any], headers: dict[str, str] | None = None, *,
                         on_status: Callable[[int], None] | None = None,
                         leave_after: int | None = None) -> StreamResult:
    """POST `body` to `url` with `client` (an httpx.AsyncClient, or anything with its `stream`)
    and read the server-sent events to [DONE] (or the stream's end after a finish reason): the
    text, each output chunk's arrival, the finish reason, the usage. A status other than 200, an
    error event, a stream cut short or a transport error is `error` (its text cut to 500
    characters); never raises for those. `on_status(status)` is called as the response's headers
    arrive, before its body is read (the server has taken the request). With `leave_after` N the
    client leaves after N chunks carrying choices, closing the connection mid-stream (`left`; not
    an error), as a reader who goes away does."""
    httpx = require_httpx()
    out, parts = StreamResult(), []
    out.start = start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            out.status = response.status_code
            if on_status is not None:
                on_status(response.status_code)
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                out.error = f"HTTP {response.status_code}: {text[:500]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        out.done = True
                        break
                    if not data:
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                        break
                    now, carried = time.perf_counter() - start, False
                    choices = chunk.get("choices") or []
                    for choice in choices:
                        piece = _chunk_text(choice)
                        parts.append(piece)
                        carried = carried or bool(piece)
                        out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    if carried:
                        out.chunk_times_s.append(now)
                    if chunk.get("usage"):
                        out.usage = chunk["usage"]
                    out.chunks += bool(choices)
                    if leave_after is not None and out.chunks >= leave_after:
                        out.left = True
                        break  # leaving the block closes the connection mid-stream
                else:  # servers that close the stream after the finish reason, without [DONE], are fine
                    if out.finish_reason is None:
                        out.error = out.error or "the stream ended without a finish reason or [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
        out.error = f"{type(e).__name__}: {str(e)[:500] or 'no message'}"
    out.latency_s = time.perf_counter() - start
    out.text = "".join(parts)
    return out


def new_client(connections: int, timeout_s: float) -> Any:
    """An httpx.AsyncClient for `connections` requests at once, each read allowed `timeout_s`."""
    httpx = require_httpx()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)))


async def closed_loop(send: Callable[[T], Awaitable[R]], items: Sequence[T], concurrency: int) -> list[R]:
    """`concurrency` workers, each sending its next item as soon as its last one is answered, until
    the items are used up; the results in the items' order."""
    results: list[R | None] = [None] * len(items)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for index, item in queue:  # one shared iterator: each item is taken once
            results[index] = await send(item)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(items))))))
    return results  # type: ignore[return-value]


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each of n requests is sent, in seconds from the first: exponential gaps of mean 1/rate
    drawn with `seed` (a Poisson process), the first at 0; all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"{seed}:arrivals:{rate}")
    offsets, t = [], 0.0
    for i in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def open_loop(send: Callable[[T], Awaitable[R]], items: Sequence[T], rate: float, seed: int,
                    max_concurrency: int | None = None) -> list[R]:
    """Each item sent at its Poisson arrival time (`poisson_offsets`), whether or not earlier ones
    are answered; with `max_concurrency` an arrival beyond that many in flight waits for a free
    slot (its latencies count from when it is sent). The results in the items' order."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    offsets = poisson_offsets(len(items), rate, seed)
    start = time.perf_counter()

    async def one(item: T) -> R:
        if gate is None:
            return await send(item)
        async with gate:
            return await send(item)

    tasks = []
    for item, offset in zip(items, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(item)))
    return list(await asyncio.gather(*tasks))
