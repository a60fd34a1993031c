"""The benchmark suite: adapter swap, memory per adapter, latency, throughput, bandwidth floor.

Everything is measured side by side in one process, repeated, and reported as spreads. The PEFT
and transformers columns need the `export` extra (torch, peft) and PEFT checkpoints of the same
adapters; without them those columns are skipped with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import manifest as mf
from ..adapters.bundle import KINDS, load_bundle
from ..runtime import Engine
from ..runtime.backends import Backend, load_backend
from ..runtime.generation import prefill_new
from ..runtime.settings import BackendSettings
from .machine import describe
from .adapter_memory import in_fresh_process, used_bytes
from .bandwidth import read_bandwidth
from .measure import spread, timed

# The RSS (or VRAM) measure registers adapters until the store holds this much, so that the growth
# rises far above the heap's noise (freed heap absorbs the first MBs: 100 adapters of 460 KB once
# showed 0 bytes); at most MAX_RSS_ADAPTERS copies. quick: 64 MiB; full: 256 MiB.
RSS_TARGET_BYTES = {True: 64 << 20, False: 256 << 20}
MAX_RSS_ADAPTERS = 5000

TEXT = ("The history of the Roman Empire spans many centuries, from the founding of the city to the fall "
        "of Constantinople, with emperors, senators, soldiers, merchants and farmers all playing a part. ")


@dataclass
class Plan:
    """Sizes of one run; `quick` keeps the whole run near two minutes on the default model."""

    prompt_lengths: list[int]
    new_tokens: int
    repeats: int
    memory_counts: list[int]
    batch_sizes: list[int]

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls([16, 128], 8, 3, [1, 10, 100], [1, 8])
        return cls([16, 128, 512], 16, 7, [1, 10, 100, 1000], [1, 8, 32])


@dataclass
class Suite:
    export_dir: Path
    adapters: list[Path]  # bundle files
    peft_dirs: list[Path] = field(default_factory=list)  # the same adapters as PEFT checkpoints
    quick: bool = False
    say: Callable[[str], None] = lambda message: None
    settings: BackendSettings = BackendSettings()  # the backend every engine and session is loaded with

    def _load(self, **kwargs: Any) -> Engine:
        backend, options = self.settings.load_kwargs()
        return Engine.load(self.export_dir, backend=backend, **options, **kwargs)

    def run(self) -> dict[str, Any]:
        plan = Plan.make(self.quick)
        self.manifest = mf.Manifest.load(self.export_dir)
        self.engine = self._load()
        self.device = self.engine.backend.device  # "cpu" or "cuda"
        self.names = []
        for path in self.adapters:
            name = Path(path).stem
            self.engine.add_adapter(name, path)
            self.names.append(name)
        registered = self.engine.store.stats().adapters
        self.kinds = {n: registered[n].kind for n in self.names}
        self.ids = self.engine.encode(TEXT * 40)
        peft = self._peft()
        results: dict[str, Any] = {
            "benchmark": "prefixport-bench",
            "quick": self.quick,
            "export": str(self.export_dir),
            "model": self.manifest.source,
            "device": self.device,
            "backend": self._backend_label(),
            "memory_counter": "VRAM in use on the GPU (the driver's counter)" if self.device == "cuda" else
                              "process RSS: no GPU, so host memory is reported instead of VRAM",
            "adapters": {n: {k: getattr(registered[n], k) for k in ("kind", "bytes", "n_virtual")} for n in self.names},
            "plan": plan.__dict__,
            "machine": describe(),
            "peft": {"available": peft is not None, "reason": self._peft_reason},
        }
        steps = [("swap", lambda: self.swap(plan, peft)), ("memory", lambda: self.memory(plan, peft)),
                 ("latency", lambda: self.latency(plan, peft)), ("throughput", lambda: self.throughput(plan)),
                 ("floor", lambda: self.floor(results))]
        for key, step in steps:
            self.say(f"measuring {key} ...")
            results[key] = step()
        self.engine.close()
        return results

    def _backend_label(self) -> str:
        """e.g. `onnxruntime (cpu)`, `tensorrt (fp16)`: the backend, and its provider or the engine's precision."""
        backend, options = self.settings.load_kwargs()
        if "provider" in options:
            return f"{backend} ({options['provider']})"
        if backend == "tensorrt":
            return f"{backend} ({self.engine.backend.record.precision})"
        return backend

    # --- the PEFT side -------------------------------------------------------------------------

    _peft_reason = ""
    _torch_base: Any = None  # the base model the PEFT columns wrap (transformers eager runs it)

    def _peft(self) -> Any:
        """{adapter name: the PeftModel holding it}, or None with `_peft_reason` set. PEFT cannot
        hold adapters of different types in one PeftModel, so there is one PeftModel per type: the
        soft-prompt types wrap the base model itself, LoRA and IA3 (which replace its layers) a copy each."""
        if not self.peft_dirs:
            self._peft_reason = "no PEFT checkpoints given (--peft)"
            return None
        try:
            import copy

            import torch  # noqa: F401
            from peft import PeftModel

            from ..exporter.loading import load
        except ImportError as e:
            self._peft_reason = f"needs the export extra ({e})"
            return None
        base = self._torch_base = load(self.manifest.source).model.to("cuda" if self.device == "cuda" else "cpu")
        by_type: dict[str, Any] = {}
        models: dict[str, Any] = {}
        for d in self.peft_dirs:
            name, peft_type = Path(d).name, json.loads((Path(d) / "adapter_config.json").read_text())["peft_type"]
            if peft_type in by_type:
                by_type[peft_type].load_adapter(d, adapter_name=name)
            else:
                wraps = copy.deepcopy(base) if peft_type in ("LORA", "IA3") else base
                by_type[peft_type] = PeftModel.from_pretrained(wraps, d, adapter_name=name).eval()
            models[name] = by_type[peft_type]
        self._peft_reason = ""
        return models

    def _peft_first_token(self, models: Any, name: str, ids: list[int]) -> None:
        import torch

        model = models[name]
        model.set_adapter(name)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].argmax()

    def _new_session(self, ids: list[int]) -> Backend:
        """A new session (engine) of the export, after its first prefill (what the naive way pays per adapter)."""
        name, options = self.settings.load_kwargs()
        backend = load_backend(name, self.export_dir, self.manifest, **options)
        prefill_new(backend, [ids])
        return backend

    # --- 1. adapter swap -------------------------------------------------------------------------

    def swap(self, plan: Plan, peft: Any) -> dict[str, Any]:
        """Time to first token right after switching to another adapter."""
        ids = self.ids[:64]
        names = self.names
        order = [names[i % len(names)] for i in range(plan.repeats * len(names))]

        def first_token(engine: Engine, name: str) -> None:
            engine.generate(ids, adapter=name, max_new_tokens=1)

        first_token(self.engine, names[0])  # warm-up
        used_before = used_bytes(self.device)
        resident = [t for n in order for t in timed(lambda: first_token(self.engine, n), 1)]
        used_by_swaps = used_bytes(self.device) - used_before  # VRAM on a GPU, RSS on the CPU
        cold = self._load(adapter_budget_bytes=0)  # every use a miss
        for path, name in zip(self.adapters, names):
            cold.add_adapter(name, path)
        from_disk = [t for n in order for t in timed(lambda: first_token(cold, n), 1)]
        cold.close()

        # a per-adapter export: a new session of a same-size model, then its first token
        naive_times = timed(lambda: self._new_session(ids).close(), max(2, plan.repeats // 2))
        out = {"resident_s": spread(resident), "from_disk_s": spread(from_disk), "naive_new_session_s": spread(naive_times),
               "memory_growth_over_swaps_bytes": used_by_swaps, "swaps": len(order),
               "naive_note": "the base export stands in for a per-adapter export of the same size"}
        if peft is not None:
            peft_names = [Path(d).name for d in self.peft_dirs]
            peft_order = [peft_names[i % len(peft_names)] for i in range(plan.repeats * len(peft_names))]
            self._peft_first_token(peft, peft_names[0], ids)
            out["peft_set_adapter_s"] = spread([t for n in peft_order
                                                for t in timed(lambda: self._peft_first_token(peft, n, ids), 1)])
        base = out["resident_s"]["p50"]
        out["ratios_vs_resident"] = {k: v["p50"] / base for k, v in out.items()
                                     if isinstance(v, dict) and "p50" in v and k != "resident_s"}
        return out

    # --- 2. memory per adapter ---------------------------------------------------------------------

    def memory(self, plan: Plan, peft: Any) -> dict[str, Any]:
        """The store's exact bytes at each of the plan's counts, and the growth of a fresh process
        (RSS, or VRAM on a GPU) over enough adapters to rise above heap noise: both per adapter
        (bench/adapter_memory.py)."""
        sizes = {p: load_bundle(p).nbytes for p in self.adapters}
        path = max(sizes, key=sizes.get)  # the largest bundle: RSS moves in pages
        bundle_bytes = sizes[path]
        rss_count = min(MAX_RSS_ADAPTERS, max(plan.memory_counts[-1], -(-RSS_TARGET_BYTES[self.quick] // bundle_bytes)))
        counts = sorted(set(plan.memory_counts) | {rss_count})
        backend, options = self.settings.load_kwargs()
        probe = in_fresh_process(self.export_dir, path, counts, backend, options, self.device)
        points, single_model = probe["points"], probe["model_bytes"]
        first, last = points[0], points[-1]
        slope = (last["rss_bytes"] - first["rss_bytes"]) / max(1, last["adapters"] - first["adapters"])
        out = {"bundle": Path(path).stem, "bundle_bytes": bundle_bytes, "points": points,
               "store_per_adapter_bytes": last["store_resident_bytes"] / last["adapters"],
               "rss_per_adapter_bytes": slope, "rss_per_adapter_over_bundle_bytes": slope / bundle_bytes,
               "rss_adapters": (first["adapters"], last["adapters"]),
               "rss_expected_growth_bytes": last["store_resident_bytes"] - first["store_resident_bytes"],
               "naive_single_model_bytes": single_model,
               "naive_extrapolated": [{"adapters": n, "bytes": n * single_model} for n in counts],
               "note": "measured in a fresh process (no freed heap to absorb growth); naive = N exported "
                       "models: the loaded model's footprint there times N (extrapolated)"}
        if peft is not None:
            name = Path(path).stem if Path(path).stem in peft else Path(self.peft_dirs[-1]).name  # the same adapter
            params = _peft_adapter_bytes(peft[name], name)
            out["peft_per_adapter_bytes"] = params
            out["peft_extrapolated"] = [{"adapters": n, "bytes": n * params} for n in counts]
            out["peft_note"] = (f"PEFT holds each adapter's parameters ({name}'s: its prompt encoder, or its "
                                "LoRA/IA3 tensors): their bytes times N (extrapolated)")
        return out

    # --- 3. latency ------------------------------------------------------------------------------

    def _token_times(self, ids: list[int], adapter: str | None, n: int) -> tuple[float, list[float]]:
        request = self.engine.prepare(ids, adapter=adapter, max_new_tokens=n, stop_token_ids=[])
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in self.engine.run_rows([request])]
        return stamps[0] - start, list(np.diff(stamps))

    def latency(self, plan: Plan, peft: Any) -> dict[str, Any]:
        configs = {"base": None}
        for kind in KINDS:
            name = next((n for n in self.names if self.kinds[n] == kind), None)
            if name:
                configs[f"{kind} ({name})"] = name
        out: dict[str, Any] = {}
        for length in plan.prompt_lengths:
            ids = self.ids[:length]
            row: dict[str, Any] = {}
            for label, adapter in configs.items():
                self._token_times(ids, adapter, 2)  # warm-up
                ttft, itl = [], []
                for _ in range(plan.repeats):
                    first, gaps = self._token_times(ids, adapter, plan.new_tokens)
                    ttft.append(first)
                    itl += gaps
                row[label] = {"ttft_s": spread(ttft), "itl_s": spread(itl)}
            if peft is not None:
                row.update(self._torch_latency(peft, ids, plan))
            out[str(length)] = row
        return out

    def _torch_latency(self, peft: Any, ids: list[int], plan: Plan) -> dict[str, Any]:
        """transformers eager (base, with cache) and PEFT eager (first token with an adapter)."""
        import torch

        base = self._torch_base  # the base model itself: LoRA and IA3 wrap copies
        ttft, itl = [], []
        for _ in range(plan.repeats):
            with torch.no_grad():
                start = time.perf_counter()
                out = base(input_ids=torch.tensor([ids], device=base.device), use_cache=True)
                stamps = [time.perf_counter()]
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                for _ in range(plan.new_tokens - 1):
                    out = base(input_ids=token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                    stamps.append(time.perf_counter())
            ttft.append(stamps[0] - start)
            itl += list(np.diff(stamps))
        name = Path(self.peft_dirs[0]).name
        peft_ttft = timed(lambda: self._peft_first_token(peft, name, ids), plan.repeats)
        return {"transformers eager": {"ttft_s": spread(ttft), "itl_s": spread(itl)},
                f"peft eager ({name})": {"ttft_s": spread(peft_ttft), "itl_s": None,
                                         "note": "first token only: PEFT's generate() is broken for these "
                                                 "adapter types on transformers 5 (docs/design.md)"}}

    # --- 4. throughput -----------------------------------------------------------------------------

    def throughput(self, plan: Plan) -> dict[str, Any]:
        prompts = [self.ids[i * 7 : i * 7 + 16] for i in range(32)]
        out: dict[str, Any] = {}
        for batch in [b for b in plan.batch_sizes if self.engine.max_batch is None or b <= self.engine.max_batch]:
            rows = prompts[:batch]
            same = [self.names[0]] * batch
            mixed = [([None] + self.names)[i % (len(self.names) + 1)] for i in range(batch)]
            entry = {}
            for label, adapters in (("one adapter", same), ("adapter per row", mixed)):
                times = timed(lambda: self.engine.generate_batch(rows, adapters=adapters,
                                                                 max_new_tokens=plan.new_tokens,
                                                                 stop_token_ids=[]), max(2, plan.repeats // 2))
                tps = [batch * plan.new_tokens / t for t in times]
                entry[label] = {"tokens_per_s": spread(tps)}
            out[str(batch)] = entry
        return out

    # --- 5. the bandwidth floor --------------------------------------------------------------------

    def floor(self, results: dict[str, Any]) -> dict[str, Any]:
        """Weight bytes over the fastest read bandwidth probed (bench/bandwidth.py), checked
        against the measured batch-1 decode step: a floor it beat is flagged, not reported as one."""
        if self.device == "cuda":
            return {"skipped": "the floor is measured for host memory; on a GPU it would need the device's "
                               "bandwidth, which this suite does not measure"}
        weights = sum(p.stat().st_size for p in self.export_dir.glob("model.onnx*"))
        bandwidth = read_bandwidth(256 if self.quick else 1024, threads=self.settings.threads)
        floor_s = weights / bandwidth["bytes_per_s"]
        shortest = str(min(int(k) for k in results["latency"]))
        measured = results["latency"][shortest]["base"]["itl_s"]["p50"]
        return {"weight_bytes": weights, "bandwidth": bandwidth, "decode_floor_s": floor_s,
                "decode_step_p50_s": measured, "measured_over_floor": measured / floor_s,
                "beaten": bool(measured < floor_s)}



def _peft_adapter_bytes(model: Any, name: str) -> int:
    """The bytes of adapter `name`'s parameters in a PeftModel: its prompt encoder (soft prompts,
    prefixes), or its LoRA A/B and IA3 vectors (parameters named `...lora_A.{name}.weight`,
    `...ia3_l.{name}`)."""
    if name in getattr(model, "prompt_encoder", {}):
        return sum(p.numel() * p.element_size() for p in model.prompt_encoder[name].parameters())
    return sum(p.numel() * p.element_size() for key, p in model.named_parameters()
               if f".{name}." in f"{key}." and ("lora_" in key or "ia3_" in key))
