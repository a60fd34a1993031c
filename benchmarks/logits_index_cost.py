"""What `logits_index` (graph contract 3) costs a decode step: the same model exported under
contract 2 (last position computed in the graph) and contract 3 (positions fed as an input),
one decode step each through ONNX Runtime with IO binding (cache bound as past and present in
place, as the runtime does), interleaved in one process so both see the same machine load.

    python -m benchmarks.logits_index_cost OLD_EXPORT NEW_EXPORT [--rounds 30] [--out ...json]

OLD_EXPORT: an export made by prefixport at commit 0e89d9b (contract 2), e.g.
`git worktree add /tmp/c2 0e89d9b && PYTHONPATH=/tmp/c2 python -m prefixport.cli export OLD_EXPORT`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import RESULTS, machine
from prefixport import manifest as mf

CASES = [(1, 64), (1, 1024), (8, 64), (8, 1024)]  # (batch, filled slots)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / mf.MANIFEST_NAME).read_text())


class Step:
    """One decode step of an export at (batch, past), bound once and run again and again."""

    def __init__(self, folder: Path, batch: int, past: int) -> None:
        m = _manifest(folder)
        self.session = ort.InferenceSession(str(folder / mf.MODEL_NAME), providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, m["vocab_size"], (batch, 1)),
                 "prompt_embeds": np.zeros((batch, 0, m["hidden_size"]), np.float32),
                 "past_lengths": np.full(batch, past, np.int64), "input_lengths": np.ones(batch, np.int64),
                 "logits_index": np.zeros((batch, 1), np.int64)}
        self.binding = self.session.io_binding()
        self.keep = []
        for name in names:
            if name in feeds:
                self.binding.bind_cpu_input(name, feeds[name])
        shape = (batch, m["num_kv_heads"], past + 1, m["head_dim"])
        for layer in range(m["num_layers"]):
            for kind in ("key", "value"):
                buffer = rng.standard_normal(shape).astype(np.float32)
                self.keep.append(buffer)
                self.binding.bind_cpu_input(f"past_key_values.{layer}.{kind}", buffer)
                self.binding.bind_output(f"present.{layer}.{kind}", "cpu", 0, np.float32, shape, buffer.ctypes.data)
        self.logits = np.empty((batch, 1, m["vocab_size"]), np.float32)
        self.binding.bind_output("logits", "cpu", 0, np.float32, self.logits.shape, self.logits.ctypes.data)
        self.has_index = "logits_index" in names

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old_export")
    parser.add_argument("new_export")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    parser.add_argument("--out", default=str(RESULTS / "logits_index_cost.json"))
    args = parser.parse_args()
    folders = {"contract 2": Path(args.old_export), "contract 3 (logits_index)": Path(args.new_export)}
    versions = {name: _manifest(f)["format_version"] for name, f in folders.items()}
    assert versions == {"contract 2": 2, "contract 3 (logits_index)": 3}, versions
    results: dict[str, dict[str, float]] = {}
    for batch, past in CASES:
        steps = {name: Step(folder, batch, past) for name, folder in folders.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            step.run()
        for _ in range(args.rounds):
            for name, step in steps.items():
                time.sleep(0.02)  # the other session's spinning threads go idle first
                start = time.perf_counter()
                for _ in range(args.steps):
                    step.run()
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
        case = f"batch {batch}, past {past}"
        results[case] = {name: statistics.median(v) for name, v in times.items()}
        results[case]["ratio"] = results[case]["contract 3 (logits_index)"] / results[case]["contract 2"]
    print(f"Decode step, median ms over {args.rounds} interleaved rounds of {args.steps} steps\n")
    print("| case | contract 2 | contract 3 | ratio |")
    print("|---|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['contract 2']:.2f} | {r['contract 3 (logits_index)']:.2f} | {r['ratio']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "steps": args.steps,
                                          "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
