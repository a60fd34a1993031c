"""The engine soak: thousands of adapter register/unregister cycles in one `Engine`, with and
without an adapter budget; errors, generation checks against a reference, RSS, file descriptors
and memory maps along the way."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from benchmarks.common import CpuMeter, rel, say, slope_per_min
from tools.soak import BUNDLES
from prefixport.bench.measure import rss_bytes

CHECK_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Write one sentence about the sea."}]]


def footprint() -> dict[str, Any]:
    """This process's RSS (MiB, after a garbage collection), open file descriptors and memory maps."""
    try:
        maps = len(Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        maps = -1
    return {"rss_mib": rss_bytes() / 2**20, "fds": len(os.listdir("/proc/self/fd")), "maps": maps}


def engine_phase(export: Path, budget: int | None, cycles: int, deadline: float, check_every: int,
                 sample_every: int, tmp: Path) -> dict[str, Any]:
    """One phase: `cycles` register/unregister cycles on a fresh engine with adapter budget
    `budget` (None: none), until `deadline`; its operations, checks, errors and footprint samples."""
    from prefixport.errors import AdapterError
    from prefixport.runtime import Engine

    paths = {kind: export / "adapters" / f"{stem}.safetensors" for kind, stem in BUNDLES.items()}
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(paths["prefix"].read_bytes()[:100_000])
    before = footprint()
    engine = Engine.load(export, adapter_budget_bytes=budget)
    closed = {}
    try:
        engine.add_adapter("anchor-prompt", paths["prompt"])
        engine.add_adapter("anchor-prefix", paths["prefix"])

        def outputs(churned: str | None, kind: str | None) -> dict[str, str]:
            out = {}
            for i, p in enumerate(CHECK_PROMPTS):
                for name in (None, "anchor-prompt", "anchor-prefix"):
                    out[f"{name or 'base'}/{i}"] = engine.generate(p, adapter=name, max_new_tokens=8).text
                if churned:  # compared with the anchor over the same bundle
                    out[f"anchor-{kind}/{i}"] = engine.generate(p, adapter=churned, max_new_tokens=8).text
            return out

        reference = outputs(None, None)
        samples = [{"cycle": 0, **footprint(), "t_s": 0.0}]
        window: deque[str] = deque()
        kinds: dict[str, str] = {}
        counts = Counter()
        checks, mismatches, errors = 0, [], []
        t0 = time.perf_counter()
        done = 0
        rng = random.Random(1)
        for i in range(1, cycles + 1):
            if time.perf_counter() > deadline:
                break
            kind = ("prompt", "prefix")[(i + i // 8) % 2]
            name = f"churn-{i % 8}"
            try:
                engine.add_adapter(name, paths[kind])
                counts["register"] += 1
                kinds[name] = kind
                if name in window:
                    window.remove(name)
                window.append(name)
                while len(window) > 3:
                    engine.remove_adapter(window.popleft())
                    counts["unregister"] += 1
                if i % 7 == 0:
                    engine.store.acquire(rng.choice([*window, "anchor-prompt", "anchor-prefix"]))
                    counts["lookup"] += 1
                if i % 25 == 0:
                    other = "prefix" if kinds[window[0]] == "prompt" else "prompt"
                    engine.add_adapter(window[0], paths[other])
                    kinds[window[0]] = other
                    counts["replace"] += 1
                if i % 100 == 0:
                    try:
                        engine.add_adapter("broken", truncated)
                        errors.append(f"cycle {i}: a truncated bundle was accepted")
                    except AdapterError:
                        counts["refused_truncated"] += 1
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"cycle {i}: {type(e).__name__}: {e}")
                if len(errors) > 20:
                    break
            done = i
            if i % check_every == 0:
                checks += 1
                got = outputs(window[-1], kinds[window[-1]])
                bad = {k: (reference[k], v) for k, v in got.items() if reference[k] != v}
                if bad:
                    mismatches.append({"cycle": i, "differ": bad})
            if i % sample_every == 0:
                samples.append({"cycle": i, **footprint(), "t_s": round(time.perf_counter() - t0, 2)})
        wall = time.perf_counter() - t0
        while window:
            engine.remove_adapter(window.popleft())
            counts["unregister"] += 1
        stats = engine.stats().to_dict()
        if samples[-1]["cycle"] != done:
            samples.append({"cycle": done, **footprint(), "t_s": round(wall, 2)})
        end = samples[-1]
    finally:
        engine.close()
        engine = None  # the last reference gone before the figures after close
        closed = footprint()
    store = stats["adapters"]
    after_warm = samples[1] if len(samples) > 2 else samples[0]
    return {
        "budget_bytes": budget, "cycles": done, "cycles_planned": cycles, "wall_s": wall,
        "bounded_out": done < cycles,
        "cycles_per_s": done / wall if wall else None, "operations": dict(counts),
        "evictions": store["evictions"], "misses": store["misses"], "hits": store["hits"],
        "registered_at_end": store["registered"], "generation_checks": checks, "check_mismatches": mismatches[:5],
        "errors": errors[:10], "n_errors": len(errors),
        "before_load": before, "start": samples[0], "end": end, "after_close": closed,
        "rss_growth_mib": end["rss_mib"] - samples[0]["rss_mib"],
        "rss_growth_after_first_sample_mib": end["rss_mib"] - after_warm["rss_mib"],
        "rss_slope_mib_per_1000_cycles": (slope_per_min([(s["cycle"], s["rss_mib"]) for s in samples]) or 0) / 60 * 1000
        if len(samples) >= 3 else None,
        "fd_growth": end["fds"] - samples[0]["fds"], "maps_growth": end["maps"] - samples[0]["maps"],
        "samples": samples,
    }


def engine_soak(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The two phases, without a budget and with one that makes registering evict."""
    tmp = Path(tempfile.mkdtemp(prefix="soak-engine-"))
    try:
        from prefixport.adapters.bundle import load_bundle

        sizes = {k: load_bundle(args.export / "adapters" / f"{v}.safetensors").nbytes for k, v in BUNDLES.items()}
        budget = sizes["prefix"] + sizes["prompt"] + 1024  # the two anchors, or one churned prefix and a prompt
        phases = {}
        for label, b in (("no budget", None), (f"budget {budget} B", budget)):
            if time.perf_counter() > deadline - 10:
                say(f"engine soak ({label}): skipped, --max-seconds reached")
                continue
            say(f"engine soak ({label}): {args.cycles} register/unregister cycles ...")
            with CpuMeter(watch=True) as meter:
                phases[label] = engine_phase(args.export, b, args.cycles, deadline, args.check_every,
                                             args.sample_cycles, tmp)
            phases[label]["cpu"] = meter.result
            p = phases[label]
            say(f"  {p['cycles']} cycles in {p['wall_s']:.1f} s, RSS {p['start']['rss_mib']:.1f} -> "
                f"{p['end']['rss_mib']:.1f} MiB, fds {p['start']['fds']} -> {p['end']['fds']}, "
                f"{p['evictions']} evictions, {len(p['check_mismatches'])} check mismatches, {p['n_errors']} errors")
        return {"export": rel(args.export), "bundle_bytes": sizes, "phases": phases}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
