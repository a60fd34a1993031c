"""The int8 KV cache (`prefixport export --kv-cache-dtype int8`) against the float cache on the
int8-weight export (`--quantize int8`): memory per token, greedy agreement and decode speed.

From a float export it builds, under --work (default: a temporary folder, removed after), the
int8-weight graph as `--quantize int8` makes it (`optimize.quantize`) and the same graph with the
int8 cache as `--kv-cache-dtype int8` makes it (`kv_quant.calibrate` on the float export, then
`kv_quant.apply`): the two differ only in their cache. Then, in one process:

- memory: bytes a token (a slot of one row, every layer, K and V) takes in each cache, and the
  cache's bytes after prefilling `--batch` rows of 2k tokens;
- agreement of the int8 cache with the float cache (`runtime/agreement.py`, what `export --quantize`
  reports): the project's 4 chat prompts x 32 tokens; 8 held-out prompts x 32; each `--adapter`
  (a prompt-tuning and a prefix bundle of the demo: `adapter_agreement`, its prompt format), on
  scales covering the adapters (as `--check-adapter` makes them) and on scales calibrated without
  them (an adapter registered later); and at 2k tokens of context (docs/design.md's text, ~1,950
  tokens, then a question, chat template: 2 prompts x 32 tokens); for a prefix adapter, the
  fraction of its keys and values that the int8 range of their channel clips;
- decode ms/token: `--batch` rows decode `--steps` steps after a prefill of a short (~60 token)
  and a 2k-token prompt each, float and int8 cache alternating, `--rounds` rounds; the median step
  of each round, the median over rounds, the fastest step of all (the least disturbed on a shared
  machine), and int8's speed-up (float ms / int8 ms) by both. `--speed-only` reruns this part
  alone on the graphs an earlier run left in --work, into OUT/kv_int8_speed.*.

    python -m benchmarks.kv_int8 [FLOAT_EXPORT] --adapter json-prompt=BUNDLE --adapter date-prefix=BUNDLE
        [--work DIR] [--batch 1 --batch 4] [--steps 32] [--rounds 3] [--threads N] [--speed-only]
        [--out benchmarks/results/kv_int8]

Bundles: `prefixport adapter convert demo/adapters/NAME --export FLOAT_EXPORT --name NAME
--prompt-format raw --out exports/kv-int8-bundles/NAME.safetensors`. Writes OUT/kv_int8.json and
OUT/kv_int8.md (paths relative to the checkout; the command line as given: pass relative paths). Timings on a shared machine are indicative: the load average is recorded.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (DEFAULT_EXPORT, RESULTS, ROOT, alternate, cell, command, machine, machine_line, median,
                               rel, say, write_report)
from prefixport import manifest as mf
from prefixport.adapters.bundle import load_bundle
from prefixport.exporter import kv_quant
from prefixport.exporter import optimize as opt
from prefixport.runtime import Engine
from prefixport.runtime.agreement import PROMPTS, adapter_agreement, agreement
from prefixport.runtime.generation import decode_step, prefill_new
from prefixport.runtime.kv_cache import slot_bytes

HELD_OUT = (
    "Describe the water cycle.",
    "What should I pack for a weekend hiking trip?",
    "Write a limerick about a cat who loves pizza.",
    "How do vaccines train the immune system?",
    "Suggest three names for a bakery and explain each.",
    "What is the difference between weather and climate?",
    "Write a short email asking a colleague to reschedule a meeting.",
    "Explain recursion with an example in Python.",
)
LONG_TEXT = ROOT / "docs" / "design.md"  # committed: the same context on every machine
LONG_QUESTIONS = ("Summarise the text above in three sentences.", "Which parts of the system does the text describe?")
LONG_TOKENS = 1950  # of the text, before the question and the chat template (~2k in all)
SHORT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
AGREEMENT_TOKENS = 32


def build(float_export: Path, work: Path, adapters: list[Path], name: str = "int8-kv8"
          ) -> tuple[Path, Path, kv_quant.Calibration]:
    """work/int8 (int8 weights, float cache) and work/NAME (the same, int8 cache, its scales
    covering `adapters` as `--check-adapter` makes them)."""
    weights, both = work / "int8", work / name
    if not (weights / mf.MANIFEST_NAME).is_file():
        say("int8 weights (optimize.quantize, as --quantize int8)")
        shutil.rmtree(weights, ignore_errors=True)
        shutil.copytree(float_export, weights)
        kind, algorithm = opt.RECIPES["int8"]
        opt.quantize(weights / mf.MODEL_NAME, kind, algorithm=algorithm)
    say(f"calibrating the int8 cache on the float export (as --kv-cache-dtype int8), covering {len(adapters)} adapters")
    calibration = kv_quant.calibrate(float_export, adapters=adapters)
    shutil.rmtree(both, ignore_errors=True)
    shutil.copytree(weights, both)
    kv_quant.apply(both, mf.Manifest.load(both), calibration)
    return weights, both, calibration


def long_prompts(engine: Engine) -> list[list[int]]:
    """~2k-token chat prompts: the start of docs/design.md, then a question."""
    text = engine.tokenizer.decode(engine.encode(LONG_TEXT.read_text(), chat=False)[:LONG_TOKENS])
    return [engine.encode(f"{text}\n\n{question}", chat=True) for question in LONG_QUESTIONS]


def measure_agreement(reference: Engine, candidate: Engine, adapters: dict[str, Path], plain: bool = True,
                      label: str = "") -> dict[str, Any]:
    m = reference.manifest
    dtype = np.dtype(m.dtype)
    out: dict[str, Any] = {}
    sets = {} if not plain else {"project (4 chat prompts x 32)": [reference.encode(p, chat=True) for p in PROMPTS],
            "held-out (8 chat prompts x 32)": [reference.encode(p, chat=True) for p in HELD_OUT],
            "2k context (2 prompts x 32)": long_prompts(reference)}
    for name, prompts in sets.items():
        start = time.perf_counter()
        result = agreement(reference.backend, candidate.backend, prompts, AGREEMENT_TOKENS, m.hidden_size, dtype)
        out[name] = {**result.to_dict(), "prompt_tokens": [len(p) for p in prompts]}
        say(f"agreement, {name}: {result.summary()} ({time.perf_counter() - start:.0f} s)")
    scales = candidate.kv_scales
    for name, path in adapters.items():
        for engine in (reference, candidate):
            if name not in engine.adapters:
                engine.add_adapter(name, path)
        result = adapter_agreement(reference, candidate, name, PROMPTS, AGREEMENT_TOKENS)
        bundle = load_bundle(path, m)
        entry = {**result.to_dict(), "kind": bundle.kind}
        if bundle.kind == "prefix" and scales is not None:
            arrays = [t[None] for t in bundle.prefix(m.num_layers)]
            entry["prefix_values_clipped"] = scales.clipped(arrays)
            entry["prefix_max_over_range"] = max(float(np.abs(np.asarray(a, np.float32) / (s * 127)).max())
                                                 for a, s in zip(arrays, scales.scales))
        out[f"adapter {name}{label}"] = entry
        say(f"agreement through {name} ({bundle.kind}){label}: {result.summary()}")
    return out


def decode_ms(engine: Engine, prompt: list[int], batch: int, steps: int) -> tuple[float, float, int]:
    """Median and fastest ms of `steps` decode steps of `batch` rows after prefilling `prompt` in
    each; and the cache's bytes then."""
    m = engine.manifest
    logits, cache = prefill_new(engine.backend, [prompt] * batch, extra=steps + 1)
    tokens = logits.argmax(-1).astype(np.int64)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = decode_step(engine.backend, cache, tokens, m.hidden_size, np.dtype(m.dtype))
        times.append(time.perf_counter() - start)
        tokens = logits.argmax(-1).astype(np.int64)
    return 1000 * median(times), 1000 * min(times), cache.nbytes


def measure_speed(engines: dict[str, Engine], batches: list[int], steps: int, rounds: int) -> list[dict[str, Any]]:
    any_engine = next(iter(engines.values()))
    contexts = {"short": any_engine.encode(SHORT_PROMPT, chat=True), "2k": long_prompts(any_engine)[0]}
    rows = []
    for context, prompt in contexts.items():
        for batch in batches:
            runs = alternate({name: functools.partial(decode_ms, engine, prompt, batch, steps)
                              for name, engine in engines.items()}, rounds)
            row = {"context": context, "prompt_tokens": len(prompt), "batch": batch, "steps": steps,
                   "rounds": rounds, "load_average": os.getloadavg()[0]}
            for name, done in runs.items():
                row[f"{name}_ms"] = median([ms for ms, _, _ in done])
                row[f"{name}_ms_rounds"] = [ms for ms, _, _ in done]
                row[f"{name}_best_ms"] = min(fastest for _, fastest, _ in done)  # the least disturbed step
                row[f"{name}_cache_bytes"] = done[-1][2]
            row["speedup"] = row["float-cache_ms"] / row["int8-cache_ms"]
            row["speedup_best"] = row["float-cache_best_ms"] / row["int8-cache_best_ms"]
            say(f"decode, {context} ({len(prompt)} tokens), batch {batch}: float {row['float-cache_ms']:.1f} ms, "
                f"int8 {row['int8-cache_ms']:.1f} ms per step (median): x{row['speedup']:.2f}; fastest step "
                f"{row['float-cache_best_ms']:.1f} / {row['int8-cache_best_ms']:.1f} ms: x{row['speedup_best']:.2f}")
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    mem = result["memory"]
    lines = ["# int8 KV cache vs float cache (int8-weight export)", "",
             f"`{result['command']}`", "",
             f"Bytes per token: float {mem['float_bytes_per_token']:,}, int8 {mem['int8_bytes_per_token']:,} "
             f"({mem['ratio']:.2f}x smaller).", "",
             "| agreement of the int8 cache with the float cache | top-1 | identical texts |", "|---|---|---|"]
    for name, a in result["agreement"].items():
        extra = f" (prefix values clipped: {a['prefix_values_clipped']:.2%})" if "prefix_values_clipped" in a else ""
        lines.append(f"| {name}{extra} | {a['top1']:.1%} | {a['identical']}/{a['prompts']} |")
    lines += ["", "| context | batch | float cache ms/step (median; fastest) | int8 cache ms/step (median; fastest) "
              "| speed-up (median; fastest) | load avg |", "|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['context']} ({r['prompt_tokens']} tokens) | {r['batch']} | {cell(r['float-cache_ms'])}; "
                     f"{cell(r['float-cache_best_ms'])} | {cell(r['int8-cache_ms'])}; {cell(r['int8-cache_best_ms'])} "
                     f"| {r['speedup']:.2f}x; {r['speedup_best']:.2f}x | {r['load_average']:.1f} |")
    lines += ["", machine_line(result["machine"]), ""]
    return "\n".join(lines)


def _where(path: Path | str) -> str:
    """A path as the results record it: relative to the checkout, else its name alone."""
    resolved = Path(path).resolve()
    return rel(resolved) if resolved.is_relative_to(ROOT) else resolved.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", nargs="?", type=Path, default=DEFAULT_EXPORT, help="a float32 export")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=BUNDLE (converted for the export)")
    parser.add_argument("--work", type=Path, default=None, help="where the two graphs are built (kept)")
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_int8")
    parser.add_argument("--speed-only", action="store_true", help="decode speed (and memory) alone")
    args = parser.parse_args()
    adapters = dict(a.split("=", 1) for a in args.adapter)
    batches = args.batch or [1, 4]
    work = args.work or Path(tempfile.mkdtemp(prefix="kv_int8-"))
    try:
        bundles = {n: Path(p) for n, p in adapters.items()}
        if args.speed_only and (work / "int8-kv8" / mf.MANIFEST_NAME).is_file():  # built by an earlier run
            weights, both = work / "int8", work / "int8-kv8"
            calibration = None
        else:
            weights, both, calibration = build(args.export, work, list(bundles.values()))
        engines = {"float-cache": Engine.load(weights, prompt_cache_bytes=0, threads=args.threads),
                   "int8-cache": Engine.load(both, prompt_cache_bytes=0, threads=args.threads)}
        fm, qm = engines["float-cache"].manifest, engines["int8-cache"].manifest
        memory = {"float_bytes_per_token": slot_bytes(fm), "int8_bytes_per_token": slot_bytes(qm),
                  "ratio": slot_bytes(fm) / slot_bytes(qm)}
        agreement_result = {} if args.speed_only else measure_agreement(engines["float-cache"],
                                                                        engines["int8-cache"], bundles)
        if bundles and not args.speed_only:  # the same adapters on scales calibrated without them (an adapter registered later)
            _, alone, _ = build(args.export, work, [], name="int8-kv8-uncovered")
            uncovered = Engine.load(alone, prompt_cache_bytes=0, threads=args.threads)
            agreement_result.update(measure_agreement(engines["float-cache"], uncovered, bundles, plain=False,
                                                      label=", scales not covering it"))
            uncovered.close()
        decode = measure_speed(engines, batches, args.steps, args.rounds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "kv_int8", "command": command("kv_int8"), "export": _where(args.export),
              "adapters": {n: _where(p) for n, p in adapters.items()}, "threads": args.threads,
              "calibration": (calibration.record() if calibration is not None
                              else (qm.kv_quantization or {}).get("calibration")),
              "memory": memory, "agreement": agreement_result,
              "decode": decode, "machine": machine("onnxruntime", "numpy"), "date": time.strftime("%Y-%m-%d")}
    for path in write_report(args.out, "kv_int8_speed" if args.speed_only else "kv_int8", result, markdown(result)):
        say(f"wrote {rel(path)}")


if __name__ == "__main__":
    main()
