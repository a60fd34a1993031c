"""`export_model`: model spec -> export folder (docs/design.md), written atomically."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import manifest as mf
from ..errors import ExportError
from ..progress import Progress
from . import kv_quant, loading, merge
from . import optimize as opt
from .graph import GraphModule, weight_bytes, export_onnx
from .weights import LoraOptions, plan
from .verify import TOLERANCE, CaseResult, verify

DTYPES = ("float32", "float16")
KV_CACHE_DTYPES = ("float", "int8")  # float: the export's dtype; int8: kv_quant.py
DEFAULT_OPSET = 18
AGREEMENT_TOKENS = 32  # greedy tokens per prompt when judging a quantised graph
MIN_OPSET = 18  # the oldest opset torch's dynamo exporter targets without a lossy down-conversion


@dataclass
class ExportReport:
    folder: Path
    manifest: mf.Manifest
    seconds: dict[str, float]
    file_bytes: dict[str, int]
    verification: list[CaseResult] = field(default_factory=list)
    tolerance: float = 0.0
    agreement: Any = None  # runtime.agreement.Agreement of a quantised graph with the float one
    adapter_agreement: dict[str, Any] = field(default_factory=dict)  # adapter name -> its Agreement
    kv_agreement: Any = None  # an int8 KV cache's Agreement with the float cache (same weights)
    kv_adapter_agreement: dict[str, Any] = field(default_factory=dict)  # adapter name -> its Agreement


def fingerprint(model: Any) -> str:
    """sha256 over the base model's float32 weights (names, shapes, bytes): the same for every
    dtype the model is exported in, so adapters match the base model rather than one export."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to(torch.float32).contiguous() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _check_outdir(outdir: Path, overwrite: bool) -> None:
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise ExportError(f"{outdir} exists and is not a folder; choose another output folder")
    if (outdir / mf.MANIFEST_NAME).is_file():
        if not overwrite:  # (scripts/main.sh makes the README tour's export: the tour says to use it)
            raise ExportError(f"{outdir} already holds an export: use it as it is (generate, serve, adapter "
                              "convert take the folder), or pass --overwrite to export again")
        return
    if any(outdir.iterdir()):
        raise ExportError(
            f"{outdir} exists, is not empty and is not a prefixport export; choose an empty or new folder"
        )


def _manifest(loaded: loading.LoadedModel, dtype: str, opset: int, digest: str) -> mf.Manifest:
    import onnxruntime
    import torch
    import transformers

    config, arch = loaded.model.config, loaded.arch
    gen = loaded.model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else loaded.tokenizer.eos_token_id
    return mf.Manifest(
        architecture=config.model_type,
        num_layers=arch.num_layers(config),
        num_kv_heads=arch.num_kv_heads(config),
        head_dim=arch.head_dim(config),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        dtype=dtype,
        max_positions=arch.max_positions(config),
        sliding_window=arch.sliding_window(config),
        eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [int(eos)],
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else loaded.tokenizer.pad_token_id,
        bos_token_id=gen.bos_token_id,
        fingerprint=digest,
        source=loaded.source.spec,
        opset=opset,
        exporter={"torch": torch.__version__, "transformers": transformers.__version__,
                  "onnxruntime": onnxruntime.__version__},
    )


def export_model(
    outdir: str | Path,
    model: str = loading.DEFAULT_MODEL,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    verify_graph: bool = True,
    overwrite: bool = False,
    optimize: bool = True,
    quantize: str | None = None,
    check_adapters: Sequence[str | Path] = (),
    progress: Progress | None = None,
    kv_cache_dtype: str = "float",
    lora: LoraOptions | None = None,
    merge_lora: str | Path | None = None,
) -> ExportReport:
    """Export `model` (a spec, see `loading.resolve`) to `outdir`.

    `optimize` fuses attention, normalisation and rotary into ONNX Runtime's contrib ops
    (`optimize.py`); `quantize` (a name of `optimize.RECIPES`: "int8", "int4", "int4-rtn") then
    makes the weight MatMuls MatMulNBits and measures greedy agreement with the float graph,
    plain and through each bundle of `check_adapters` (converted for this base model).
    `kv_cache_dtype` "int8" makes the KV cache 8-bit with per-channel scales calibrated here
    (`kv_quant.py`; covering the keys and values of the `check_adapters` too) and measures its
    agreement with the float cache the same way. `lora` makes the graph take LoRA and IA3 tensors
    per row (`weights.py`); without it the graph is what it was. `merge_lora` (a PEFT LoRA checkpoint
    folder) is folded into the base weights before anything else (`merge.py`): the fingerprint is
    then the merged weights', so adapters are converted against this export, not the plain base.

    Everything is written to a temporary sibling folder that is renamed into place only once the
    export and its verification succeeded: a failed or interrupted export leaves no folder that
    looks like an export.
    """
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in opt.RECIPES:
        raise ExportError(f"quantization {quantize!r} is not supported; choose one of {', '.join(opt.RECIPES)}")
    if quantize and dtype != "float32":
        raise ExportError("weight-only quantization starts from float32 weights; drop --dtype or --quantize")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ExportError(f"KV cache dtype {kv_cache_dtype!r} is not supported; choose one of "
                          f"{', '.join(KV_CACHE_DTYPES)}")
    kv_int8 = kv_cache_dtype == "int8"
    if kv_int8 and not optimize:
        raise ExportError("an int8 KV cache needs the fused GroupQueryAttention (its kernel quantises the cache); "
                          "a --no-optimize graph (TensorRT) keeps a float cache: drop --kv-cache-dtype int8 or "
                          "--no-optimize")
    if kv_int8 and dtype != "float32":
        raise ExportError("an int8 KV cache needs a float32 export: ONNX Runtime 1.32's CPU GroupQueryAttention "
                          "writes wrong values into an int8 cache from float16 (measured); drop --dtype float16")
    if check_adapters and not quantize and not kv_int8:
        raise ExportError("adapters are checked against a quantised graph: add --quantize or --kv-cache-dtype int8")
    missing = [str(p) for p in check_adapters if not Path(p).is_file()]
    if missing:
        raise ExportError(f"no adapter bundle at {', '.join(missing)}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; the exporter writes opset {MIN_OPSET} or newer")
    progress = progress or Progress()
    outdir = Path(outdir).resolve()
    _check_outdir(outdir, overwrite)
    checkpoint = merge.read_lora(merge_lora) if merge_lora is not None else None  # refused before loading
    with progress.stage(f"loading {model}"):
        loaded = loading.load(model)
    merged = None
    if checkpoint is not None:  # in float32, before the fingerprint: the export's weights are base + LoRA
        with progress.stage(f"merging LoRA {checkpoint.folder}"):
            merged = merge.merge_lora(loaded.model, checkpoint, loaded.arch.layers_path)
    digest = fingerprint(loaded.model)
    if dtype == "float16":
        loaded.model.to(torch.float16)
    manifest = _manifest(loaded, dtype, opset, digest)
    manifest.merged_lora = merged
    manifest.cache = "shared" if optimize else "copy"
    weights = plan(loaded.model, loaded.arch, lora) if lora is not None else None
    if weights is not None:
        manifest.weight_adapters = asdict(weights)
        manifest.inputs = mf.input_names(manifest.num_layers, weights)
    module = GraphModule(loaded.model, loaded.arch, fused=optimize, weights=weights)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outdir.parent / f".{outdir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with progress.stage("exporting ONNX graph"):
            export_onnx(module, loaded.arch, loaded.model.config, tmp / mf.MODEL_NAME, opset)
        if optimize:
            with progress.stage("fusing normalisation and rotary"):
                manifest.fused_ops = opt.fuse(tmp / mf.MODEL_NAME, manifest.max_positions)
        loaded.tokenizer.save_pretrained(tmp)
        loaded.model.generation_config.save_pretrained(tmp)
        manifest.save(tmp)
        results: list[CaseResult] = []
        if verify_graph:
            with progress.stage("verifying against PyTorch"):
                results = verify(tmp, module, manifest)
        calibration = None
        if kv_int8:  # on the float weights: every weight recipe of a model gets the same scales
            with progress.stage("calibrating the int8 KV cache"):
                calibration = kv_quant.calibrate(tmp, adapters=[Path(p) for p in check_adapters])
        agreement, adapters = None, {}
        if quantize:
            with progress.stage(f"quantizing weights to {quantize}"):
                agreement, adapters = _quantize(tmp, manifest, quantize, [Path(p) for p in check_adapters])
        kv_agreement, kv_adapters = None, {}
        if calibration is not None:
            with progress.stage("making the KV cache int8"):
                kv_agreement, kv_adapters = _kv_int8(tmp, manifest, calibration, [Path(p) for p in check_adapters])
        if weights is not None:  # run where no row holds a LoRA or IA3 (docs/design.md, "LoRA and IA3")
            with progress.stage("writing the graph without LoRA and IA3 inputs"):
                opt.without_weight_adapters(tmp / mf.MODEL_NAME, tmp / mf.PLAIN_MODEL_NAME,
                                            set(weights.input_names(manifest.num_layers)))
                manifest.plain_graph = mf.PLAIN_MODEL_NAME
                manifest.save(tmp)
        if outdir.exists():
            shutil.rmtree(outdir) if any(outdir.iterdir()) else outdir.rmdir()
        tmp.rename(outdir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            need = weight_bytes(module) / 1e6
            raise ExportError(f"no space left on the device of {outdir.parent} while writing the export: it needs "
                              f"about {need:.0f} MB free (the weights once, plus the tokenizer); nothing was "
                              "left behind; free some space or choose another folder") from e
        raise
    sizes = {p.name: p.stat().st_size for p in sorted(outdir.iterdir()) if p.is_file()}
    return ExportReport(outdir, manifest, dict(progress.seconds), sizes, results, TOLERANCE[dtype], agreement,
                        adapters, kv_agreement, kv_adapters)


def _no_space(e: BaseException | None) -> bool:
    """Whether `e`, or an error it was raised from, is the disk running out (ENOSPC)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def _against_before(folder: Path, manifest: mf.Manifest, adapters: list[Path], change: Callable[[], Any]):
    """Run `change()` on folder's graph in place and measure the greedy agreement of the graph after
    it with the graph before it (held in memory meanwhile), plain and through each adapter (checked
    against the export before the change first, so a bundle of another model fails early).
    Returns what `change` returned, the plain Agreement and {adapter name: Agreement}."""
    import numpy as np

    from ..runtime import Engine
    from ..runtime.agreement import PROMPTS, adapter_agreement, agreement

    names = [path.stem for path in adapters]
    if len(set(names)) < len(names):
        raise ExportError(f"adapter bundles need different file names: {', '.join(names)}")
    reference = Engine.load(folder)
    for name, path in zip(names, adapters):
        reference.add_adapter(name, path)
    changed = change()
    candidate = Engine.load(folder)
    prompts = [reference.encode(p, chat=True) for p in PROMPTS]
    result = agreement(reference.backend, candidate.backend, prompts, AGREEMENT_TOKENS, manifest.hidden_size,
                       np.dtype(manifest.dtype))
    by_adapter = {}
    for name, path in zip(names, adapters):
        candidate.add_adapter(name, path)
        by_adapter[name] = adapter_agreement(reference, candidate, name, PROMPTS, AGREEMENT_TOKENS)
    reference.close()
    candidate.close()
    return changed, result, by_adapter


def _quantize(folder: Path, manifest: mf.Manifest, recipe: str, adapters: list[Path]):
    """Quantise folder's graph in place; record the method and its greedy agreement with the
    float graph in the manifest, plain and through each adapter (`_against_before`).
    Returns the plain Agreement and {adapter name: Agreement}."""
    kind, algorithm = opt.RECIPES[recipe]
    matmuls, result, by_adapter = _against_before(
        folder, manifest, adapters, lambda: opt.quantize(folder / mf.MODEL_NAME, kind, algorithm=algorithm))
    manifest.quantization = {"method": "MatMulNBits", "recipe": recipe, "algorithm": algorithm,
                             "bits": opt.QUANTIZATIONS[kind], "block_size": opt.QUANT_BLOCK_SIZE,
                             "symmetric": algorithm == "rtn", "matmuls": matmuls,
                             "agreement_with_float": result.to_dict(),
                             "adapter_agreement_with_float": {n: a.to_dict() for n, a in by_adapter.items()}}
    manifest.save(folder)
    return result, by_adapter


def _kv_int8(folder: Path, manifest: mf.Manifest, calibration: kv_quant.Calibration, adapters: list[Path]):
    """Make folder's KV cache int8 with the calibrated scales (graph, scales file, manifest) and
    record its greedy agreement with the float cache on the same weights (`_against_before`),
    plain and through each adapter (a prefix's keys and values quantised by the runtime with the
    same scales; the fraction of them clipped is recorded). Returns the plain Agreement and
    {adapter name: Agreement}."""
    from ..adapters.bundle import load_bundle
    from ..runtime.kv_scales import KVScales

    record, result, by_adapter = _against_before(folder, manifest, adapters,
                                                 lambda: kv_quant.apply(folder, manifest, calibration))
    scales, clipped = KVScales(calibration.scales), {}
    for path in adapters:
        bundle = load_bundle(path, manifest)
        if bundle.kind == "prefix":
            clipped[path.stem] = scales.clipped([t[None] for t in bundle.prefix(manifest.num_layers)])
    record["agreement_with_float_cache"] = result.to_dict()
    record["adapter_agreement_with_float_cache"] = {n: a.to_dict() for n, a in by_adapter.items()}
    record["prefix_values_clipped"] = clipped  # a prefix adapter's keys/values beyond its channels' int8 range
    manifest.save(folder)
    return result, by_adapter
