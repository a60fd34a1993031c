"""The float16 graph `prefixport build-engine --fp16` hands TensorRT, run on the CPU by ONNX
Runtime against the float32 graph it came from: greedy tokens and logits with each adapter kind.
(TensorRT's kernels differ from ONNX Runtime's; this checks the conversion, not TensorRT.)

    python -m benchmarks.fp16_graph EXPORT_DIR [--out benchmarks/results/fp16_graph.json]

EXPORT_DIR: a `--no-optimize` float32 export; its adapters/ are used when there are some.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from prefixport import manifest as mf
from prefixport.engines.build import float16_graph
from prefixport.runtime import Engine
from prefixport.runtime.generation import prefill_new

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "Translate 'good morning' into Spanish.", "What is 17 times 3?",
           "Name a famous painting.", "Give me a tip for learning to code."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        half_dir = Path(tmp) / "half"
        shutil.copytree(args.export, half_dir, ignore=shutil.ignore_patterns(mf.MODEL_NAME + "*", "engines"))
        start = time.perf_counter()
        float16_graph(args.export / mf.MODEL_NAME, half_dir / mf.MODEL_NAME)
        convert_s = time.perf_counter() - start
        half, full = Engine.load(half_dir), Engine.load(args.export)
        adapters = [None] + sorted(p.stem for p in (args.export / "adapters").glob("*.safetensors"))
        for name in adapters[1:]:
            for e in (half, full):
                e.add_adapter(name, args.export / "adapters" / f"{name}.safetensors")
        rows = []
        for adapter in adapters:
            for prompt in PROMPTS:
                a = full.generate(prompt, chat=True, adapter=adapter, max_new_tokens=args.new_tokens, stop_token_ids=[])
                b = half.generate(prompt, chat=True, adapter=adapter, max_new_tokens=args.new_tokens, stop_token_ids=[])
                same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
                rows.append({"adapter": adapter, "prompt": prompt, "tokens_equal_before_first_difference": same})
        m = full.manifest
        diffs = []
        for prompt in PROMPTS:
            ids = full.encode(prompt, chat=True)
            la, _ = prefill_new(full.backend, [ids])
            lb, _ = prefill_new(half.backend, [ids])
            diffs.append(float(np.abs(la - lb).max()))
        half_bytes = sum(f.stat().st_size for f in half_dir.glob(mf.MODEL_NAME + "*"))
    identical = sum(r["tokens_equal_before_first_difference"] == args.new_tokens for r in rows)
    result = {"export": str(args.export), "model": m.source, "machine": machine(), "convert_s": round(convert_s, 1),
              "float16_graph_bytes": half_bytes, "float32_graph_bytes": (args.export / mf.MODEL_NAME).stat().st_size,
              "sequences": len(rows), "sequences_identical": identical, "new_tokens": args.new_tokens,
              "first_step_logits_max_abs_diff": max(diffs), "rows": rows}
    print(f"{identical}/{len(rows)} greedy sequences of {args.new_tokens} tokens identical "
          f"(adapters: {', '.join(str(a) for a in adapters)}); first-step logits max abs diff {max(diffs):.3g}; "
          f"graph {half_bytes / 1e6:.0f} MB vs {result['float32_graph_bytes'] / 1e6:.0f} MB; "
          f"converted in {convert_s:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
