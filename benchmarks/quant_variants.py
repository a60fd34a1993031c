"""Why `--quantize` is what it is: weight-only variants of one float export, each judged by greedy
agreement with the float graph and by batch-1 decode speed, side by side in one run.

Variants: round-to-nearest symmetric int8/int4 with int8 dot products (accuracy_level 4; int8's
recipe), the same with float dot products (accuracy_level 1), without quantising the tied lm_head,
asymmetric int4, HQQ int4 (ONNX Runtime's quantiser offers all of them), and the weights' own
GGUF blocks (`exporter/blocks.py`, int4's recipe) at accuracy levels 4 and 1.

With --adapter NAME=BUNDLE (repeatable), each variant is also judged through that adapter
(converted for the float export: bundles fit every variant), teacher-forced on the same prompts.

    python -m benchmarks.quant_variants EXPORT_DIR [--adapter json=demo.safetensors ...]
        [--out benchmarks/results/quant_variants.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine
from prefixport import manifest as mf
from prefixport.exporter import optimize
from prefixport.runtime import Engine
from prefixport.runtime.agreement import PROMPTS, adapter_agreement, agreement

# name -> (kind, accuracy_level, quantise lm_head, algorithm)
VARIANTS = {
    "int8 sym, level 4, lm_head (--quantize int8)": ("int8", 4, True, "rtn"),
    "int8 sym, level 4, float lm_head": ("int8", 4, False, "rtn"),
    "int8 sym, level 1": ("int8", 1, False, "rtn"),
    "int4 GGUF blocks (Q4_1, lm_head Q8_0), level 4 (--quantize int4)": ("int4", 4, True, "blocks"),
    "int4 GGUF blocks, level 1": ("int4", 1, True, "blocks"),
    "int4 sym, level 4, lm_head (--quantize int4-rtn)": ("int4", 4, True, "rtn"),
    "int4 sym, level 4, float lm_head": ("int4", 4, False, "rtn"),
    "int4 asym, level 4": ("int4", 4, False, "asym"),
    "int4 HQQ": ("int4", 4, False, "hqq"),
}


def build(src: Path, dst: Path, kind: str, level: int, lm_head: bool, algorithm: str) -> None:
    """dst: an export folder whose model.onnx is src's, quantised as asked (other files linked)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != mf.MODEL_NAME:
            os.symlink(f.resolve(), dst / f.name)
    shutil.copy(src / mf.MODEL_NAME, dst / mf.MODEL_NAME)
    optimize.quantize(dst / mf.MODEL_NAME, kind, accuracy_level=level, lm_head=lm_head, algorithm=algorithm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=BUNDLE",
                        help="also measure agreement through this adapter bundle (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quant_variants.json")
    args = parser.parse_args()
    reference = Engine.load(args.export_dir)
    adapters = dict(item.split("=", 1) for item in args.adapter)
    for name, path in adapters.items():
        reference.add_adapter(name, path)
    m = reference.manifest
    prompts = [reference.encode(p, chat=True) for p in PROMPTS]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"float32": reference}
        for i, (name, spec) in enumerate(VARIANTS.items()):
            folder = Path(tmp) / str(i)
            build(args.export_dir, folder, *spec)
            engines[name] = Engine.load(folder)
            a = agreement(reference.backend, engines[name].backend, prompts, args.tokens, m.hidden_size,
                          np.dtype(m.dtype))
            results[name] = {"model_mb": (folder / mf.MODEL_NAME).stat().st_size / 1e6, **a.to_dict(), "adapters": {}}
            print(f"{name}: {a.summary()}", flush=True)
            for adapter, path in adapters.items():
                engines[name].add_adapter(adapter, path)
                via = adapter_agreement(reference, engines[name], adapter, PROMPTS, args.tokens)
                results[name]["adapters"][adapter] = via.to_dict()
                print(f"  through {adapter}: {via.summary()}", flush=True)
        results["float32"] = {"model_mb": (args.export_dir / mf.MODEL_NAME).stat().st_size / 1e6}
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        ids = prompts[0]
        for _ in range(args.repeats):
            for name, engine in engines.items():
                r = engine.generate(ids, max_new_tokens=64, stop_token_ids=[])
                speeds[name].append(r.timings["decode_tokens_per_s"])
    through = "".join(f" top-1 through {a} |" for a in adapters)
    print(f"\n| variant | model MB | top-1 agreement | identical texts |{through} decode tok/s (batch 1) |")
    print("|---|---|---|---|" + "---|" * len(adapters) + "---|")
    for name in engines:
        r = results[name]
        r["decode_tokens_per_s"] = statistics.median(speeds[name])
        agree = f"{r['top1']:.1%}" if "top1" in r else "–"
        same = f"{r['identical']}/{r['prompts']}" if "top1" in r else "–"
        by = "".join(f" {r['adapters'][a]['top1']:.1%} |" if "top1" in r else " – |" for a in adapters)
        print(f"| {name} | {r['model_mb']:.0f} | {agree} | {same} |{by} {r['decode_tokens_per_s']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"export": str(args.export_dir), "machine": machine(), "results": results},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
