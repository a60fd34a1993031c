"""The Ray Serve replica: the export loaded once (its `Engine` and continuous-batching `Scheduler`,
behind the same `Server` as `prefixport serve`) and an LRU of adapters. Adapters are
`serve.multiplexed` models: a request for adapter NAME registers `ADAPTERS_DIR/NAME.safetensors`
in the replica's engine if it is not there yet, and the replica keeps at most `max_adapters` of
them (least recently used unregistered first). The base model is not multiplexed: it is always
there. The replica trusts its ingress (keys, scopes, quotas, the request's checks): docs/ray.md.
"""

import asyncio
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from ..errors import AdapterError
from ..runtime import Engine
from .app import Job, Server
from .protocol import GenerationRequest
from .ray_metrics import board_name, push_metrics
from .responses import as_api_error, model_not_found
from .settings import ServeSettings
from .tenants import OPEN, Access, Key

log = logging.getLogger(__name__)

REPLICA = "AdapterReplica"  # the deployment's name
ADAPTER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # as POST /v1/adapters names: no path separators


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

    def __init__(self, outdir: str, settings: ServeSettings) -> None:
        self.engine = Engine.load(outdir, settings=settings.engine)
        # The ingress checks keys and sets each request's cache_salt from its key: replicas trust it.
        self.server = Server(self.engine, settings.server, Access(shared_prompt_cache=True))
        self.max_adapters = max_adapters = settings.ray.max_adapters
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
                      if ADAPTER_ID.match(p.stem) and p.stem != self.server.model_name)

    def bundle_path(self, adapter_id: str) -> Path:
        """The bundle file of an adapter id; 404 (as OpenAI's unknown model) when there is none."""
        folder = self.server.adapters_dir
        path = folder / f"{adapter_id}.safetensors" if folder is not None and ADAPTER_ID.match(adapter_id) else None
        if path is None or not path.is_file():
            raise model_not_found(adapter_id, [self.server.model_name, *self.available()])
        return path

    # --- requests -----------------------------------------------------------------------------

    async def _submit(self, body: GenerationRequest, tenant: str) -> Job:
        """Accept a request the ingress parsed and checked, for `tenant` (its key's id: a fair share
        of the engine's bounded caches)."""
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

    async def complete(self, body: GenerationRequest, tenant: str = OPEN.id) -> dict[str, Any]:
        """A completion or chat completion request (parsed and checked by the ingress) by `tenant` ->
        the response object. Errors are `ApiError`s, which cross Ray whole (headers too)."""
        try:
            job = await self._submit(body, tenant)
            return await self.server.full_response(job, body.model)
        except Exception as e:
            raise as_api_error(e) from None

    async def stream(self, body: GenerationRequest, tenant: str = OPEN.id) -> AsyncIterator[dict[str, Any]]:
        """The same, streamed: the event objects (`Server.events`: chunks, always the usage chunk,
        or an error object last). A request that fails before generating raises before the first."""
        try:
            job = await self._submit(body, tenant)
        except Exception as e:
            raise as_api_error(e) from None
        async for event in self.server.events(job, body.model):
            yield event

    def describe(self) -> dict[str, Any]:
        """The base model's name, the model objects of the base and every available adapter, and what
        this replica holds now (`registered`: adapter ids in its engine, at most `max_adapters`; `loads`:
        how often it registered each)."""
        names = [self.server.model_name, *self.available()]
        scheduler = self.server.scheduler
        return {"model": self.server.model_name, "models": [self.server.model_object(n) for n in names],
                "registered": self.engine.adapters, "max_adapters": self.max_adapters, "loads": dict(self.loads),
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(), "alive": scheduler.alive,
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
