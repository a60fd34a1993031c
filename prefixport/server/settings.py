"""One serving setup as three settings objects, built once from the command line's options or a Ray
Serve config's `args` (`ServeSettings.from_options`: the same flat names in both) and taken whole
by `Engine.load` (`engine`), `create_app` and the Ray replica and ingress (`server`), and the Ray
launcher (`ray`). A new knob is a field here, its option in the CLI (and `AppArgs`), and its one
consumer. Sizes given in MB on the command line are MiB (2^20 bytes) everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrefixportError
from ..runtime.kv_cache import DEFAULT_BUDGET_MB, CacheSettings
from ..runtime.prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from ..runtime.scheduler import DEFAULT_PREFILL_BUDGET
from ..runtime.settings import BackendSettings, EngineSettings, Speculative
from ..runtime.speculative import parse_method
from .middleware import DEFAULT_MAX_BODY_BYTES
from .protocol import RequestLimits
from .tenants import DEFAULT_MAX_REFUSED, Access, KeyRing, Penalties

MiB = 2**20
APP_NAME = "prefixport"  # the default Ray Serve application name (`--app-name`)


@dataclass(frozen=True)
class AccessSettings:
    """Who may call the server: one admin `api_key`, or a `keys_file` (TOML: roles, models, quotas;
    docs/security.md); whether admin keys may register adapters over HTTP (`adapter_admin`); whether
    /metrics and /health need an admin key (`private_ops`; None: when there is a keys file); whether
    keys share prompt-cache blocks; refused requests a key may make per minute before the penalty box."""

    api_key: str | None = field(default=None, repr=False)
    keys_file: Path | None = None
    adapter_admin: bool = False
    private_ops: bool | None = None
    shared_prompt_cache: bool = False
    max_refused_per_minute: int | None = None  # None: DEFAULT_MAX_REFUSED

    def __post_init__(self) -> None:
        if self.api_key is not None and self.keys_file is not None:
            raise PrefixportError("give --keys or --api-key, not both")

    def build(self) -> Access:
        """The `Access` these settings describe (reads the keys file: a bad one is one clear error)."""
        keys = KeyRing(str(self.keys_file) if self.keys_file is not None else None, self.api_key)
        return Access(keys, adapter_admin=self.adapter_admin, private_ops=self.private_ops,
                      shared_prompt_cache=self.shared_prompt_cache,
                      penalties=Penalties(self.max_refused_per_minute or DEFAULT_MAX_REFUSED))


@dataclass(frozen=True)
class ServerSettings:
    """What the OpenAI server does around the engine: the base model's API name (None: the
    export's), the adapters folder, batching (`max_batch` rows, `prefill_budget` prompt tokens per
    step, `max_waiting` queued: more is 503), speculative decoding (`speculative` and while at most
    `speculate_max_batch` rows decode; None: the measured break-even), the largest body, the bounds
    on one request, and who may call it."""

    model_name: str | None = None
    adapters_dir: Path | None = None
    max_batch: int = 8
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    max_waiting: int | None = 256
    speculative: Speculative | None = None
    speculate_max_batch: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    limits: RequestLimits = field(default_factory=RequestLimits)
    access: AccessSettings = field(default_factory=AccessSettings)


@dataclass(frozen=True)
class RaySettings:
    """How `--ray` deploys: replicas, each keeping at most `max_adapters` adapters registered and
    reserving `replica_cpus` CPUs (None: the backend's threads, or 1) and `replica_gpus` GPUs (at
    least 1 where the backend runs on a GPU); the application's name and route prefix; `replace`
    redeploys over a running application of the same name."""

    replicas: int = 1
    max_adapters: int = 8
    replica_cpus: float | None = None
    replica_gpus: float = 0
    app_name: str = APP_NAME
    route_prefix: str = "/"
    replace: bool = False

    def __post_init__(self) -> None:
        if not self.route_prefix.startswith("/"):
            raise PrefixportError(f"--route-prefix must start with '/', got {self.route_prefix!r}")


@dataclass(frozen=True)
class ServeSettings:
    """A whole serving setup: the engine, the server, and (with --ray) the deployment."""

    engine: EngineSettings = field(default_factory=EngineSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    @classmethod
    def from_options(cls, outdir: str | Path, *, adapters_dir: str | Path | None = None,
                     model_name: str | None = None, max_batch: int = 8,
                     prefill_budget: int = DEFAULT_PREFILL_BUDGET, max_waiting: int | None = 256,
                     max_body_mb: float = DEFAULT_MAX_BODY_BYTES / MiB, api_key: str | None = None,
                     keys_file: str | Path | None = None, allow_adapter_admin: bool = False,
                     private_ops: bool | None = None, max_refused_per_minute: int | None = None,
                     max_stops: int = RequestLimits.max_stops, shared_prompt_cache: bool = False,
                     adapter_budget_mb: float | None = None, kv_cache_mb: float | None = DEFAULT_BUDGET_MB,
                     max_context: int | None = None,
                     prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_BYTES / MiB, speculative: str | None = None,
                     speculate_max_batch: int | None = None, backend: BackendSettings | None = None,
                     replicas: int = 1, max_adapters: int = 8, replica_cpus: float | None = None,
                     replica_gpus: float = 0, app_name: str = APP_NAME, route_prefix: str = "/",
                     replace: bool = False) -> ServeSettings:
        """The settings from flat options, named as `prefixport serve`'s (and a Serve config's
        `args`): sizes in MiB, `speculative` as prompt-lookup or draft:EXPORT_DIR, paths resolved
        here (not in a replica's working folder); `adapters_dir` defaults to OUTDIR/adapters."""
        method, draft = parse_method(speculative)
        keys = Path(keys_file).resolve() if keys_file is not None else None
        access = AccessSettings(api_key=api_key, keys_file=keys, adapter_admin=allow_adapter_admin,
                                private_ops=private_ops, shared_prompt_cache=shared_prompt_cache,
                                max_refused_per_minute=max_refused_per_minute)
        server = ServerSettings(
            model_name=model_name,
            adapters_dir=Path(adapters_dir or Path(outdir) / "adapters").resolve(),
            max_batch=max_batch, prefill_budget=prefill_budget, max_waiting=max_waiting, speculative=method,
            speculate_max_batch=speculate_max_batch, max_body_bytes=int(max_body_mb * MiB),
            limits=RequestLimits(max_stops=max_stops), access=access)
        engine = EngineSettings(
            backend=backend or BackendSettings(),
            cache_settings=CacheSettings(max_rows=max_batch, max_context=max_context, budget_mb=kv_cache_mb),
            adapter_budget_bytes=int(adapter_budget_mb * MiB) if adapter_budget_mb is not None else None,
            prompt_cache_bytes=int(prompt_cache_mb * MiB), draft=draft.resolve() if draft is not None else None)
        ray = RaySettings(replicas=replicas, max_adapters=max_adapters, replica_cpus=replica_cpus,
                          replica_gpus=replica_gpus, app_name=app_name, route_prefix=route_prefix, replace=replace)
        return cls(engine, server, ray)

    def check_ray(self) -> None:
        """Refuse what a Ray deployment cannot do, saying why."""
        if self.server.access.adapter_admin:
            raise PrefixportError("--allow-adapter-admin: under Ray each replica registers adapters from the "
                                  "adapters folder on demand (put NAME.safetensors there), so there is no "
                                  "registry to change over HTTP")
        if self.server.access.max_refused_per_minute is not None:
            raise PrefixportError("--max-refused-per-minute: the Ray ingress has no penalty box yet")

    def with_threads(self, threads: int) -> ServeSettings:
        """The same settings with the backend on `threads` threads."""
        backend = dataclasses.replace(self.engine.backend, threads=threads)
        return dataclasses.replace(self, engine=dataclasses.replace(self.engine, backend=backend))

