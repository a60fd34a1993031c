"""ONNX Runtime session options for decode, chosen by measurement: one decode step of an export at
batch 1 and 8 (past of 64 positions), each variant in its own session, interleaved in one process
so that all see the same machine load (with a pause between them, so that one session's
spinning threads do not slow the next). Prints a Markdown table and writes JSON.

    python -m benchmarks.session_options EXPORT_DIR [--rounds 20] [--out benchmarks/results/session_options.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import RESULTS, machine
from prefixport import manifest as mf

CORES = os.cpu_count() or 1
VARIANTS: dict[str, tuple[int, dict[str, str]]] = {  # name -> (intra-op threads, session config entries)
    "default (threads = cores, spinning)": (0, {}),
    "1 thread": (1, {}),
    f"{CORES} threads, no spinning": (CORES, {"session.intra_op.allow_spinning": "0"}),
    f"{CORES} threads, dynamic block base 4": (CORES, {"session.dynamic_block_base": "4"}),
    f"{CORES} threads, denormals as zero": (CORES, {"session.set_denormal_as_zero": "1"}),
}


def _session(path: Path, threads: int, entries: dict[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _decode_feeds(m: mf.Manifest, batch: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dtype = np.dtype(m.dtype)
    feeds = {
        "input_ids": rng.integers(0, m.vocab_size, (batch, 1)),
        "prompt_embeds": np.zeros((batch, 0, m.hidden_size), dtype),
        "past_lengths": np.full(batch, past, np.int64),
        "input_lengths": np.ones(batch, np.int64),
        "logits_index": np.zeros((batch, 1), np.int64),
    }
    for name in mf.past_names(m.num_layers):  # a cache of past + 1 slots (graph contract 3)
        feeds[name] = rng.standard_normal((batch, m.num_kv_heads, past + 1, m.head_dim)).astype(dtype)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    parser.add_argument("--out", default=str(RESULTS / "session_options.json"))
    args = parser.parse_args()
    folder = Path(args.export_dir)
    m = mf.Manifest.load(folder)
    sessions = {name: _session(folder / mf.MODEL_NAME, t, e) for name, (t, e) in VARIANTS.items()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for batch in (1, 8):
        feeds = _decode_feeds(m, batch, past=64)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feeds)  # warm-up
        for _ in range(args.rounds):
            for name, session in sessions.items():
                # let the previous session's spinning pool threads go idle: they would compete
                time.sleep(0.05)
                start = time.perf_counter()
                for _ in range(args.steps):
                    session.run(None, feeds)
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
        for name, values in times.items():
            results.setdefault(name, {})[f"batch {batch}"] = {
                "median_ms": statistics.median(values), "p25_ms": float(np.percentile(values, 25)),
                "min_ms": min(values)}
    base = next(iter(results))
    print(f"Decode step (ms, past 64) of {folder.name}, {args.rounds} interleaved rounds; ratio = median vs {base}\n")
    print("| variant | batch 1 median | min | ratio | batch 8 median | min | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = []
        for b in ("batch 1", "batch 8"):
            cells += [f"{r[b]['median_ms']:.1f}", f"{r[b]['min_ms']:.1f}",
                      f"{r[b]['median_ms'] / results[base][b]['median_ms']:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"export": folder.name, "machine": machine(), "past": 64,
                                          "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
