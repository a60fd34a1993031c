"""How a batch's LoRAs reach the graph (docs/design.md, "LoRA and IA3"), measured on the LoRA part
of a decode step alone: the default model's 210 target modules (7 per layer, 30 layers), rank 16,
8 rows each with another LoRA, in ONNX Runtime on the CPU.

- rows: each row's A [B, r, in] and B [B, r, out] bound as inputs (prefixport's tables per cache
  row, written once when a request joins): x Aᵀ B per row;
- slots: one table of every resident LoRA [slots, r, in] / [slots, r, out] and a slot index per
  row, gathered inside the graph (Punica's BGMV shape; what a slot table on the device would be),
  then the same products.

    python -m benchmarks.lora_layout [--slots 16] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.common import RESULTS, command, machine, machine_line, say, write_report

HIDDEN, INTER, KV = 576, 1536, 192
MODULES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
           (INTER, HIDDEN)] * 30  # q, k, v, o, gate, up, down: (in, out)
RANK, ROWS = 16, 8


def graph(kind: str) -> onnx.ModelProto:
    """x_in [B, 1, in] per input size -> sum over modules of x Aᵀ B (one output per module)."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(f"x{d}", f, ["batch", 1, d]) for d in (HIDDEN, INTER)]
    if kind == "slots":
        inputs.append(helper.make_tensor_value_info("slot", TensorProto.INT64, ["batch"]))
    nodes, outputs = [], []
    for i, (d_in, d_out) in enumerate(MODULES):
        first = "batch" if kind == "rows" else "slots"
        inputs += [helper.make_tensor_value_info(f"a{i}", f, [first, RANK, d_in]),
                   helper.make_tensor_value_info(f"b{i}", f, [first, RANK, d_out])]
        a, b = f"a{i}", f"b{i}"
        if kind == "slots":
            nodes += [helper.make_node("Gather", [a, "slot"], [f"ga{i}"], axis=0),
                      helper.make_node("Gather", [b, "slot"], [f"gb{i}"], axis=0)]
            a, b = f"ga{i}", f"gb{i}"
        nodes += [helper.make_node("Transpose", [a], [f"at{i}"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", [f"x{d_in}", f"at{i}"], [f"t{i}"]),
                  helper.make_node("MatMul", [f"t{i}", b], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", f, ["batch", 1, d_out]))
    model = helper.make_model(helper.make_graph(nodes, kind, inputs, outputs), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=16, help="LoRAs resident in the slot table")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "lora_layout"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions, feeds = {}, {}
    for kind in ("rows", "slots"):
        sessions[kind] = ort.InferenceSession(graph(kind).SerializeToString(), options,
                                              providers=["CPUExecutionProvider"])
        first = ROWS if kind == "rows" else args.slots
        feed = {f"x{d}": rng.standard_normal((ROWS, 1, d)).astype(np.float32) for d in (HIDDEN, INTER)}
        for i, (d_in, d_out) in enumerate(MODULES):
            feed[f"a{i}"] = (0.01 * rng.standard_normal((first, RANK, d_in))).astype(np.float32)
            feed[f"b{i}"] = (0.01 * rng.standard_normal((first, RANK, d_out))).astype(np.float32)
        if kind == "slots":
            feed["slot"] = np.arange(1, ROWS + 1, dtype=np.int64)  # 8 rows, 8 different LoRAs
        feeds[kind] = feed
    bindings = {}
    for kind, session in sessions.items():  # inputs bound once, as the runtime binds its tables
        binding = session.io_binding()
        for name, value in feeds[kind].items():
            binding.bind_cpu_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)
        bindings[kind] = binding
    times: dict[str, list[float]] = {"rows": [], "slots": []}
    for r in range(args.rounds):
        for kind in (("rows", "slots") if r % 2 == 0 else ("slots", "rows")):
            start = time.perf_counter()
            for _ in range(args.runs):
                sessions[kind].run_with_iobinding(bindings[kind])
            times[kind].append((time.perf_counter() - start) / args.runs * 1e3)
    rows, slots = statistics.median(times["rows"]), statistics.median(times["slots"])
    table_mb = sum(RANK * (i + o) * 4 for i, o in MODULES) / 1e6
    result = {"command": command("lora_layout"), "machine": machine(), "rows_ms": rows, "slots_ms": slots,
              "ratio": slots / rows, "rounds": times, "lora_mb": table_mb, "slots": args.slots}
    text = (f"# LoRA layout: per-row tables against a gathered slot table ({machine_line(result['machine'])})\n\n"
            f"Command: `{result['command']}`\n\n"
            f"The LoRA part of a decode step, 8 rows, 8 different rank-16 LoRAs on the default model's 210 "
            f"modules ({table_mb:.1f} MB each), {args.threads} threads, median of {args.rounds} rounds of "
            f"{args.runs} runs:\n\n| layout | ms per step |\n|---|---|\n| per-row tables (bound) | {rows:.2f} |\n"
            f"| slot table + Gather ({args.slots} slots) | {slots:.2f} ({slots / rows:.2f}x) |\n")
    print(text)
    say(f"rows {rows:.2f} ms, slots {slots:.2f} ms")
    write_report(Path(args.out), "lora_layout", result, text)


if __name__ == "__main__":
    main()
