"""Scale-out with Ray Serve: replicas that each hold the base model and an LRU of adapters.

Two deployments make the application:

* `AdapterReplica` loads the export once (the base model, its `Engine` and continuous-batching
  `Scheduler`, behind the same `Server` as `prefixport serve`). Adapters are `serve.multiplexed`
  models: a request for adapter NAME registers `ADAPTERS_DIR/NAME.safetensors` in the replica's
  engine if it is not there yet, and the replica keeps at most `max_adapters` of them (least
  recently used unregistered first). The base model is not multiplexed: it is always there.
* `OpenAIIngress` speaks the OpenAI API (`/v1/completions`, `/v1/chat/completions` with SSE
  streaming, `/v1/models`, `/health`), reads `model` from the body and calls a replica with
  `multiplexed_model_id=model`, so Ray routes requests for an adapter to replicas that already
  hold it (and, when none does, to the replica holding the fewest).

The ingress is the front door: it refuses a body over `max_body_bytes` (413, counted as it arrives,
before anything reads it), checks the key, refuses a model outside the key's scope and counts the
request against the key's quotas before any replica is contacted, and asks the replicas which models
exist at most once per `REFRESH_S` (a flood of made-up model names costs them nothing).

Each replica pushes its `/metrics` body every `METRICS_PUSH_S` seconds to a small Ray actor of the
application (`MetricsBoard`, made by the ingress); the ingress's `/metrics` serves them merged,
each sample labelled with its replica.

Run it with `prefixport serve OUTDIR --ray --replicas N` (a local Ray, or the cluster at
RAY_ADDRESS: `run_ray`), with `serve deploy` of a config naming `app_builder`, or in Python with
`build_app(...)` and `serve.run(...)`: docs/ray.md.
"""

import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import ServeInstanceDetails

from ..errors import AdapterError, PrefixportError
from ..runtime import BackendSettings, CacheSettings, Engine
from ..runtime.kv_cache import DEFAULT_BUDGET_MB
from ..runtime.prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from ..runtime.scheduler import DEFAULT_PREFILL_BUDGET
from ..runtime.speculative import parse_method
from .app import ApiError, Job, Server, as_api_error, check_supported, invalid_body
from .metrics import merge as merge_metrics
from .middleware import DEFAULT_MAX_BODY_BYTES, LimitBody
from .tenants import OPEN, Access, Key, KeyRing, Quotas
from .protocol import ChatRequest, CompletionRequest, GenerationRequest, RequestLimits

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
_ADAPTER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # as POST /v1/adapters names: no path separators
REPLICA, INGRESS = "AdapterReplica", "OpenAIIngress"  # deployment names
APP_NAME = "prefixport"  # the default application name (`--app-name`)
METRICS_PUSH_S = 2.0  # how often each replica sends its metrics to the board
METRICS_NAMESPACE = "prefixport"  # the Ray namespace of the boards, one per application
REFRESH_S = 1.0  # the ingress asks a replica which models exist at most this often


class ReplicaError(Exception):
    """An API error (status, OpenAI error body) raised in a replica; picklable, so it crosses Ray."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def _to_api_error(e: BaseException) -> ApiError | ReplicaError:
    """Any error, from this process or from a replica through Ray, as an API error."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, Exception):
        e = e.cause
    if isinstance(e, ReplicaError):
        return e
    return as_api_error(e)  # type: ignore[arg-type]


def _error_response(e: BaseException) -> JSONResponse:
    err = _to_api_error(e)
    return JSONResponse(err.body, status_code=err.status, headers=getattr(err, "headers", None))


def parse(kind: Kind, data: Any, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """A request body checked as `create_app` checks it (pydantic, `limits`; the same 400 error objects)."""
    model = CompletionRequest if kind == "completion" else ChatRequest
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise invalid_body(list(e.errors())) from None
    check_supported(body, limits)
    return body


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest /metrics body of each replica of one application; a replica not heard from for
    three pushes is dropped (it stopped or was replaced)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < 3 * METRICS_PUSH_S}
        return {r: text for r, (_, text) in self.texts.items()}


def board_name(app_name: str) -> str:
    return f"metrics:{app_name}"


def push_metrics(board: str, replica: str, render: Callable[[], bytes], stopped: threading.Event) -> None:
    """A replica's metrics thread: send `render()` (its /metrics body) to the application's board
    every METRICS_PUSH_S seconds until `stopped` (the board found by name each time: the ingress may
    not be up yet, or may have restarted). Any error is logged, once while it repeats, and the
    pushes go on."""
    failing: str | None = None  # the error of the last push
    while True:
        try:
            actor = ray.get_actor(board, namespace=METRICS_NAMESPACE)
            actor.put.remote(replica, render().decode())
            failing = None
        except ValueError:  # no board (yet)
            pass
        except Exception as e:
            if repr(e) != failing:
                log.exception("pushing metrics to %s failed (retrying every %s s)", board, METRICS_PUSH_S)
            failing = repr(e)
        if stopped.wait(METRICS_PUSH_S):
            return


class AdapterHandle:
    """One adapter registered in a replica's engine: what the multiplex LRU holds per adapter id.

    When Ray Serve evicts the id it calls `__del__` (in a worker thread); Python calls it again at
    garbage collection, so the adapter is unregistered once. Requests already running keep the
    adapter's tensors they acquired and finish with them.
    """

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name, self.registered = engine, name, True

    def release(self) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            self.engine.remove_adapter(self.name)
        except AdapterError:  # already gone
            pass

    def __del__(self) -> None:
        self.release()


@serve.deployment(name=REPLICA)
class AdapterReplica:
    """The base model and an LRU of at most `max_adapters` adapters, registered on demand."""

    def __init__(self, outdir: str, adapters_dir: str | None, *, model_name: str | None = None,
                 max_batch: int = 8, prefill_budget: int = DEFAULT_PREFILL_BUDGET, max_adapters: int = 8,
                 adapter_budget_bytes: int | None = None, settings: BackendSettings = BackendSettings(),
                 cache: CacheSettings = CacheSettings(), prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 speculative: str | None = None, limits: RequestLimits = RequestLimits()) -> None:
        backend, options = settings.load_kwargs()
        method, draft = parse_method(speculative)
        self.engine = Engine.load(outdir, backend=backend, adapter_budget_bytes=adapter_budget_bytes, cache=cache,
                                  prompt_cache_bytes=prompt_cache_bytes, draft=draft, **options)
        # The ingress checks keys and sets each request's cache_salt from its key: replicas trust it.
        self.server = Server(self.engine, model_name, adapters_dir, max_batch, Access(shared_prompt_cache=True),
                             prefill_budget=prefill_budget, limits=limits, speculative=method)
        self.max_adapters = max_adapters
        self.loads: dict[str, int] = {}  # adapter id -> times this replica registered it

        # Made here rather than with a decorator on the class so that the LRU size is a parameter;
        # Ray Serve detects multiplexed loaders stored on the instance too.
        async def load_adapter_bundle(adapter_id: str) -> AdapterHandle:
            path = self.bundle_path(adapter_id)
            await asyncio.to_thread(self.engine.add_adapter, adapter_id, path)
            self.loads[adapter_id] = self.loads.get(adapter_id, 0) + 1
            log.info("registered adapter %s from %s", adapter_id, path)
            return AdapterHandle(self.engine, adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter_bundle)
        context = serve.get_replica_context()
        self._stopped = threading.Event()
        threading.Thread(target=push_metrics, name="prefixport-metrics", daemon=True,
                         args=(board_name(context.app_name), context.replica_id.unique_id,
                               self.server.metrics.render, self._stopped)).start()

    # --- adapters -----------------------------------------------------------------------------

    def available(self) -> list[str]:
        """Adapter ids that can be requested: every NAME.safetensors in the adapters folder."""
        folder = self.server.adapters_dir
        if folder is None or not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.safetensors")
                      if _ADAPTER_ID.match(p.stem) and p.stem != self.server.model_name)

    def bundle_path(self, adapter_id: str) -> Path:
        """The bundle file of an adapter id; 404 (as OpenAI's unknown model) when there is none."""
        folder = self.server.adapters_dir
        path = folder / f"{adapter_id}.safetensors" if folder is not None and _ADAPTER_ID.match(adapter_id) else None
        if path is None or not path.is_file():
            raise ApiError(404, f"The model `{adapter_id}` does not exist (serving {self.server.model_name!r} and "
                                f"the adapters in {folder}: {', '.join(self.available()) or 'none'})",
                           param="model", code="model_not_found")
        return path

    # --- requests -----------------------------------------------------------------------------

    async def _submit(self, kind: Kind, request: dict[str, Any], tenant: str) -> Job:
        """Accept a request the ingress checked, for `tenant` (its key's id: a fair share of the
        engine's bounded caches)."""
        body = parse(kind, request, self.server.limits)
        adapter = None if body.model == self.server.model_name else body.model
        if adapter is not None:
            self.bundle_path(adapter)  # an unknown id fails here, before the LRU evicts anything for it
        prompts, max_tokens = await self._prompts(body, adapter)
        if adapter is not None:
            await self.get_adapter(adapter)  # still registered, or again if the LRU let it go meanwhile
        # No `await` from here until the tickets hold the adapter: the LRU cannot unregister it between.
        self.server.adapter_for(body.model)  # parse() already refused unsupported fields
        return self.server.start(body, prompts, adapter, max_tokens, Key(tenant, ""))

    async def _prompts(self, body: GenerationRequest, adapter: str | None) -> tuple[list[Any], int | None]:
        """`Server.prompts` off the event loop, in the adapter's prompt format: so the adapter is
        registered first, and again should the LRU let it go before its format was read (a few tries)."""
        for attempt in range(3):
            if adapter is not None:
                await self.get_adapter(adapter)
            try:
                return await asyncio.to_thread(self.server.prompts, body, adapter)
            except AdapterError:
                if adapter is None or adapter in self.engine.adapters or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def complete(self, kind: Kind, request: dict[str, Any], tenant: str = OPEN.id) -> dict[str, Any]:
        """A completion or chat completion request (an OpenAI body) by `tenant` -> the response object."""
        try:
            job = await self._submit(kind, request, tenant)
            return await self.server.full_response(job, job.body.model)
        except Exception as e:
            err = as_api_error(e)
            raise ReplicaError(err.status, err.body) from None

    async def stream(self, kind: Kind, request: dict[str, Any], tenant: str = OPEN.id) -> AsyncIterator[str]:
        """The same, streamed: server-sent events (`data: {chunk}`, ..., `data: [DONE]`).
        A request that fails before generating raises before the first event."""
        try:
            job = await self._submit(kind, request, tenant)
        except Exception as e:
            err = as_api_error(e)
            raise ReplicaError(err.status, err.body) from None
        include_usage = bool(job.body.stream_options and job.body.stream_options.include_usage)
        async for event in self.server.stream(job, include_usage, job.body.model):
            yield event

    def describe(self) -> dict[str, Any]:
        """The base model's name, the model objects of the base and every available adapter, and what
        this replica holds now (`registered`: adapter ids in its engine, at most `max_adapters`; `loads`:
        how often it registered each)."""
        names = [self.server.model_name, *self.available()]
        scheduler = self.server.scheduler
        return {"model": self.server.model_name, "models": [self.server.model_object(n) for n in names],
                "registered": self.engine.adapters, "max_adapters": self.max_adapters, "loads": dict(self.loads),
                "replica": serve.get_replica_context().replica_id.unique_id, "alive": scheduler.alive,
                "running": scheduler.running, "waiting": scheduler.waiting}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose scheduler thread died is restarted."""
        if not self.server.scheduler.alive:
            raise RuntimeError("the scheduler thread has stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            self._stopped.set()
            server.scheduler.close()
            self.engine.close()


api = FastAPI(title="prefixport (Ray Serve)")


class IngressBodyLimit:
    """`LimitBody` with the limit of the ingress serving the request (a build parameter, while `api`,
    and so its middleware, is made once per process)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = serve.get_replica_context().servable_object
        await LimitBody(self.app, ingress.settings.max_body_bytes)(scope, receive, send)


api.add_middleware(IngressBodyLimit)  # before `serve.ingress(api)`, which takes a copy of the app


@api.exception_handler(ApiError)
@api.exception_handler(ReplicaError)
@api.exception_handler(RayTaskError)
@api.exception_handler(PrefixportError)
@api.exception_handler(Exception)  # a bug: a 500 error object (logged), then Starlette re-raises it
async def error_response(request: Request, e: Exception) -> JSONResponse:
    """Every route's errors as OpenAI error objects: the ingress's own, a replica's through Ray,
    the library's by kind, anything else a 500."""
    return _error_response(e)


async def _sse(first: str, rest: DeploymentResponseGenerator, on_end: Callable[[int], None],
               usage: bool) -> AsyncIterator[str]:
    """The first event (already received, so that an error could still be a status) and the rest;
    `on_end(tokens)` at the end with the tokens the usage chunk counts (the replica always sends
    one: passed on if the client asked for `usage`)."""
    done, tokens = False, 0
    try:
        yield first
        async for event in rest:
            if event.startswith('data: {"id"') and '"usage":{' in event.replace(" ", ""):
                chunk = json.loads(event.removeprefix("data: "))
                if not chunk.get("choices") and chunk.get("usage"):
                    tokens = chunk["usage"]["total_tokens"]
                    if not usage:
                        continue
            yield event
        done = True
    except Exception as e:  # the replica failed mid-stream: say so in the stream, as `Server.stream` does
        done = True
        yield f"data: {json.dumps(_to_api_error(e).body, ensure_ascii=False)}\n\n"
    finally:
        on_end(tokens)
        if not done:  # the client went away: the replica's rows leave its batch
            rest.cancel()


@dataclasses.dataclass(frozen=True)
class IngressSettings:
    """What the ingress enforces: the keys (`api_key`, or `keys_file` on the ingress's node), whether
    the prompt cache is shared across keys, whether /metrics and /health need an admin key
    (`private_ops`; None: when there is a keys file), the largest request body and the bounds on
    one request (`limits`)."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    keys_file: str | None = None
    shared_prompt_cache: bool = False
    private_ops: bool | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    limits: RequestLimits = RequestLimits()  # what one request may ask for (checked here and in the replicas)


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
    """404 for a model that does not exist or is not `key`'s: one text for both, naming only the
    key's models."""
    visible = [m for m in [catalog.model_name, *sorted(catalog.adapters)] if m is not None and key.may_use(m)]
    return ApiError(404, f"The model `{model}` does not exist (the models: {', '.join(visible) or 'none'})",
                    param="model", code="model_not_found")


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class OpenAIIngress:
    """The OpenAI API, routing each request to a replica by its `model` (the adapter id). Keys,
    scopes and quotas are checked here, before any replica is contacted; the replicas trust it."""

    def __init__(self, replica: DeploymentHandle, settings: IngressSettings = IngressSettings()) -> None:
        self.replica, self.settings = replica, settings
        self.access = Access(KeyRing(settings.keys_file, settings.api_key), private_ops=settings.private_ops,
                             shared_prompt_cache=settings.shared_prompt_cache)
        self.quotas = Quotas()
        self.catalog = Catalog(replica)
        # owned by this actor: it goes with the application
        self.board = MetricsBoard.options(name=board_name(serve.get_replica_context().app_name),
                                          namespace=METRICS_NAMESPACE, get_if_exists=True).remote()

    def counters(self) -> dict[str, int]:
        """How often the ingress looked up the model catalog (`catalog_asked`) and how often that
        called a replica (`catalog_refreshes`): for tests and diagnosis, through a deployment handle."""
        return {"catalog_asked": self.catalog.asked, "catalog_refreshes": self.catalog.refreshes}

    def _authorize(self, request: Request) -> Key:
        return self.access.keys.authenticate(request.headers.get("authorization", ""))

    def _operator(self, request: Request) -> None:
        """When operations are private (`Access.ops_private`), /metrics and /health need an admin key."""
        if self.access.ops_private and not self._authorize(request).admin:
            raise ApiError(403, "/metrics and /health need an admin key on this server", "permission_error",
                           code="permission_denied")

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
        self.quotas.admit(key)  # 429 at a limit of this key's, before any replica is contacted
        tokens, streaming = 0, False
        try:
            handle = await self._route(body.model, key)
            data["cache_salt"] = self.access.salt(key, body.cache_salt)
            if not body.stream:
                response = await handle.complete.remote(kind, data, key.id)
                tokens = response["usage"]["total_tokens"]
                return JSONResponse(response)
            usage = bool(body.stream_options and body.stream_options.include_usage)
            data["stream_options"] = {"include_usage": True}  # counted for tokens_per_minute
            events = handle.options(stream=True).stream.remote(kind, data, key.id)
            try:
                first = await events.__anext__()
            except BaseException:
                events.cancel()
                raise
            streaming = True
            return StreamingResponse(_sse(first, events, lambda n: self.quotas.done(key, n), usage),
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
        """Every replica's prefixport metrics (as `prefixport serve` has them), labelled `replica`."""
        self._operator(request)
        texts = await self.board.collect.remote()
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        self._operator(request)
        try:
            info = await self.catalog.latest()  # a replica's answer at most REFRESH_S old
        except Exception as e:
            error = _to_api_error(e).body["error"]["message"]
            return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
        return JSONResponse({"status": "ok", "model": info["model"], "adapters": len(info["models"]) - 1})


def build_app(outdir: str | Path, adapters_dir: str | Path | None = None, *, model_name: str | None = None,
              max_batch: int = 8, prefill_budget: int = DEFAULT_PREFILL_BUDGET, api_key: str | None = None,
              keys_file: str | Path | None = None, shared_prompt_cache: bool = False,
              private_ops: bool | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              limits: RequestLimits = RequestLimits(), replicas: int = 1,
              max_adapters: int = 8, adapter_budget_bytes: int | None = None, replica_cpus: float | None = None,
              replica_gpus: float = 0, settings: BackendSettings = BackendSettings(),
              cache: CacheSettings = CacheSettings(),
              prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, speculative: str | None = None) -> serve.Application:
    """The Serve application: `replicas` x `AdapterReplica` behind one `OpenAIIngress`.

    Paths must exist on every node that runs a replica (shared storage, or the same path on each).
    `adapters_dir` defaults to OUTDIR/adapters. Each replica reserves `replica_cpus` CPUs (default:
    `settings.threads`, or 1) and `replica_gpus` GPUs (at least 1 where the backend runs on a GPU);
    `max_adapters` is the multiplex LRU size per replica; `max_batch` and `prefill_budget` go to
    each replica's `Scheduler`; `settings` chooses the backend (checked when it was made, so a bad
    combination is refused here, not in each replica); `cache` bounds each replica's KV cache and
    `prompt_cache_bytes` its prompt cache; `speculative` (prompt-lookup, draft:EXPORT_DIR) makes
    each replica's scheduler speculate; `limits` bound each request (stop strings, choices,
    schemas: 400), at the ingress and again in the replicas. The ingress refuses bodies over
    `max_body_bytes` (413),
    checks the keys (`api_key`, or `keys_file` on its node: roles, models, quotas, reloaded when it
    changes) before any replica is contacted, sets each request's prompt-cache salt from its key
    unless `shared_prompt_cache`, and needs an admin key on /metrics and /health when `private_ops`
    (None: when there is a `keys_file`); the replicas trust it.
    """
    parse_method(speculative)  # refused here, not in each replica
    if settings.uses_gpu:
        replica_gpus = replica_gpus or 1
    outdir = Path(outdir).resolve()
    adapters = Path(adapters_dir).resolve() if adapters_dir is not None else outdir / "adapters"
    actor: dict[str, Any] = {"num_cpus": replica_cpus if replica_cpus is not None else (settings.threads or 1)}
    if replica_gpus:
        actor["num_gpus"] = replica_gpus
    replica = AdapterReplica.options(
        num_replicas=replicas, ray_actor_options=actor,
        max_ongoing_requests=2 * max_batch,  # a queue in each replica, so its batches fill
    ).bind(str(outdir), str(adapters), model_name=model_name, max_batch=max_batch, prefill_budget=prefill_budget,
           max_adapters=max_adapters, adapter_budget_bytes=adapter_budget_bytes, settings=settings, cache=cache,
           prompt_cache_bytes=prompt_cache_bytes, speculative=speculative, limits=limits)
    keys = str(Path(keys_file).resolve()) if keys_file is not None else None  # resolved here: not the ingress's cwd
    ingress = IngressSettings(api_key=api_key, keys_file=keys, shared_prompt_cache=shared_prompt_cache,
                              private_ops=private_ops, max_body_bytes=max_body_bytes, limits=limits)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind(replica, ingress)


class AppArgs(BaseModel):
    """Arguments of `app_builder` (`serve run prefixport.server.ray_serve:app_builder outdir=... replicas=2`,
    or `args:` in a Serve config file): flat, as on the command line; `threads`, `device`, `backend`,
    `provider` and `precision` make the `BackendSettings`; `max_body_mb` counts 10^6 bytes, as
    `--max-body-mb` does."""

    outdir: str
    adapters_dir: str | None = None
    model_name: str | None = None
    max_batch: int = 8
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    api_key: str | None = None
    keys_file: str | None = None  # on the ingress's node
    shared_prompt_cache: bool = False
    private_ops: bool | None = None  # None: private when there is a keys_file
    max_body_mb: float = 4.0
    max_stops: int = 4  # stop strings per request (`RequestLimits`)
    replicas: int = 1
    max_adapters: int = 8
    threads: int | None = None
    device: Literal["cpu", "cuda"] | None = None
    adapter_budget_bytes: int | None = None
    replica_cpus: float | None = None
    replica_gpus: float = 0
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    provider: Literal["cpu", "cuda", "tensorrt"] | None = None
    precision: Literal["fp32", "fp16"] | None = None
    kv_cache_mb: float | None = DEFAULT_BUDGET_MB
    max_context: int | None = None
    prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_BYTES / 2**20
    speculative: str | None = None


def app_builder(args: AppArgs) -> serve.Application:
    """The application builder for `serve run` / `serve deploy` (`api_key` also from PREFIXPORT_API_KEY)."""
    options = args.model_dump()
    options["api_key"] = options["api_key"] or os.environ.get("PREFIXPORT_API_KEY")
    settings = BackendSettings(kind=options.pop("backend"), provider=options.pop("provider"),
                               device=options.pop("device"), precision=options.pop("precision"),
                               threads=options.pop("threads"))
    cache = CacheSettings(budget_mb=options.pop("kv_cache_mb"), max_context=options.pop("max_context"))
    prompt_cache_bytes = int(options.pop("prompt_cache_mb") * 2**20)
    options["max_body_bytes"] = int(options.pop("max_body_mb") * 1e6)
    options["limits"] = RequestLimits(max_stops=options.pop("max_stops"))
    return build_app(**options, settings=settings, cache=cache, prompt_cache_bytes=prompt_cache_bytes)


def running_serve() -> ServeInstanceDetails | None:
    """What Serve runs on the connected cluster (HTTP options, applications), or None when Serve
    is not started. (Ray has no public call for the HTTP options: this reads what `serve.status()`
    reads.)"""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return ServeInstanceDetails(**client.get_serve_details()) if client is not None else None


def run_ray(outdir: str | Path, *, adapters_dir: str | Path | None = None, host: str = "127.0.0.1",
            port: int = 8000, max_batch: int = 8, prefill_budget: int = DEFAULT_PREFILL_BUDGET, api_key: str | None = None,
            keys_file: str | Path | None = None, shared_prompt_cache: bool = False,
            private_ops: bool | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
            limits: RequestLimits = RequestLimits(), model_name: str | None = None, replicas: int = 1, max_adapters: int = 8,
            adapter_budget_bytes: int | None = None, block: bool = True,
            settings: BackendSettings = BackendSettings(), cache: CacheSettings = CacheSettings(),
            prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, speculative: str | None = None,
            app_name: str = APP_NAME, route_prefix: str = "/", replace: bool = False) -> DeploymentHandle:
    """Serve on Ray: join the cluster at RAY_ADDRESS if set (else start a local Ray), deploy
    `build_app(...)` as application `app_name` at `route_prefix` and (with `block`) serve until
    Ctrl-C or SIGTERM.

    Serve's HTTP proxy is started on host:port unless Serve already runs on the cluster: then its
    host and port stay (Ray sets them once per cluster) and the message says which. An application
    of the same name is refused unless `replace`; a route prefix another application holds is
    refused. On exit, Serve is shut down if this call started it; else only `app_name` is deleted.
    Without `settings.threads`, a local Ray's cores are shared between the replicas.
    """
    if not route_prefix.startswith("/"):
        raise PrefixportError(f"--route-prefix must start with '/', got {route_prefix!r}")
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    if settings.threads is None and not on_cluster:
        settings = dataclasses.replace(settings, threads=max(1, (os.cpu_count() or 1) // max(1, replicas)))
    running = running_serve()
    if running is not None:
        _check_free(running, app_name, route_prefix, replace)
        http = running.http_options
        if (http.host, http.port) != (host, port):
            print(f"Serve already runs on this cluster with its HTTP proxy on {http.host}:{http.port}; that "
                  f"address serves this application too (--host {host} --port {port} are not used: Ray sets "
                  "them once per cluster)", file=sys.stderr, flush=True)
        host, port = str(http.host), int(http.port)
    else:
        serve.start(http_options={"host": host, "port": port})
    app = build_app(outdir, adapters_dir, model_name=model_name, max_batch=max_batch, prefill_budget=prefill_budget,
                    api_key=api_key, keys_file=keys_file, shared_prompt_cache=shared_prompt_cache,
                    private_ops=private_ops, max_body_bytes=max_body_bytes, limits=limits, replicas=replicas,
                    max_adapters=max_adapters, adapter_budget_bytes=adapter_budget_bytes, settings=settings,
                    cache=cache, prompt_cache_bytes=prompt_cache_bytes, speculative=speculative)
    handle = serve.run(app, name=app_name, route_prefix=route_prefix)
    if not block:
        return handle
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    print(f"serving application {app_name!r} on {base}/v1 (metrics: {base}/metrics) with {replicas} Ray Serve "
          "replica(s); Ctrl-C stops it", file=sys.stderr, flush=True)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)  # `kill`, `docker stop`: shut down as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if running is None:
            serve.shutdown()
        else:  # a cluster's Serve: the other applications go on
            serve.delete(app_name)
        ray.shutdown()
    return handle


def _check_free(running: ServeInstanceDetails, app_name: str, route_prefix: str, replace: bool) -> None:
    """Refuse to overwrite an application of the same name (unless `replace`) or to take another's
    route prefix."""
    apps = running.applications
    if app_name in apps and not replace:
        raise PrefixportError(
            f"an application named {app_name!r} already runs on this Ray cluster (route prefix "
            f"{apps[app_name].route_prefix}); choose another --app-name (and --route-prefix), or pass "
            "--replace to redeploy it")
    holders = [name for name, a in apps.items() if a.route_prefix == route_prefix and name != app_name]
    if holders:
        raise PrefixportError(f"route prefix {route_prefix} is taken by application {holders[0]!r} on this Ray "
                              f"cluster; choose another --route-prefix (e.g. /{app_name})")
