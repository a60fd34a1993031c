"""`prefixport build-engine`: a TensorRT engine from an export's model.onnx (TensorRT's Python API
and its ONNX parser). Needs the `tensorrt` extra, an NVIDIA GPU, and a plain-ONNX export
(`--no-optimize`: ONNX Runtime's fused and quantised ops are not ONNX).
"""

from __future__ import annotations

import os
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from .. import manifest as mf
from ..errors import DeviceError, EngineError
from ..runtime import cuda
from ..runtime.backends import Backend
from ..runtime.backends.tensorrt import tensorrt_module
from ..runtime.engine_cache import ENGINES_DIR, EngineRecord, engine_key, onnx_digest, save_record
from ..runtime.limits import Limits
from ..runtime.profiles import plan_profiles
from ..verification import CaseResult, backend_runner, run_cases

# RMSNorm's variance and its inverse square root stay float32 in a float16 graph (as transformers
# computes them): a hidden state over 256 would overflow float16 when squared.
FP16_KEEP_FLOAT32 = ["Pow", "ReduceMean", "Sqrt", "Reciprocal"]


def check_buildable(manifest: mf.Manifest, folder: Path) -> None:
    """TensorRT parses standard ONNX only: refuse ONNX Runtime's contrib ops, before any GPU work."""
    if manifest.fused_ops:
        ops = ", ".join(sorted(manifest.fused_ops))
        raise EngineError(f"{folder} holds ONNX Runtime's fused ops ({ops}), which TensorRT cannot parse; "
                          f"export a plain graph for TensorRT: `prefixport export DIR --no-optimize`")
    if manifest.quantization:
        raise EngineError(f"{folder} has weight-only quantised MatMulNBits, an ONNX Runtime op TensorRT "
                          "cannot parse; export without --quantize (and with --no-optimize) for TensorRT")
    if manifest.weights:
        raise EngineError(f"{folder} takes LoRA and IA3 tables (--lora), for which no TensorRT optimisation "
                          "profile is planned yet (their rank axis); build from an export without --lora, or "
                          "serve this one on ONNX Runtime (its CUDA provider included)")


def float16_graph(source: Path, target: Path) -> Path:
    """The float32 graph with float16 weights and activations, float32 inputs and outputs kept
    (so adapters and the cache stay float32), RMSNorm statistics in float32. ONNX Runtime's
    converter; TensorRT then builds it strongly typed."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    blocked = DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT32
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    drop_round_trips(half, blocked)
    # weights beside the graph (TARGET.data), so models over protobuf's 2 GB limit convert too
    onnx.save(half, str(target), save_as_external_data=True, location=target.name + ".data")
    return target


def drop_round_trips(model: Any, float32_ops: list[str]) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs: the converter casts between two adjacent
    float32 nodes through float16, where a squared hidden state overflows. A tensor is float32
    where a kept-float32 op (`float32_ops`), a Cast to float32 or a float32 graph input made it.
    Returns how many pairs were removed."""
    import onnx

    float32 = onnx.TensorProto.FLOAT
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == float32}
    outputs = {o.name for o in model.graph.output}

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def is_float32(name: str) -> bool:
        node = producer.get(name)
        return name in inputs if node is None else node.op_type in float32_ops or cast_to(node) == float32

    bypass = {}  # a float32 Cast's output -> the float32 tensor it can be replaced by
    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == float32 and first is not None and cast_to(first) == onnx.TensorProto.FLOAT16
                and is_float32(first.input[0]) and node.output[0] not in outputs):
            bypass[node.output[0]] = first.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
    used = {i for n in model.graph.node for i in n.input} | outputs
    keep = [n for n in model.graph.node if not (n.op_type == "Cast" and not any(o in used for o in n.output))]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(bypass)


def build_engine(folder: str | Path, fp16: bool = False, max_batch: int = 8, max_seq: int | None = None,
                 max_past: int | None = None, max_virtual: int | None = None, workspace_mb: int | None = None,
                 verify: bool = True, say: Callable[[str], None] = lambda message: None) -> EngineRecord:
    """Build and save `engines/KEY.plan` (+ `KEY.json`) for this GPU and TensorRT; returns its record.

    Two optimisation profiles (decode, prefill) cover zero past and zero virtual tokens. `fp16`
    on a float32 export converts the graph first (inputs and outputs stay float32); a float16
    export is built as it is. `verify`: the engine is checked against ONNX Runtime on the CPU
    (`check_backend`) and removed again when it disagrees.
    """
    folder = Path(folder)
    manifest = mf.Manifest.load(folder)
    check_buildable(manifest, folder)
    limits = Limits.for_manifest(manifest, max_batch, max_seq, max_past, max_virtual)
    trt = tensorrt_module()
    gpu = cuda.device_info()
    precision = "fp16" if fp16 or manifest.dtype == "float16" else "fp32"
    key = engine_key(gpu.slug, gpu.compute_capability, trt.__version__, precision)
    say(f"building {key} for {gpu.name} (limits: {limits})")
    start = time.perf_counter()
    digest, size, mtime = onnx_digest(folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = folder / mf.MODEL_NAME
        if precision == "fp16" and manifest.dtype == "float32":
            say("converting the graph to float16 (float32 inputs and outputs)")
            source = float16_graph(source, Path(tmp) / "model_fp16.onnx")
        plan = _build(trt, source, manifest, limits, precision, workspace_mb)
    out = folder / ENGINES_DIR
    out.mkdir(exist_ok=True)
    path = out / f"{key}.plan"
    partial = path.with_suffix(".plan.tmp")
    partial.write_bytes(plan)
    os.replace(partial, path)
    record = EngineRecord(
        key=key, plan=path.name, gpu=gpu.name, compute_capability=list(gpu.compute_capability),
        tensorrt=trt.__version__, precision=precision, limits=limits.__dict__.copy(), onnx_sha256=digest,
        onnx_bytes=size, onnx_mtime_ns=mtime, fingerprint=manifest.fingerprint,
        build_seconds=round(time.perf_counter() - start, 1), plan_bytes=len(plan),
        versions={"tensorrt": trt.__version__, "cuda-bindings": _version("cuda-bindings")},
    )
    save_record(folder, record)
    if verify:
        say("verifying the engine against ONNX Runtime on the CPU")
        try:
            record.verification = [r.as_dict() for r in _verify(folder, manifest, precision)]
        except BaseException:
            path.unlink(missing_ok=True)
            (out / f"{key}.json").unlink(missing_ok=True)
            raise
        save_record(folder, record)
    say(f"wrote {path} ({len(plan) / 1e6:.1f} MB) in {record.build_seconds:.0f}s")
    return record


# Max abs difference allowed against float32 ONNX Runtime on the CPU (logits, and KV relative to
# its largest magnitude). float16: the converted graph differed by 0.031 on the default model
# (docs/gpu.md, "Precision").
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1}


def check_backend(candidate: Backend, reference: Backend, precision: str = "fp32") -> list[CaseResult]:
    """`prefixport.verification`'s cases on both backends; an EngineError names the first case
    past TOLERANCE[precision]."""
    tolerance, results = TOLERANCE[precision], []
    for result in run_cases(backend_runner(candidate), backend_runner(reference), reference.manifest):
        results.append(result)
        if not result.within(tolerance):
            raise EngineError(f"the {precision} engine disagrees with ONNX Runtime on the CPU in case {result.name!r}:"
                              f" logits differ by {result.logits_max_abs_diff:.3g}, KV (relative) by "
                              f"{result.present_max_rel_diff:.3g} (tolerance {tolerance:g})")
    return results


def _verify(folder: Path, manifest: mf.Manifest, precision: str) -> list[CaseResult]:
    from ..runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ..runtime.backends.tensorrt import TensorRTBackend

    engine, reference = TensorRTBackend(folder, manifest, precision=precision), OnnxRuntimeBackend(folder, manifest)
    try:
        return check_backend(engine, reference, precision)
    finally:
        engine.close()
        reference.close()


def _build(trt: Any, source: Path, manifest: mf.Manifest, limits: Limits, precision: str,
           workspace_mb: int | None) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise DeviceError("TensorRT could not create a builder: no usable NVIDIA GPU or driver (see the log above)")
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:  # 11 is always strongly typed and deprecates the flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser refused {source.name}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls round to 10 mantissa bits
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for profile in plan_profiles(limits):
        p = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(manifest).items():
            p.set_shape(name, low, opt, high)
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT could not build the engine (its log above says why); try smaller limits "
                          "or a larger --workspace-mb")
    return bytes(plan)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
