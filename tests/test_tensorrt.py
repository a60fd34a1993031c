"""TensorRT and the GPU paths: what the CPU can check (profile planning against the shapes real
generation feeds, the engine cache and its refusals, the float16 graph TensorRT builds from,
backend selection and the errors where TensorRT, onnxruntime-gpu or a GPU is missing), and the
GPU parity tests, which skip with the reason where there is no GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from prefixport import manifest as mf
from prefixport.adapters import load_bundle
from prefixport.engines import Limits, choose_profile, engine_key, find_engine, plan_profiles
from prefixport.engines.build import build_engine, check_buildable, float16_graph
from prefixport.errors import DeviceError, EngineError, InputError, PrefixportError
from prefixport.exporter import export_model
from prefixport.runtime import BackendSettings, Engine
from prefixport.runtime.backends.onnxruntime import tensorrt_limits, tensorrt_provider_options
from prefixport.runtime.engine_cache import EngineRecord, onnx_digest, save_record
from prefixport.runtime.profiles import union_shapes

PROMPTS = ["The quick brown fox", "Once upon a time", "A B C D E F G"]


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _gpu() -> str | None:
    """The reason GPU tests cannot run here, or None when they can."""
    if not _has("tensorrt"):
        return "TensorRT is not installed (pip install 'prefixport[tensorrt]')"
    from prefixport.runtime import cuda

    try:
        cuda.device_info()
    except PrefixportError as e:
        return str(e)
    return None


def _ort_gpu(provider: str) -> str | None:
    import onnxruntime as ort

    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if name not in ort.get_available_providers():
        return f"{name} needs onnxruntime-gpu and an NVIDIA GPU (this onnxruntime has none)"
    return None


# --- profiles ----------------------------------------------------------------------------------


def test_limits_are_checked_against_the_model(plain_export):
    m = mf.Manifest.load(plain_export)
    limits = Limits.for_manifest(m)
    assert limits.context == min(2048, m.max_positions)
    with pytest.raises(InputError, match="exceeds the model's context"):
        Limits.for_manifest(m, max_past=m.max_positions)
    with pytest.raises(InputError, match="positive integer"):
        Limits.for_manifest(m, max_batch=0)
    with pytest.raises(InputError, match="must not exceed max_past"):
        Limits.for_manifest(m, max_seq=64, max_past=32)


def test_profiles_cover_every_input_with_zero_virtual_and_no_tokens(plain_export):
    m = mf.Manifest.load(plain_export)
    limits = Limits.for_manifest(m, max_batch=4, max_seq=64, max_past=200, max_virtual=16)
    decode, prefill = plan_profiles(limits)
    for profile in (decode, prefill):
        shapes = profile.shapes(m)
        assert set(shapes) == set(m.inputs)  # TensorRT needs a range for every dynamic input
        for low, opt, high in shapes.values():
            assert all(0 <= a <= b <= c for a, b, c in zip(low, opt, high))
    p = prefill.shapes(m)
    assert p["prompt_embeds"][0][1] == 0  # zero virtual
    assert p["input_ids"][0][1] == 0  # a soft prompt alone (baking a prefix)
    assert p[mf.past_key_name(0)][2][2] == 201  # a prompt may join a cache as wide as the context
    d = decode.shapes(m)
    assert d["input_ids"] == ((1, 1), (2, 1), (4, 1)) and d["prompt_embeds"][2][1] == 0
    assert d[mf.past_key_name(0)][2][2] == 201 and d["past_lengths"] == ((1,), (2,), (4,))
    union = union_shapes([decode, prefill], m)
    assert union["input_ids"] == ((1, 0), (2, 1), (4, 64))


def test_profiles_hold_every_call_real_generation_makes(plain_export, tiny_adapters):
    """Every backend call of prefill (with a soft prompt, a prefix, baking a prefix), decode and
    mixed batches falls inside a planned profile, dimension by dimension."""
    engine = Engine.load(plain_export)
    m = engine.manifest
    work = tiny_adapters("llama")
    for name in ("prompt", "prefix"):
        engine.add_adapter(name, work / f"{name}.safetensors")
    engine.add_adapter("baked", bundle=engine.bake_prefix(load_bundle(work / "prompt.safetensors")))
    limits = Limits.for_manifest(m, max_batch=4, max_seq=64, max_past=127, max_virtual=32)
    profiles = plan_profiles(limits)
    calls = []
    run = engine.backend.run

    def recording(inputs, past, present, weights=()):
        calls.append(({n: tuple(np.shape(v)) for n, v in inputs.items()}, tuple(past[0].shape)))
        return run(inputs, past, present, weights)

    engine.backend.run = recording
    engine.bake_prefix(load_bundle(work / "prompt.safetensors"))  # seq 0: the soft prompt alone
    engine.generate_batch(PROMPTS, adapters=["prompt", "prefix", None], max_new_tokens=6, stop_token_ids=[])
    engine.generate(PROMPTS[0], adapter="baked", max_new_tokens=4, stop_token_ids=[])
    assert len(calls) > 10
    kinds = set()
    for shapes, past in calls:
        batch, seq = shapes["input_ids"]
        virtual = shapes["prompt_embeds"][1]
        index = choose_profile(profiles, batch, seq, virtual, past[2])
        kinds.add(profiles[index].name)
        ranges = profiles[index].shapes(m)
        for name, shape in list(shapes.items()) + [(mf.past_key_name(0), past)]:
            low, _, high = ranges[name]
            assert all(a <= s <= b for a, s, b in zip(low, shape, high)), (name, shape, low, high)
    assert kinds == {"decode", "prefill"}


def test_a_call_outside_the_profiles_names_the_limit():
    profiles = plan_profiles(Limits(max_batch=4, max_seq=64, max_past=127, max_virtual=16))
    with pytest.raises(EngineError, match="batch 9.*rebuild it with larger limits"):
        choose_profile(profiles, 9, 1, 0, 10)
    with pytest.raises(EngineError, match="a cache of 500 slots"):
        choose_profile(profiles, 1, 1, 0, 500)
    assert profiles[choose_profile(profiles, 1, 20, 16, 64)].name == "prefill"
    assert profiles[choose_profile(profiles, 3, 1, 0, 128)].name == "decode"


def test_onnxruntime_tensorrt_options_spell_the_profile(plain_export):
    m = mf.Manifest.load(plain_export)
    options = tensorrt_provider_options(plain_export, m, tensorrt_limits(m))
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"].endswith("engines/onnxruntime-trt")
    parsed = {}
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        parsed[key] = dict(item.split(":") for item in options[key].split(","))
        assert set(parsed[key]) == set(m.inputs)
    assert parsed["trt_profile_min_shapes"]["input_ids"] == "1x0"
    assert parsed["trt_profile_max_shapes"][mf.past_key_name(0)] == f"8x{m.num_kv_heads}x{Limits.for_manifest(m).context}x{m.head_dim}"


def test_engine_limits_bound_requests_before_any_work(plain_export, tiny_adapters):
    """A backend built for less than the model (a TensorRT engine's limits, set here on the CPU
    backend, which honours whatever limits it carries) bounds requests, batches, the scheduler's
    batch and adapters, each with an error naming the flag to rebuild with; within them, the
    outputs are the unbounded engine's."""
    from prefixport.errors import AdapterError, ContextLengthError
    from prefixport.runtime import Scheduler

    work = tiny_adapters("llama")
    engine = Engine.load(plain_export)
    engine.backend.limits = Limits(max_batch=2, max_seq=20, max_past=63, max_virtual=4)
    assert engine.context_limit == 64 and engine.max_batch == 2
    with pytest.raises(ContextLengthError, match="exceed the TensorRT engine's context of 64 positions"):
        engine.generate("a b c", max_new_tokens=70)
    with pytest.raises(ContextLengthError, match="max_seq 20.*--max-seq"):
        engine.generate(list(range(1, 25)), max_new_tokens=2)
    with pytest.raises(InputError, match="at most 2 rows.*--max-batch"):
        engine.generate_batch(PROMPTS, max_new_tokens=2)
    with pytest.raises(PrefixportError, match="exceeds the TensorRT engine's 2 rows"):
        Scheduler(engine, max_batch=4)
    with pytest.raises(AdapterError, match="6 virtual tokens.*max_virtual 4.*--max-virtual"):
        engine.add_adapter("prompt", work / "prompt.safetensors")
    assert engine.adapters == []  # nothing half-registered
    kw = dict(max_new_tokens=6, stop_token_ids=[])
    bounded = [r.token_ids for r in engine.generate_batch(PROMPTS[:2], **kw)]
    assert bounded == [r.token_ids for r in Engine.load(plain_export).generate_batch(PROMPTS[:2], **kw)]


# --- the engine cache --------------------------------------------------------------------------


def _record(folder: Path, manifest: mf.Manifest, gpu: str = "nvidia-h200", cc=(9, 0), trt="11.4.0.106",
            precision: str = "fp32", **overrides) -> EngineRecord:
    key = engine_key(gpu, cc, trt, precision)
    digest, size, mtime = onnx_digest(folder)
    fields = dict(key=key, plan=f"{key}.plan", gpu=gpu.upper(), compute_capability=list(cc), tensorrt=trt,
                  precision=precision, limits=Limits.for_manifest(manifest).__dict__.copy(), onnx_sha256=digest,
                  onnx_bytes=size, onnx_mtime_ns=mtime, fingerprint=manifest.fingerprint) | overrides
    record = EngineRecord(**fields)
    (folder / "engines").mkdir(exist_ok=True)
    (folder / "engines" / record.plan).write_bytes(b"a plan TensorRT would deserialize")
    save_record(folder, record)
    return record


def test_engine_key_names_gpu_capability_tensorrt_and_precision():
    assert engine_key("nvidia-h200", (9, 0), "11.4.0.106", "fp16") == "nvidia-h200-sm90-trt11.4.0.106-fp16"


HERE = dict(gpu_slug="nvidia-h200", gpu_name="NVIDIA H200", compute_capability=(9, 0), tensorrt_version="11.4.0.106")


@pytest.fixture
def copied(tmp_path, plain_export) -> tuple[Path, mf.Manifest]:
    """A copy of the plain export, free to get engine records and a changed model.onnx."""
    folder = tmp_path / "export"
    shutil.copytree(plain_export, folder)
    return folder, mf.Manifest.load(folder)


def test_find_engine_picks_this_machines_engine_and_refuses_others(copied):
    folder, m = copied
    here = HERE
    with pytest.raises(EngineError, match="has no TensorRT engine; build one on this machine"):
        find_engine(folder, m, **here)
    _record(folder, m, gpu="nvidia-a100-sxm4-80gb", cc=(8, 0))
    _record(folder, m, trt="10.13.0.35")
    with pytest.raises(EngineError) as refused:
        find_engine(folder, m, **here)
    message = str(refused.value)
    assert "fits this machine: NVIDIA H200, compute capability 9.0, TensorRT 11.4.0.106" in message
    assert "nvidia-a100-sxm4-80gb-sm80" in message and "trt10.13.0.35" in message
    assert "prefixport build-engine" in message
    fp16 = _record(folder, m, precision="fp16")
    assert find_engine(folder, m, **here).key == fp16.key
    fp32 = _record(folder, m)
    assert find_engine(folder, m, **here).key == fp32.key  # exact first
    assert find_engine(folder, m, **here, precision="fp16").key == fp16.key


def test_find_engine_refuses_a_stale_or_broken_engine(copied):
    folder, m = copied
    here = HERE
    record = _record(folder, m, fingerprint="sha256:another-model")
    with pytest.raises(EngineError, match="built for another base model"):
        find_engine(folder, m, **here)
    record = _record(folder, m)
    (folder / "engines" / record.plan).unlink()
    with pytest.raises(EngineError, match="which is missing"):
        find_engine(folder, m, **here)
    record = _record(folder, m)
    os.utime(folder / mf.MODEL_NAME)  # touched, same bytes: still accepted (the digest is checked)
    assert find_engine(folder, m, **here).key == record.key
    with open(folder / mf.MODEL_NAME, "ab") as f:  # the export changed since the build
        f.write(b"\0")
    with pytest.raises(EngineError, match="built from another model.onnx"):
        find_engine(folder, m, **here)
    (folder / "engines" / f"{record.key}.json").write_text("{not json")
    with pytest.raises(EngineError, match="not a readable engine record"):
        find_engine(folder, m, **here)


# The "Y" rows of onnx-tensorrt's operator support matrix (docs/operators.md, TensorRT 8.5, opset 17;
# later releases only add operators).
TENSORRT_ONNX_OPS = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_plain_graph_uses_only_what_tensorrt_parses(tmp_path, plain_export, half):
    """Every operator of a `--no-optimize` export (and of its float16 conversion) is in TensorRT's
    ONNX support matrix, with the constant `axes` its parser requires of Slice/Squeeze/Unsqueeze."""
    path = plain_export / mf.MODEL_NAME
    if half:
        path = float16_graph(path, tmp_path / "half.onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    assert {n.op_type for n in graph.node} <= TENSORRT_ONNX_OPS
    constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        axes = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1}.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes]:
            assert node.input[axes] in constant, node.name


# --- building ----------------------------------------------------------------------------------


def test_build_refuses_onnxruntime_only_graphs_before_any_gpu_work(tiny_export, plain_export):
    fused = tiny_export("llama")
    with pytest.raises(EngineError, match="fused ops .*GroupQueryAttention.*--no-optimize"):
        build_engine(fused)
    m = mf.Manifest.load(plain_export)
    m.quantization = {"bits": 8}
    with pytest.raises(EngineError, match="MatMulNBits"):
        check_buildable(m, plain_export)


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed here: the build itself is tested on the GPU")
def test_build_without_tensorrt_says_how_to_install(plain_export):
    with pytest.raises(DeviceError, match=r"TensorRT is not installed.*prefixport\[tensorrt\]"):
        build_engine(plain_export)
    with pytest.raises(DeviceError, match="TensorRT is not installed"):
        Engine.load(plain_export, backend="tensorrt")


def test_float16_graph_keeps_float32_io_and_agrees(tmp_path, plain_export):
    """The graph `build-engine --fp16` hands TensorRT, run here by ONNX Runtime: float32 inputs
    and outputs (adapters unchanged), float16 weights, RMSNorm statistics in float32."""
    folder = tmp_path / "half"
    shutil.copytree(plain_export, folder)
    float16_graph(plain_export / mf.MODEL_NAME, folder / mf.MODEL_NAME)
    graph = onnx.load(str(folder / mf.MODEL_NAME)).graph
    io = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert io["prompt_embeds"] == io["past_key_values.0.key"] == io["logits"] == onnx.TensorProto.FLOAT
    assert {t.data_type for t in graph.initializer if t.dims and len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # no float32 -> float16 -> float32 round trip before RMSNorm's statistics
        if node.op_type == "ReduceMean":
            source = producer.get(node.input[0])
            assert source is not None and source.op_type == "Pow", source

    half, full = Engine.load(folder), Engine.load(plain_export)
    for prompt in PROMPTS:
        a = full.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        b = half.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        assert np.mean(np.array(a.token_ids) == np.array(b.token_ids)) >= 0.75


def test_engine_verification_compares_backends_case_by_case(tmp_path, plain_export, tiny_model):
    """What build-engine runs on a fresh engine, here with ONNX Runtime on both sides: the same
    graph agrees exactly; the fp16 graph within the fp16 tolerance but not fp32's; another
    model's graph of the same shapes is refused."""
    from prefixport.engines.build import check_backend
    from prefixport.runtime.backends.onnxruntime import OnnxRuntimeBackend

    m = mf.Manifest.load(plain_export)
    reference = OnnxRuntimeBackend(plain_export, m)
    same = check_backend(OnnxRuntimeBackend(plain_export, m), reference)
    assert [r.name for r in same] == ["prefill", "prefill after a prefix",
                                      "prefill + soft prompt (batch 2), every position", "decode step with past",
                                      "prefill batch 2, right padding, every position",
                                      "decode, rows of different lengths", "soft prompt alone"]
    assert all(r.logits_max_abs_diff == 0 and r.present_max_rel_diff == 0 for r in same)

    half = tmp_path / "half"
    half.mkdir()
    float16_graph(plain_export / mf.MODEL_NAME, half / mf.MODEL_NAME)
    results = check_backend(OnnxRuntimeBackend(half, m), reference, "fp16")
    assert 0 < max(r.logits_max_abs_diff for r in results) <= 0.1
    with pytest.raises(EngineError, match="fp32 engine disagrees .* in case 'prefill'"):
        check_backend(OnnxRuntimeBackend(half, m), reference, "fp32")

    from . import tiny_models

    other = tmp_path / "other"
    export_model(other, model=str(tiny_models.build("llama", tmp_path / "other-model", seed=1)), optimize=False)
    with pytest.raises(EngineError, match="logits differ by"):
        check_backend(OnnxRuntimeBackend(other, m), reference)


# --- choosing a backend ------------------------------------------------------------------------


def test_backend_settings_refuse_what_cannot_work():
    assert BackendSettings().load_kwargs() == ("onnxruntime", {"provider": "cpu"})
    assert BackendSettings(device="cuda").options() == {"provider": "cuda"}
    assert BackendSettings(provider="tensorrt", threads=2).options() == {"provider": "tensorrt", "threads": 2}
    assert BackendSettings("tensorrt", precision="fp16").load_kwargs() == ("tensorrt", {"precision": "fp16"})
    assert BackendSettings("tensorrt", threads=4).options() == {}  # threads are ONNX Runtime's
    assert [BackendSettings(**kw).uses_gpu for kw in ({}, {"device": "cuda"}, {"provider": "tensorrt"},
                                                      {"kind": "tensorrt"})] == [False, True, True, True]
    with pytest.raises(PrefixportError, match="--precision is for the tensorrt backend"):
        BackendSettings(precision="fp16")
    with pytest.raises(PrefixportError, match="runs on the GPU"):
        BackendSettings(provider="cuda", device="cpu")
    with pytest.raises(PrefixportError, match="--provider is for the onnxruntime backend"):
        BackendSettings("tensorrt", provider="cuda")
    with pytest.raises(DeviceError, match="runs on an NVIDIA GPU"):
        BackendSettings("tensorrt", device="cpu")
    with pytest.raises(PrefixportError, match="unknown backend 'tvm'; available: onnxruntime, tensorrt"):
        BackendSettings("tvm")
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, when made: it cannot change after
        BackendSettings().provider = "cuda"  # type: ignore[misc]
    with pytest.raises(PrefixportError, match="runs on the GPU"):  # a changed copy is checked again
        dataclasses.replace(BackendSettings(device="cpu"), provider="tensorrt")


def test_backend_settings_load_an_engine(plain_export):
    """`Engine.load(folder, backend=kind, **options)`: the settings' keywords are what it takes."""
    backend, options = BackendSettings(threads=1).load_kwargs()
    engine = Engine.load(plain_export, backend=backend, **options)
    assert (engine.backend.name, engine.backend.device, engine.backend.limits) == ("onnxruntime", "cpu", None)
    engine.close()


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_provider_missing_is_a_clear_error(plain_export, provider):
    """CPU onnxruntime lacks the provider; onnxruntime-gpu without a GPU or its CUDA/TensorRT
    libraries falls back to the CPU with a logged error, which is refused rather than run on the
    CPU unasked (seen with onnxruntime-gpu 1.31 on this CPU machine)."""
    try:
        Engine.load(plain_export, provider=provider)
    except DeviceError as e:
        assert re.search(f"provider '{provider}' needs onnxruntime-gpu|ONNX Runtime could not start", str(e))
    else:
        pytest.skip(f"the {provider} provider works here: covered by the GPU parity test")


def test_no_gpu_is_a_clear_error():
    if not _has("cuda.bindings") and not _has("cuda.cudart"):
        pytest.skip("cuda-python is not installed (the tensorrt extra)")
    from prefixport.runtime import cuda

    try:
        info = cuda.device_info()
    except DeviceError as e:  # what every GPU path says first on a machine without one
        assert "CUDA device query failed" in str(e) and "no NVIDIA GPU with a working driver" in str(e)
    else:
        pytest.skip(f"a GPU is visible here ({info.name})")


def test_cli_build_engine_lists_and_refuses(plain_export, tiny_export):
    from click.testing import CliRunner

    from prefixport.cli import main

    runner = CliRunner()
    listed = runner.invoke(main, ["build-engine", str(plain_export), "--list"])
    assert listed.exit_code == 0 and "no engines in" in listed.output
    refused = runner.invoke(main, ["build-engine", str(tiny_export("llama"))])
    assert refused.exit_code == 1 and "--no-optimize" in refused.output
    wrong = runner.invoke(main, ["generate", str(plain_export), "hi", "--backend", "tensorrt", "--device", "cpu"])
    assert wrong.exit_code == 1 and "runs on an NVIDIA GPU" in wrong.output


# --- on a GPU ----------------------------------------------------------------------------------


def _parity(engine: Engine, reference: Engine, work: Path, atol: float) -> None:
    """Greedy tokens with each adapter kind, alone and in one mixed batch, equal ORT-CPU's; the
    first-step logits within `atol`."""
    for name in ("prompt", "prefix"):
        for e in (engine, reference):
            e.add_adapter(name, work / f"{name}.safetensors")
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    adapters = ["prompt", "prefix", None]
    got = [r.token_ids for r in engine.generate_batch(PROMPTS, adapters=adapters, **kw)]
    want = [r.token_ids for r in reference.generate_batch(PROMPTS, adapters=adapters, **kw)]
    assert got == want
    from prefixport.runtime.generation import prefill_new

    ids = reference.encode(PROMPTS[0])
    a, _ = prefill_new(engine.backend, [ids])
    b, _ = prefill_new(reference.backend, [ids])
    assert np.abs(a.astype(np.float32) - b).max() <= atol


@pytest.mark.gpu
@pytest.mark.skipif(_gpu() is not None, reason=f"needs TensorRT and an NVIDIA GPU: {_gpu()}")
@pytest.mark.parametrize("fp16,atol", [(False, 1e-3), (True, 1e-1)])  # engines.build.TOLERANCE
def test_tensorrt_engine_matches_onnxruntime_cpu(tmp_path, plain_export, tiny_adapters, fp16, atol):
    folder = tmp_path / "export"
    shutil.copytree(plain_export, folder)
    record = build_engine(folder, fp16=fp16, max_batch=4, max_seq=64, max_past=127, max_virtual=32)
    saved = json.loads((folder / "engines" / f"{record.key}.json").read_text())
    assert saved["precision"] == ("fp16" if fp16 else "fp32")
    assert len(saved["verification"]) == 5 and max(c["logits_max_abs_diff"] for c in saved["verification"]) <= atol
    engine = Engine.load(folder, backend="tensorrt", precision=record.precision)
    assert engine.context_limit == 128 and engine.max_batch == 4
    _parity(engine, Engine.load(folder), tiny_adapters("llama"), atol)
    used = engine.stats().memory
    assert used["device_used_bytes"] > 0
    with pytest.raises(PrefixportError, match="at most 4 rows"):
        engine.generate_batch(PROMPTS * 2, max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_matches_cpu(plain_export, tiny_adapters, provider):
    reason = _ort_gpu(provider)
    if reason:
        pytest.skip(reason)
    _parity(Engine.load(plain_export, provider=provider), Engine.load(plain_export), tiny_adapters("llama"), 1e-3)
