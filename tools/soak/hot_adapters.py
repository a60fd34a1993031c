"""Hot adapters: registered (POST /v1/adapters) and deleted (DELETE /v1/adapters/NAME) all along
the server soak, deleted while requests still run on them."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from typing import Any

import httpx

from tools.soak import BUNDLES


class HotAdapters:
    """The hot adapters' state, shared by `churn` and the clients: which is open to new requests per
    kind, requests sent but not yet accepted, and requests running on each (by spec index)."""

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
        """The adapter of `kind` open now (a request is on its way to it), or None."""
        name = self.open[kind]
        if name is not None:
            self.pending[name] += 1
        return name

    def accepted(self, name: str, index: int) -> None:
        """Request `index` got its response headers: it runs on `name`."""
        self.pending[name] -= 1
        self.running.setdefault(name, set()).add(index)

    def refused(self, name: str) -> None:
        """A request taken for `name` will never run on it."""
        self.pending[name] -= 1

    def finished(self, name: str, index: int) -> None:
        """Request `index` on `name` is over."""
        self.running.get(name, set()).discard(index)


async def churn(client: httpx.AsyncClient, base: str, hot: HotAdapters, kind: str, stop: asyncio.Event,
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

