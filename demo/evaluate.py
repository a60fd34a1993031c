"""Base model vs each demo adapter, through the prefixport runtime only (no torch).

    python demo/evaluate.py EXPORT_DIR [--examples 3] [--out demo/results.json]

Shows a few held-out examples side by side, then each adapter's accuracy on the held-out split
against the base model's on the same prompts. The LoRA and the IA3 need an export made with
`prefixport export --lora` (on another export they are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

from prefixport.runtime import Engine  # noqa: E402

ADAPTERS = {"json-prompt": ("json", 40), "date-prefix": ("date", 12),  # task, max new tokens
            "json-lora": ("json", 40), "date-ia3": ("date", 12)}
NEED_LORA_EXPORT = {"json-lora", "date-ia3"}  # LoRA and IA3: skipped on an export made without --lora


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    engine = Engine.load(args.export_dir)
    results, kinds = {}, {}
    for name, (task, max_new) in ADAPTERS.items():
        if name in NEED_LORA_EXPORT and not engine.manifest.weight_adapters:
            print(f"\n(skipped {name}: LoRA and IA3 need an export made with `prefixport export --lora`)")
            continue
        path = Path(args.export_dir) / "adapters" / f"{name}.safetensors"
        kinds[name] = engine.add_adapter(name, path).kind
        _, test = tasks.split(task)
        scores = {"base": 0, name: 0}
        start = time.perf_counter()
        print(f"\n== {name} ({kinds[name]}, task {task}) ==")
        for i, ex in enumerate(test):
            outputs = {}
            for who, adapter in (("base", None), (name, name)):
                out = engine.generate(ex["prompt"], adapter=adapter, max_new_tokens=max_new).text
                outputs[who] = out
                scores[who] += tasks.correct(task, out, ex["target"])
            if i < args.examples:
                print(f"prompt : {ex['prompt']!r}\nbase   : {_short(outputs['base'])!r}\n"
                      f"adapter: {_short(outputs[name])!r}\nwanted : {ex['target'].strip()!r}\n")
        acc = {k: v / len(test) for k, v in scores.items()}
        results[name] = {"task": task, "held_out": len(test), "accuracy_base": acc["base"],
                         "accuracy_adapter": acc[name], "seconds": time.perf_counter() - start}
    print("| adapter | kind | held-out examples | base accuracy | adapter accuracy |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {kinds[name]} | {r['held_out']} | {r['accuracy_base']:.0%} | "
              f"{r['accuracy_adapter']:.0%} |")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
