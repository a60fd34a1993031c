"""The Ray Serve ingress: the OpenAI API (`/v1/completions`, `/v1/chat/completions` with SSE
streaming, `/v1/models`, `/health`, `/metrics`), routing each request to a replica by its `model`
(`multiplexed_model_id`: Ray routes requests for an adapter to replicas that already hold it and,
when none does, to the replica holding the fewest).

The ingress is the front door: it refuses a body over `max_body_bytes` (413, counted as it arrives,
before anything reads it), checks the key, parses and checks the request, refuses a model outside
the key's scope and counts the request against the key's quotas before any replica is contacted,
and passes the parsed request on. It asks the replicas which models exist at most once per
`REFRESH_S` (a flood of made-up model names costs them nothing). Its `/metrics` serves every
replica's (ray_metrics.py).
"""

import asyncio
import logging
import math
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from .metrics import RequestMetrics, merge as merge_metrics
from .middleware import CountRequests, LimitBody
from .protocol import ApiError, StreamOptions, new_id
from .ray_metrics import METRICS_NAMESPACE, MetricsBoard, board_name
from .responses import Kind, as_api_error, error_response, is_usage, model_not_found, parse, render_sse
from .settings import ServerSettings
from .tenants import Key, Quotas

INGRESS = "OpenAIIngress"  # the deployment's name
REFRESH_S = 1.0  # the ingress asks a replica which models exist at most this often
REPLICA_RETRIES = 2  # a request whose replica died before it answered is sent again, at most this often
RETRY_DELAY_S = 0.5  # first: Serve's router learns that the replica is gone

log = logging.getLogger(__name__)


api = FastAPI(title="prefixport (Ray Serve)")


class IngressMiddleware:
    """`CountRequests` and `LimitBody`, as the plain server runs them, with the metrics and the body
    limit of the ingress serving the request (made per application, while `api`, and so its
    middleware, is made once per process)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = serve.get_replica_context().servable_object
        limited = LimitBody(self.app, ingress.settings.max_body_bytes)
        await CountRequests(limited, ingress.metrics)(scope, receive, send)


api.add_middleware(IngressMiddleware)  # before `serve.ingress(api)`, which takes a copy of the app


@api.exception_handler(Exception)  # a bug: a 500 error object (logged), then Starlette re-raises it
async def error(request: Request, e: Exception) -> JSONResponse:
    """Every route's errors as OpenAI error objects: the ingress's own, a replica's through Ray
    (an `ApiError` whole, headers included), the library's by kind, anything else a 500."""
    return error_response(unwrap(e))


def unwrap(e: BaseException) -> BaseException:
    """A replica's error as it raised it (Ray wraps it in a RayTaskError); a replica that stopped
    as a 503 naming a request id, the detail (actor and node ids, addresses) in the log only."""
    if isinstance(e, RayActorError):
        request_id = new_id("req")
        log.error("a replica stopped while serving request %s", request_id, exc_info=e)
        return ApiError(503, f"the replica serving this request stopped (request id {request_id}); send it again",
                        "server_error", code="replica_unavailable", headers={"X-Request-Id": request_id})
    return e.cause if isinstance(e, RayTaskError) and isinstance(e.cause, Exception) else e


async def _relay(first: dict[str, Any], rest: DeploymentResponseGenerator, on_end: Callable[[int], None],
                 include_usage: bool) -> AsyncIterator[str]:
    """A replica's stream of event objects (the first already received, so that an error could
    still be a status) as server-sent events; `on_end(tokens)` at the end with the tokens its usage
    chunk counts (the replica always sends one: passed on if the client asked for it). A replica
    failing mid-stream ends the stream with an error object, as `Server.events` does."""
    tokens, done = 0, False

    async def events() -> AsyncIterator[dict[str, Any]]:
        nonlocal tokens
        try:
            for event in [first]:
                yield event
            async for event in rest:
                if is_usage(event):
                    tokens = event["usage"]["total_tokens"]
                yield event
        except Exception as e:
            yield as_api_error(unwrap(e)).body

    try:
        async for text in render_sse(events(), include_usage):
            yield text
        done = True
    finally:
        on_end(tokens)
        if not done:  # the client went away: the replica's rows leave its batch
            rest.cancel()


class Catalog:
    """The models the replicas serve, as a replica's `describe()` says: asked at most once per
    REFRESH_S, concurrent callers sharing one call (so no stream of requests, for made-up model names
    or /health, makes the ingress call a replica per request). Runs on the ingress's event loop."""

    def __init__(self, replica: DeploymentHandle) -> None:
        self.replica = replica
        self.info: dict[str, Any] | None = None  # the latest answer
        self.asked = 0  # calls of `latest()`
        self.refreshes = 0  # `describe()` calls made for them
        self._at = -math.inf  # when the latest call was made
        self._error: Exception | None = None  # the latest call's error, if it failed
        self._pending: asyncio.Future[dict[str, Any]] | None = None

    @property
    def model_name(self) -> str | None:
        return self.info["model"] if self.info is not None else None

    @property
    def adapters(self) -> set[str]:
        """Adapter ids in the adapters folder (as of the latest answer)."""
        if self.info is None:
            return set()
        return {m["id"] for m in self.info["models"]} - {self.info["model"]}

    def knows(self, model: str) -> bool:
        return model == self.model_name or model in self.adapters

    async def latest(self) -> dict[str, Any]:
        """A replica's `describe()`: asked now unless it was asked less than REFRESH_S ago (then that
        call's answer or error, once it has one)."""
        self.asked += 1
        due = time.monotonic() - self._at >= REFRESH_S or (self.info is None and self._error is None)
        if self._pending is None and due:
            self._at = time.monotonic()
            self.refreshes += 1
            self._pending = asyncio.ensure_future(self._describe())
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved if none waits
        if self._pending is not None:
            return await asyncio.shield(self._pending)  # a caller going away does not cancel the others' call
        if self._error is not None or self.info is None:
            raise (self._error or RuntimeError("no answer from a replica yet")).with_traceback(None)
        return self.info

    async def _describe(self) -> dict[str, Any]:
        try:
            self.info, self._error = await self.replica.describe.remote(), None
            return self.info
        except Exception as e:
            self._error = e
            raise
        finally:
            self._pending = None


def _not_found(model: str, key: Key, catalog: Catalog) -> ApiError:
    """404 for a model that does not exist or is not `key`'s, naming only the key's models."""
    return model_not_found(model, [m for m in [catalog.model_name, *sorted(catalog.adapters)]
                                   if m is not None and key.may_use(m)])


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class OpenAIIngress:
    """The OpenAI API, routing each request to a replica by its `model` (the adapter id). Keys,
    scopes and quotas are checked here, before any replica is contacted; the replicas trust it."""

    def __init__(self, replica: DeploymentHandle, settings: ServerSettings = ServerSettings()) -> None:
        self.replica, self.settings = replica, settings
        self.access = settings.access.build()
        self.quotas = Quotas()
        self.metrics = RequestMetrics()  # the requests as they arrive here; the rest is the replicas'
        self.retries = 0  # requests sent again after their replica died before answering
        self.catalog = Catalog(replica)
        # owned by this actor: it goes with the application
        self.board = MetricsBoard.options(name=board_name(serve.get_replica_context().app_name),
                                          namespace=METRICS_NAMESPACE, get_if_exists=True).remote()

    def counters(self) -> dict[str, int]:
        """How often the ingress looked up the model catalog (`catalog_asked`) and how often that
        called a replica (`catalog_refreshes`): for tests and diagnosis, through a deployment handle."""
        return {"catalog_asked": self.catalog.asked, "catalog_refreshes": self.catalog.refreshes,
                "retries": self.retries}

    def _authorize(self, request: Request) -> Key:
        return self.access.authorize(request.headers.get("authorization", ""))

    def _operator(self, request: Request) -> None:
        self.access.check_operator(request.headers.get("authorization", ""))

    async def _route(self, model: str, key: Key) -> DeploymentHandle:
        """The handle for a request for `model` (one `key` may use): the base model is on every
        replica; an adapter id routes by multiplexing. An id not in the adapters folder is a 404 here,
        before any replica sees the request (the folder is looked at again at most once per REFRESH_S)."""
        if not self.catalog.knows(model):
            await self.catalog.latest()  # the folder may have gained a bundle since
        if model == self.catalog.model_name:
            return self.replica
        if model not in self.catalog.adapters:
            raise _not_found(model, key, self.catalog)
        return self.replica.options(multiplexed_model_id=model)

    async def _generate(self, kind: Kind, request: Request) -> Response:
        key = self._authorize(request)
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        body = parse(kind, data, self.settings.limits)
        if not key.may_use(body.model):  # as a model that does not exist; no replica is asked
            raise _not_found(body.model, key, self.catalog)
        request.state.model = body.model  # the requests counter's label (CountRequests)
        self.quotas.admit(key)  # 429 at a limit of this key's, before any replica is contacted
        tokens, streaming = 0, False
        try:
            handle = await self._route(body.model, key)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            body = body.model_copy(update={"cache_salt": self.access.salt(key, body.cache_salt),
                                           "stream_options": StreamOptions(include_usage=True)})  # for quotas
            for attempt in range(1 + REPLICA_RETRIES):  # a replica that died before answering: another one
                try:
                    if not body.stream:
                        response = await handle.complete.remote(body, key.id)
                        tokens = response["usage"]["total_tokens"]
                        return JSONResponse(response)
                    events = handle.options(stream=True).stream.remote(body, key.id)
                    try:
                        first = await events.__anext__()
                    except BaseException:
                        events.cancel()
                        raise
                    break
                except RayActorError as e:  # nothing has reached the client: the same request again
                    if attempt == REPLICA_RETRIES:
                        raise
                    self.retries += 1
                    log.warning("a replica stopped before answering a %s request (%s); retrying on another",
                                body.model, type(e).__name__)
                    await asyncio.sleep(RETRY_DELAY_S)
            streaming = True
            return StreamingResponse(_relay(first, events, lambda n: self.quotas.done(key, n), include_usage),
                                     media_type="text/event-stream")
        finally:
            if not streaming:
                self.quotas.done(key, tokens)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate("completion", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate("chat", request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        key = self._authorize(request)
        info = await self.catalog.latest()
        return JSONResponse({"object": "list", "data": [m for m in info["models"] if key.may_use(m["id"])]})

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> Response:
        key = self._authorize(request)
        if key.may_use(model):  # else as a model that does not exist, and no replica is asked
            for obj in (await self.catalog.latest())["models"]:
                if obj["id"] == model:
                    return JSONResponse(obj)
        raise _not_found(model, key, self.catalog)

    @api.api_route("/v1/adapters", methods=["POST"])
    @api.api_route("/v1/adapters/{name}", methods=["DELETE"])
    async def adapters(self) -> Response:
        raise ApiError(501, "under Ray Serve, adapters are registered on demand: put NAME.safetensors in the "
                            "adapters folder and request model NAME", code="unsupported")

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every metric `prefixport serve` has: the replicas' (labelled `replica` with each one's id)
        and the requests counted here as they arrived (labelled `replica="OpenAIIngress"`)."""
        self._operator(request)
        texts = {**await self.board.collect.remote(), INGRESS: self.metrics.render().decode()}
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        self._operator(request)
        try:
            info = await self.catalog.latest()  # a replica's answer at most REFRESH_S old
        except Exception as e:
            error = as_api_error(unwrap(e)).body["error"]["message"]
            return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
        return JSONResponse({"status": "ok", "model": info["model"], "adapters": len(info["models"]) - 1})
