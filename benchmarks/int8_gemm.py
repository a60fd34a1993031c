"""Would an integer GEMM prefill faster than MatMulNBits at the same accuracy? (docs/export.md,
"Quantisation": "Prefill and integer GEMMs"). A one-off study: the int8 export's MatMulNBits
(blocks of 32, int8 dot products) against the float export and against weight-and-activation int8
graphs built here from the float export with ONNX Runtime's integer MatMuls:

- `dynamic` (per-tensor activations): `onnxruntime.quantization.quantize_dynamic`, per-channel
  weights, s8 (u8 x s8 products), s8 with 7-bit weights (`reduce_range`), or u8 (u8 x u8);
- `per-token`: each MatMul's activation quantised per row (its own scale: |x| max / 127, u8 with
  zero point 128) against per-column symmetric int8 weights (u8, zero point 128), `MatMulInteger`
  then the two scales; optionally with SmoothQuant's per-channel migration (alpha 0.5, activation
  maxima calibrated on `kv_quant.CALIBRATION`); and, to see which side loses, the same weights
  with float activations and the same activations with float weights.

Each is timed on one process, sides interleaved (pool threads spinning during runs only): a fresh
512-token prefill, and a decode step at batch 1 and 16 over a past of 700 (the mean of 8); and judged by greedy agreement with the float export (the
project's 4 prompts and the 8 held-out ones of kv_int8.py, 48 tokens each).

    python -m benchmarks.int8_gemm [--float exports/smollm2-135m-instruct]
        [--int8 exports/smollm2-135m-instruct-int8] [--rounds 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from benchmarks.common import RESULTS, alternate, command, machine, machine_line, median, rel, say, write_report
from benchmarks.kv_int8 import HELD_OUT
from prefixport import manifest as mf
from prefixport.exporter import optimize as opt
from prefixport.exporter.kv_quant import CALIBRATION
from prefixport.runtime import Engine
from prefixport.runtime.agreement import PROMPTS, agreement
from prefixport.runtime.generation import decode_step, prefill
from prefixport.runtime.kv_cache import CacheSettings, KVCache

ROWS, PAST, PROMPT, TOKENS = 16, 700, 512, 48


def _copy_folder(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name != mf.MODEL_NAME:
            shutil.copy(path, target / path.name)


def _packed(source: Path):
    """The float graph with MatMuls sharing an input packed and the tied lm_head untied (as --quantize does)."""
    import onnx_ir as ir

    model = ir.load(source / mf.MODEL_NAME)
    opt.pack_matmuls(model.graph)
    opt.untie_transposed_weights(model.graph)
    return model


def dynamic(source: Path, target: Path, weights: str) -> None:
    """quantize_dynamic: per-tensor u8 activations, per-channel weights ("s8", "s8-7bit", "u8")."""
    import onnx_ir as ir
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _copy_folder(source, target)
    ir.save(_packed(source), target / "float.onnx")
    quantize_dynamic(target / "float.onnx", target / mf.MODEL_NAME, per_channel=True, reduce_range=weights == "s8-7bit",
                     weight_type=QuantType.QUInt8 if weights == "u8" else QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    (target / "float.onnx").unlink()


def activation_maxima(source: Path) -> dict[str, np.ndarray]:
    """Per-channel |x| maxima of every weight MatMul's input over CALIBRATION (chat and raw in turn,
    each continued by 96 greedy tokens), one whole-sequence run each."""
    import onnx_ir as ir
    import onnxruntime as ort

    engine = Engine.load(source)
    m = engine.manifest
    sequences = []
    for i, prompt in enumerate(CALIBRATION):
        ids = engine.encode(prompt, chat=i % 2 == 0)
        sequences.append(list(ids) + engine.generate(ids, max_new_tokens=96).token_ids)
    engine.close()
    model = _packed(source)
    names = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None and node.inputs[0].name not in names:
            names.append(node.inputs[0].name)
            model.graph.outputs.append(node.inputs[0])
    with TemporaryDirectory() as tmp:
        ir.save(model, Path(tmp) / "calibration.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "calibration.onnx"))
    maxima: dict[str, np.ndarray] = {}
    for ids in sequences:
        n = len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "prompt_embeds": np.zeros((1, 0, m.hidden_size), np.float32),
                "past_lengths": np.zeros(1, np.int64), "input_lengths": np.array([n], np.int64),
                "logits_index": np.array([[n - 1]], np.int64)}
        for name in mf.past_names(m.num_layers):
            feed[name] = np.zeros((1, m.num_kv_heads, n, m.head_dim), np.float32)
        for name, value in zip(names, session.run(names, feed)):
            maxima[name] = np.maximum(maxima.get(name, 0), np.abs(value.reshape(-1, value.shape[-1])).max(0))
    return maxima


def per_token(source: Path, target: Path, mode: str = "int8", maxima: dict[str, np.ndarray] | None = None,
              alpha: float = 0.5) -> None:
    """Every weight MatMul as per-row u8 activations x per-column int8 weights (`MatMulInteger`,
    zero points 128); `maxima` given: SmoothQuant's migration first. `mode` "weights" keeps float
    activations (the weights rounded to int8 and back), "activations" float weights."""
    import onnx_ir as ir

    _copy_folder(source, target)
    model = _packed(source)
    graph = model.graph

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    inv127, c127, c128, half, eps = (const(f"w8a8.{n}", np.array(v, np.float32)) for n, v in
                                     (("inv127", 1 / 127), ("c127", 127), ("c128", 128), ("half", 128.5), ("eps", 1e-10)))
    zero_point, axes = const("w8a8.zp", np.array(128, np.uint8)), const("w8a8.axes", np.array([-1], np.int64))
    for node in [n for n in graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]:
        weight = node.inputs[1].const_value.numpy().astype(np.float32)
        x, name, new = node.inputs[0], node.name, []
        if maxima is not None and x.name in maxima:
            smooth = np.maximum(maxima[x.name], 1e-5) ** alpha / np.maximum(np.abs(weight).max(1), 1e-5) ** (1 - alpha)
            smooth = np.clip(smooth, 1e-3, 1e3).astype(np.float32)
            weight = weight * smooth[:, None]
            new.append(ir.Node("", "Mul", [x, const(f"{name}.smooth", 1 / smooth)], name=f"{name}.smooth"))
            x = new[-1].outputs[0]
        scale_w = np.maximum(np.abs(weight).max(0), 1e-12) / 127
        q_weight = np.clip(np.round(weight / scale_w), -127, 127)
        if mode == "weights":
            node.replace_input_with(1, const(f"{name}.w", (q_weight * scale_w).astype(np.float32)))
            graph.insert_before(node, new)
            node.replace_input_with(0, x)
            continue
        # per row: s = max|x| / 127; q = round(x / s) + 128 (in 1..255: no clipping)
        absolute = ir.Node("", "Abs", [x], name=f"{name}.abs")
        top = ir.Node("", "ReduceMax", [absolute.outputs[0], axes], attributes=[ir.AttrInt64("keepdims", 1)],
                      name=f"{name}.max")
        top_eps = ir.Node("", "Max", [top.outputs[0], eps], name=f"{name}.eps")
        scale = ir.Node("", "Mul", [top_eps.outputs[0], inv127], name=f"{name}.scale")
        inverse = ir.Node("", "Div", [c127, top_eps.outputs[0]], name=f"{name}.inverse")
        scaled = ir.Node("", "Mul", [x, inverse.outputs[0]], name=f"{name}.scaled")
        shifted = ir.Node("", "Add", [scaled.outputs[0], half], name=f"{name}.shifted")
        q = ir.Node("", "Cast", [shifted.outputs[0]], attributes=[ir.AttrInt64("to", 2)], name=f"{name}.q")  # uint8
        new += [absolute, top, top_eps, scale, inverse, scaled, shifted, q]
        if mode == "activations":
            back = ir.Node("", "Cast", [q.outputs[0]], attributes=[ir.AttrInt64("to", 1)], name=f"{name}.back")
            centred = ir.Node("", "Sub", [back.outputs[0], c128], name=f"{name}.centred")
            dequantised = ir.Node("", "Mul", [centred.outputs[0], scale.outputs[0]], name=f"{name}.x")
            graph.insert_before(node, [*new, back, centred, dequantised])
            node.replace_input_with(0, dequantised.outputs[0])
            node.replace_input_with(1, const(f"{name}.w", weight))
            continue
        product = ir.Node("", "MatMulInteger", [q.outputs[0], const(f"{name}.wq", (q_weight + 128).astype(np.uint8)),
                                                zero_point, zero_point], name=f"{name}.int")
        as_float = ir.Node("", "Cast", [product.outputs[0]], attributes=[ir.AttrInt64("to", 1)], name=f"{name}.float")
        by_column = ir.Node("", "Mul", [as_float.outputs[0], const(f"{name}.ws", scale_w.astype(np.float32))],
                            name=f"{name}.columns")
        out = ir.Node("", "Mul", [by_column.outputs[0], scale.outputs[0]], name=f"{name}.rows")
        graph.insert_before(node, [*new, product, as_float, by_column, out])
        old = node.outputs[0]
        if old.is_graph_output():  # the logits: the new value takes the contract's name
            old_name, old.name = old.name, f"{old.name}.replaced"
            ir.convenience.replace_all_uses_with(old, out.outputs[0], replace_graph_outputs=True)
            out.outputs[0].name = old_name
        else:
            ir.convenience.replace_all_uses_with(old, out.outputs[0])
        graph.remove(node, safe=True)
    ir.save(model, target / mf.MODEL_NAME)


class Timing:
    """One variant's engine and cache: 16 rows at a past of 700, a spare row for prefills."""

    def __init__(self, folder: Path, threads: int, rng: np.random.Generator) -> None:
        # sessions taking turns in one process: pool threads spin during a run only (else they steal the cores)
        self.engine = Engine.load(folder, threads=threads, prompt_cache_bytes=0, spinning="run")
        m = self.engine.manifest
        self.hidden, self.dtype = m.hidden_size, np.dtype(m.dtype)
        self.none = np.zeros((1, 0, m.hidden_size), self.dtype)
        self.cache = KVCache(self.engine.backend, m, CacheSettings(max_rows=ROWS + 1, budget_mb=None), PAST + 64)
        for _ in range(ROWS + 1):
            self.cache.admit(PAST + 60)
        self.ids = rng.integers(1000, 40000, PAST).tolist()
        for row in range(ROWS):
            prefill(self.engine.backend, self.cache, row, [self.ids], self.none, 0)

    def prefill_ms(self) -> float:
        self.cache.lengths[ROWS] = 0
        start = time.perf_counter()
        prefill(self.engine.backend, self.cache, ROWS, [self.ids[:PROMPT]], self.none, 0)
        return (time.perf_counter() - start) * 1e3

    def decode_ms(self, batch: int, steps: int = 8) -> float:
        """The mean of `steps` decode steps over the rows' past of 700."""
        self.cache.lengths[:batch] = PAST
        tokens = np.arange(batch, dtype=np.int64) + 5
        decode_step(self.engine.backend, self.cache, tokens, self.hidden, self.dtype)  # the weights back in cache
        start = time.perf_counter()
        for _ in range(steps):
            decode_step(self.engine.backend, self.cache, tokens, self.hidden, self.dtype)
        return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float", dest="float_dir", default="exports/smollm2-135m-instruct")
    parser.add_argument("--int8", default="exports/smollm2-135m-instruct-int8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "int8_gemm"))
    args = parser.parse_args()
    logging.getLogger("root").setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    source = Path(args.float_dir)
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        say("building the variants")
        folders = {"float32": source, "MatMulNBits int8 (--quantize int8)": Path(args.int8)}
        for label, weights in (("dynamic per-tensor, s8 weights", "s8"),
                               ("dynamic per-tensor, s8 7-bit weights", "s8-7bit"),
                               ("dynamic per-tensor, u8 weights", "u8")):
            dynamic(source, work / weights, weights)
            folders[label] = work / weights
        per_token(source, work / "per-token")
        folders["per-token u8 x u8 (MatMulInteger)"] = work / "per-token"
        per_token(source, work / "smooth", maxima=activation_maxima(source))
        folders["per-token, SmoothQuant alpha 0.5"] = work / "smooth"
        per_token(source, work / "weights", mode="weights")
        folders["per-channel int8 weights, float activations"] = work / "weights"
        per_token(source, work / "activations", mode="activations")
        folders["per-token int8 activations, float weights"] = work / "activations"

        say("agreement with float32")
        reference = Engine.load(source)
        prompts = [reference.encode(p, chat=True) for p in PROMPTS + HELD_OUT]
        m = reference.manifest
        results: dict[str, dict] = {}
        for label, folder in folders.items():
            if folder is source:
                continue
            candidate = Engine.load(folder)
            found = agreement(reference.backend, candidate.backend, prompts, TOKENS, m.hidden_size, np.dtype(m.dtype))
            results[label] = {"top1": found.top1, "identical": found.identical, "prompts": found.prompts}
            candidate.close()
            say(f"   {label}: {found.summary()}")
        reference.close()

        say("timing (interleaved)")
        timed = {label: folder for label, folder in folders.items()
                 if "float activations" not in label and "float weights" not in label}
        rng = np.random.default_rng(0)
        timings = {label: Timing(folder, args.threads, rng) for label, folder in timed.items()}
        for what, call in (("prefill_ms", lambda t: t.prefill_ms()), ("decode_b1_ms", lambda t: t.decode_ms(1)),
                           (f"decode_b{ROWS}_ms", lambda t: t.decode_ms(ROWS))):
            figures = alternate({label: (lambda t=t: call(t)) for label, t in timings.items()}, args.rounds + 1)
            for label, values in figures.items():
                results.setdefault(label, {})[what] = median(values[1:])
            say(f"   {what}: " + ", ".join(f"{label} {median(v[1:]):.1f}" for label, v in figures.items()))

    info = machine("onnxruntime")
    lines = [f"Prefill and integer GEMMs ({machine_line(info)}); {args.threads} threads, medians of {args.rounds} "
             f"interleaved rounds; agreement: teacher-forced top-1 with float32 over {len(prompts)} chat prompts x "
             f"{TOKENS} tokens", "",
             f"| graph | prefill {PROMPT} tokens (ms) | tokens/s | decode b1 (ms) | decode b{ROWS}, past {PAST} (ms) | "
             "top-1 agreement |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        timing = (f"{r['prefill_ms']:.0f} | {PROMPT / r['prefill_ms'] * 1e3:.0f} | {r['decode_b1_ms']:.1f} | "
                  f"{r[f'decode_b{ROWS}_ms']:.1f}" if "prefill_ms" in r else "– | – | – | –")
        top1 = f"{r['top1']:.1%}" if "top1" in r else "–"
        lines.append(f"| {label} | {timing} | {top1} |")
    text = "\n".join(lines) + "\n"
    write_report(Path(args.out), "int8_gemm", {"command": command("int8_gemm"), "float": rel(source),
                                               "int8": rel(args.int8), "threads": args.threads, "rounds": args.rounds,
                                               "machine": info, "results": results}, text)
    print(text)


if __name__ == "__main__":
    main()
