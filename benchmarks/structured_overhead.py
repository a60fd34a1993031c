"""What structured output costs a decode step: the same batch of rows decoded free and under a
JSON schema, timing `DecodeBatch.sample` (the token choice, where the grammar's mask runs) and
`advance` (the model's decode step) separately, interleaved in one process.

    python -m benchmarks.structured_overhead EXPORT_DIR [--batch 8] [--steps 24] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, alternate, machine, median
from prefixport.runtime import Engine
from prefixport.runtime.generation import DecodeBatch

# Wide enough that rows do not finish their documents within the timed steps.
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"]}}}, "required": ["items"]}
FORMATS = {"free": None, "json_schema": {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}}
PROMPT = [{"role": "user", "content": "List ten fruits with a count for each, as JSON."}]


def run(engine: Engine, fmt: dict | None, batch: int, steps: int) -> tuple[list[float], list[float]]:
    """ms per sample() and per advance() over `steps` steps of `batch` rows."""
    m = engine.manifest
    rows = [engine.prepare(PROMPT, max_new_tokens=steps + 1, response_format=fmt, stop_token_ids=[])
            for _ in range(batch)]
    decode = DecodeBatch(engine.backend, engine.new_cache(), m.hidden_size, np.dtype(m.dtype), m.pad_token_id or 0)
    decode.join(rows)
    sample, advance = [], []
    for _ in range(steps):
        start = time.perf_counter()
        decode.sample()
        middle = time.perf_counter()
        decode.advance()
        sample.append((middle - start) * 1000)
        advance.append((time.perf_counter() - middle) * 1000)
    assert len(decode) == batch, "a row finished early: the timed steps had fewer rows"
    decode.close()
    return sample, advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "structured_overhead.json"))
    args = parser.parse_args()
    engine = Engine.load(args.export_dir)
    run(engine, FORMATS["json_schema"], 1, 2)  # warm-up: the grammar's vocabulary and compile
    rounds = alternate({name: functools.partial(run, engine, fmt, args.batch, args.steps)
                        for name, fmt in FORMATS.items()}, args.rounds)
    result = {name: {"sample": median([ms for sample, _ in done for ms in sample]),
                     "advance": median([ms for _, advance in done for ms in advance])}
              for name, done in rounds.items()}
    free, constrained = result["free"], result["json_schema"]
    extra = constrained["sample"] - free["sample"]
    step = free["sample"] + free["advance"]
    print(f"Batch {args.batch}, {args.rounds} rounds x {args.steps} steps, median ms per step\n")
    print("| rows | sample (token choice) | advance (model step) |")
    print("|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['sample']:.2f} | {r['advance']:.2f} |")
    print(f"\nThe grammar adds {extra:.2f} ms per step at batch {args.batch} ({extra / args.batch * 1000:.0f} µs per "
          f"row), {extra / step:.1%} of a free step.")
    Path(args.out).write_text(json.dumps({"machine": machine(), "batch": args.batch, "steps": args.steps,
                                          "rounds": args.rounds, "median_ms": result,
                                          "extra_ms_per_step": extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
