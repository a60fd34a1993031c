"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..runtime import Engine, GenerationResult, Scheduler, Ticket
from ..runtime.stats import LRUStats, PromptCacheStats, ProposerStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector(Collector):
    """Read at scrape time: the adapter store's counters, memory, the scheduler's queue."""

    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.engine, self.scheduler = engine, scheduler

    def collect(self) -> Iterator:
        stats = self.engine.stats()
        store = stats.adapters
        for name, help_ in (("hits", "adapter lookups served from memory"),
                            ("misses", "adapter lookups that re-read the bundle file"),
                            ("evictions", "adapters evicted from memory by the byte budget")):
            family = CounterMetricFamily(f"prefixport_adapter_{name}", help_, labels=["adapter"])
            for adapter, per in store.adapters.items():
                family.add_metric([adapter], getattr(per, name))
            yield family
        yield GaugeMetricFamily("prefixport_adapters_registered", "adapters registered", store.registered)
        yield GaugeMetricFamily("prefixport_adapters_resident", "adapters resident in memory", store.resident)
        yield GaugeMetricFamily("prefixport_adapters_resident_bytes", "bytes of resident adapters",
                                store.resident_bytes)
        memory = GaugeMetricFamily("prefixport_memory_bytes", "memory held, by kind (process RSS, device)",
                                   labels=["kind"])
        for kind, value in stats.memory.items():
            memory.add_metric([kind.removesuffix("_bytes")], value)
        yield memory
        kv = stats.kv_cache
        yield GaugeMetricFamily("prefixport_kv_cache_bytes", "bytes held by the KV caches (rows x capacity x "
                                "2 x layers x kv_heads x head_dim x dtype size)", kv.bytes)
        if kv.budget_bytes_each is not None:
            yield GaugeMetricFamily("prefixport_kv_cache_budget_bytes", "the KV cache budget (per cache)",
                                    kv.budget_bytes_each)
        yield from _prompt_cache(stats.prompt_cache)
        yield from _bounded({"grammars": stats.grammars, "lookup_history": stats.speculative.prompt_lookup.history})
        proposer = stats.speculative.method(self.scheduler.speculative)
        if proposer is not None:
            yield from _speculative(proposer)
        cache = self.scheduler.cache.stats()
        yield GaugeMetricFamily("prefixport_kv_cache_rows", "rows of the serving KV cache", cache.rows)
        yield GaugeMetricFamily("prefixport_kv_cache_capacity", "slots per row of the serving KV cache",
                                cache.capacity)
        yield CounterMetricFamily("prefixport_kv_cache_preemptions", "rows preempted to host memory for KV room "
                                  "(resumed exactly later)", cache.preemptions)
        yield GaugeMetricFamily("prefixport_requests_running", "requests in the decode batch",
                                self.scheduler.running)
        yield GaugeMetricFamily("prefixport_requests_waiting", "requests queued for the batch",
                                self.scheduler.waiting)
        yield CounterMetricFamily("prefixport_requests_cancelled", "requests that left early: client gone",
                                  self.scheduler.cancelled)


def _prompt_cache(stats: PromptCacheStats | None) -> Iterator:
    """The prompt cache's counters and size (nothing when it is off)."""
    if stats is None:
        return
    for name, help_ in (("requests", "requests looked up in the prompt cache"),
                        ("hits", "requests that found prompt tokens cached"),
                        ("prompt_tokens", "prompt tokens looked up"),
                        ("cached_tokens", "prompt tokens served from the cache (not prefilled)"),
                        ("evicted_blocks", "blocks evicted by the byte budget")):
        yield CounterMetricFamily(f"prefixport_prompt_cache_{name}", help_, getattr(stats, name))
    for name, help_ in (("hit_rate", "share of requests that found prompt tokens cached"),
                        ("cached_token_rate", "share of prompt tokens served from the cache"),
                        ("blocks", "blocks held"), ("bytes", "bytes held"), ("budget_bytes", "the byte budget")):
        yield GaugeMetricFamily(f"prefixport_prompt_cache_{name}", help_, getattr(stats, name))


def _bounded(maps: dict[str, LRUStats | None]) -> Iterator:
    """The maps keyed by what clients pick (schemas; adapter and salt), held to entry and cost
    bounds (`runtime.lru.FairLRU`): what each holds, its bounds, its evictions."""
    families = {name: GaugeMetricFamily(f"prefixport_bounded_{name}", help_, labels=["map"]) for name, help_ in (
        ("entries", "entries held"), ("max_entries", "the entry bound"),
        ("cost", "the entries' cost held (tokens for lookup_history)"), ("owners", "tenants holding entries"))}
    evictions = CounterMetricFamily("prefixport_bounded_evictions", "entries evicted by the bounds", labels=["map"])
    for label, stats in maps.items():
        if stats is None:
            continue
        for name, family in families.items():
            family.add_metric([label], getattr(stats, name))
        evictions.add_metric([label], stats.evictions)
    yield from families.values()
    yield evictions


def _speculative(stats: ProposerStats) -> Iterator:
    """The server's proposer: verification passes, tokens proposed and accepted."""
    for name, help_ in (("passes", "speculative verification passes"), ("proposed", "tokens proposed"),
                        ("accepted", "proposed tokens accepted")):
        yield CounterMetricFamily(f"prefixport_speculative_{name}", help_, getattr(stats, name))
    yield GaugeMetricFamily("prefixport_speculative_acceptance_rate", "share of proposed tokens accepted",
                            stats.acceptance_rate)


class RequestMetrics:
    """HTTP requests by endpoint, model and status, counted where they arrive (`CountRequests`: the
    server, or the Ray ingress in front of its replicas); `render()` is a /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("prefixport_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Metrics(RequestMetrics):
    """The server's counters and histograms, the requests' included; `render()` is the /metrics body."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.prompt_tokens = Counter("prefixport_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("prefixport_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("prefixport_time_to_first_token_seconds", "submission to first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("prefixport_inter_token_latency_seconds", "time between a request's tokens",
                             ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("prefixport_request_latency_seconds", "submission to last token",
                             ["model"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("prefixport_batch_size", "rows in each decode step", buckets=_BATCH, registry=r)

    def watch(self, engine: Engine, scheduler: Scheduler) -> None:
        self.registry.register(_EngineCollector(engine, scheduler))

    def finished(self, model: str, ticket: Ticket, result: GenerationResult) -> None:
        times = ticket.token_times
        self.prompt_tokens.labels(model).inc(result.prompt_tokens)
        self.generation_tokens.labels(model).inc(len(result.token_ids))
        if times:
            self.ttft.labels(model).observe(times[0] - ticket.submitted)
            self.e2e.labels(model).observe(times[-1] - ticket.submitted)
            itl = self.itl.labels(model)
            for a, b in zip(times, times[1:]):
                itl.observe(b - a)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: dict[str, str], label: str = "replica") -> bytes:
    """Several servers' /metrics bodies (`texts`: server id -> body) as one body: each family once,
    every sample labelled with its server's id (Ray Serve's ingress serves its replicas' this way)."""
    families: dict[str, Metric] = {}
    for source, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, label: source}, sample.value, sample.timestamp,
                                  sample.exemplar)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
