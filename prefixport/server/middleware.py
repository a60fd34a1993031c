"""Plain ASGI middlewares of the server (Starlette's BaseHTTPMiddleware would hide client
disconnects from the routes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .metrics import RequestMetrics
from .protocol import error_body
from .tenants import Access

DEFAULT_MAX_BODY_BYTES = 4 << 20  # `LimitBody`'s default: the plain server's and the Ray ingress's


class CountRequests:
    """Counts /v1 requests by route, model and status."""

    def __init__(self, app: Any, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(endpoint, model, str(status)).inc()


class LimitBody:
    """Refuses request bodies over `limit` bytes with 413 (by Content-Length, or counting a chunked
    body as it arrives) before the app sees them; the app gets the body read here replayed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body(f"the request body is over {self.limit} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class PenaltyBox:
    """Per caller (`Access.caller`: the key), counts refused requests (4xx but a quota's 429 and a
    client's own disconnect, 499) in `Access.penalties`;
    a caller over its bound waits `delay_s`, then gets a 429 `too_many_refused` with Retry-After,
    before its body is read or parsed (docs/security.md, "Bounded work, bounded state")."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        caller = self.access.caller(headers.get(b"authorization", b"").decode("latin-1"))
        if caller is None:
            return await self.app(scope, receive, send)
        penalties = self.access.penalties
        refused = penalties.over(caller)
        if refused:
            penalties.refused(caller)
            penalties.boxed += 1
            await asyncio.sleep(penalties.delay_s)
            message = (f"too many refused requests from this key: {refused} in the last minute, counting one more "
                       f"per 64 KiB of a body (at most {penalties.max_refused}); fix the requests, then retry")
            body = json.dumps(error_body(message, "requests", code="too_many_refused")).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", b"60")]})
            return await send({"type": "http.response.body", "body": body})

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 499 and message["status"] != 429:
                declared = headers.get(b"content-length", b"0")
                penalties.refused(caller, int(declared) if declared.isdigit() else 0)
            await send(message)

        await self.app(scope, receive, counted)
