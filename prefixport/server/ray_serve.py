"""Scale-out with Ray Serve: `replicas` x `AdapterReplica` (ray_replica.py: the base model and an
LRU of adapters each) behind one `OpenAIIngress` (ray_ingress.py: the OpenAI API, keys and quotas,
routing by adapter), their metrics merged through a board (ray_metrics.py). This module builds
and launches the application.

Run it with `prefixport serve OUTDIR --ray --replicas N` (a local Ray, or the cluster at
RAY_ADDRESS: `run_ray`), with `serve deploy` of a config naming `app_builder`, or in Python with
`build_app(outdir, ServeSettings.from_options(...))` and `serve.run(...)`: docs/ray.md.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeInstanceDetails

from ..errors import PrefixportError
from ..runtime import BackendSettings
from ..runtime.kv_cache import DEFAULT_BUDGET_MB
from ..runtime.prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from ..runtime.scheduler import DEFAULT_PREFILL_BUDGET
from .middleware import DEFAULT_MAX_BODY_BYTES
from .protocol import RequestLimits
from .ray_ingress import INGRESS, REFRESH_S, OpenAIIngress
from .ray_replica import REPLICA, AdapterReplica
from .settings import APP_NAME, ServeSettings

__all__ = ["APP_NAME", "INGRESS", "REFRESH_S", "REPLICA", "AppArgs", "app_builder", "build_app", "run_ray"]

SCHEDULE_WARN_S = 45.0  # a deployment still waiting after this long is told what its replicas lack


def build_app(outdir: str | Path, settings: ServeSettings = ServeSettings()) -> serve.Application:
    """The Serve application: `settings.ray.replicas` x `AdapterReplica` behind one `OpenAIIngress`.

    Paths must exist on every node that runs a replica (shared storage, or the same path on each).
    Each replica loads the export as `settings.engine` says and serves as `settings.server` says
    (batching, speculation, limits); it reserves `replica_cpus` CPUs (default: the backend's
    threads, or 1) and `replica_gpus` GPUs (at least 1 where the backend runs on a GPU), and keeps
    at most `max_adapters` adapters registered (`settings.ray`). The ingress refuses bodies over
    `max_body_bytes` (413), checks the keys (`settings.server.access`; a keys file on its node:
    roles, models, quotas, reloaded when it changes) and the request's bounds before any replica is
    contacted, and sets each request's prompt-cache salt from its key unless the cache is shared;
    the replicas trust it. What a deployment cannot do is refused here (`ServeSettings.check_ray`).
    """
    settings.check_ray()
    cpus, gpus = replica_resources(settings)
    actor: dict[str, Any] = {"num_cpus": cpus} | ({"num_gpus": gpus} if gpus else {})
    replica = AdapterReplica.options(
        num_replicas=settings.ray.replicas, ray_actor_options=actor,
        max_ongoing_requests=2 * settings.server.max_batch,  # a queue in each replica, so its batches fill
    ).bind(str(Path(outdir).resolve()), settings)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind(
        replica, settings.server)


def replica_resources(settings: ServeSettings) -> tuple[float, float]:
    """(CPUs, GPUs) each replica reserves: `replica_cpus` (default: the backend's threads, or 1) and
    `replica_gpus` (at least 1 where the backend runs on a GPU)."""
    backend = settings.engine.backend
    cpus = settings.ray.replica_cpus if settings.ray.replica_cpus is not None else (backend.threads or 1)
    return cpus, settings.ray.replica_gpus or (1 if backend.uses_gpu else 0)


class AppArgs(BaseModel):
    """Arguments of `app_builder` (`serve run prefixport.server.ray_serve:app_builder outdir=... replicas=2`,
    or `args:` in a Serve config file): flat, named as `prefixport serve`'s options
    (`ServeSettings.from_options`; sizes in MiB); `threads`, `device`, `backend`, `provider` and
    `precision` make the `BackendSettings`."""

    outdir: str
    adapters_dir: str | None = None
    model_name: str | None = None
    max_batch: int = 8
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    max_waiting: int | None = 256
    api_key: str | None = None
    keys_file: str | None = None  # on the ingress's node
    shared_prompt_cache: bool = False
    private_ops: bool | None = None  # None: private when there is a keys_file
    max_body_mb: float = DEFAULT_MAX_BODY_BYTES / 2**20
    max_stops: int = RequestLimits.max_stops
    replicas: int = 1
    max_adapters: int = 8
    threads: int | None = None
    device: Literal["cpu", "cuda"] | None = None
    adapter_budget_mb: float | None = None
    replica_cpus: float | None = None
    replica_gpus: float = 0
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    provider: Literal["cpu", "cuda", "tensorrt"] | None = None
    precision: Literal["fp32", "fp16"] | None = None
    kv_cache_mb: float | None = DEFAULT_BUDGET_MB
    max_context: int | None = None
    prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_BYTES / 2**20
    speculative: str | None = None
    speculate_max_batch: int | None = None


def app_builder(args: AppArgs) -> serve.Application:
    """The application builder for `serve run` / `serve deploy` (`api_key` also from PREFIXPORT_API_KEY)."""
    options = args.model_dump()
    options["api_key"] = options["api_key"] or os.environ.get("PREFIXPORT_API_KEY")
    backend = BackendSettings(kind=options.pop("backend"), provider=options.pop("provider"),
                              device=options.pop("device"), precision=options.pop("precision"),
                              threads=options.pop("threads"))
    outdir = options.pop("outdir")
    return build_app(outdir, ServeSettings.from_options(outdir, backend=backend, **options))


def running_serve() -> ServeInstanceDetails | None:
    """What Serve runs on the connected cluster (HTTP options, applications), or None when Serve
    is not started. (Ray has no public call for the HTTP options: this reads what `serve.status()`
    reads.)"""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return ServeInstanceDetails(**client.get_serve_details()) if client is not None else None


def run_ray(outdir: str | Path, settings: ServeSettings = ServeSettings(), *, host: str = "127.0.0.1",
            port: int = 8000, block: bool = True) -> DeploymentHandle | None:
    """Serve on Ray: join the cluster at RAY_ADDRESS if set (else start a local Ray), deploy
    `build_app(outdir, settings)` as application `settings.ray.app_name` at its route prefix and
    (with `block`) serve until Ctrl-C or SIGTERM.

    Serve's HTTP proxy is started on host:port unless Serve already runs on the cluster: then its
    host and port stay (Ray sets them once per cluster) and the message says which. An application
    of the same name is refused unless `replace`; a route prefix another application holds is
    refused. On exit, Serve is shut down if this call started it; else only the application is
    deleted: on Ctrl-C or SIGTERM at any point, the deployment included (then None is returned),
    and when the deployment fails. Replicas still unscheduled after SCHEDULE_WARN_S are said to
    lack resources, with what each reserves and what the cluster has free. Without the backend's
    threads set, a local Ray's cores are shared between the replicas. With `block` False the
    application stays and its handle is returned once it runs.
    """
    settings.check_ray()
    app_name, route_prefix, replicas = settings.ray.app_name, settings.ray.route_prefix, settings.ray.replicas
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    if settings.engine.backend.threads is None and not on_cluster:
        settings = settings.with_threads(max(1, (os.cpu_count() or 1) // max(1, replicas)))
    running = running_serve()
    if running is not None:
        _check_free(running, app_name, route_prefix, settings.ray.replace)
        http = running.http_options
        if (http.host, http.port) != (host, port):
            print(f"Serve already runs on this cluster with its HTTP proxy on {http.host}:{http.port}; that "
                  f"address serves this application too (--host {host} --port {port} are not used: Ray sets "
                  "them once per cluster)", file=sys.stderr, flush=True)
        host, port = str(http.host), int(http.port)
    else:
        serve.start(http_options={"host": host, "port": port})
    app = build_app(outdir, settings)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # from now on: the deployment included
        signal.signal(signal.SIGTERM, stop)  # `kill`, `docker stop`: shut down as Ctrl-C does
    deployed, watched, handle = False, threading.Event(), None
    threading.Thread(target=_watch_scheduling, args=(settings, watched), name="prefixport-schedule",
                     daemon=True).start()
    try:
        handle = serve.run(app, name=app_name, route_prefix=route_prefix)  # until RUNNING (or it failed)
        watched.set()
        deployed = True
        if not block:
            return handle
        base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        print(f"serving application {app_name!r} on {base}/v1 (metrics: {base}/metrics) with {replicas} Ray "
              "Serve replica(s); Ctrl-C stops it", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        watched.set()
        if not (deployed and not block):  # stopped, or the deployment failed or was interrupted
            if running is None:
                serve.shutdown()
            else:  # a cluster's Serve: the other applications go on
                serve.delete(app_name)
            ray.shutdown()
    return handle


def _watch_scheduling(settings: ServeSettings, done: threading.Event) -> None:
    """While the deployment waits: after SCHEDULE_WARN_S, if `done` is not set, say once what each
    replica reserves and what the cluster has free (Serve itself only logs that a replica has
    "taken more than 30s to be scheduled")."""
    if done.wait(SCHEDULE_WARN_S):
        return
    cpus, gpus = replica_resources(settings)
    free, total = ray.available_resources(), ray.cluster_resources()
    want = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    have = f"{free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs" + (
        f", {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs" if gpus else "")
    print(f"the replicas are not running after {SCHEDULE_WARN_S:g} s: each of the {settings.ray.replicas} "
          f"reserves {want} and the cluster has {have} free; lower --replica-cpus/--replica-gpus or --replicas, "
          "or add nodes (Ctrl-C or SIGTERM removes the application)", file=sys.stderr, flush=True)


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
