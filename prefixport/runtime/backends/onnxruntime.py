"""ONNX Runtime backend: one InferenceSession run with IO binding on the KV cache's buffers in
place (numpy arrays on the CPU; device buffers from cuda-bindings on the GPU), and logits written
into a fresh host array.

Providers: `cpu`; `cuda` and `tensorrt` through onnxruntime-gpu.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from ... import manifest as mf
from ...errors import DeviceError, ExportFolderError, PrefixportError
from ..limits import Limits
from . import gpu_memory, process_memory

PROVIDERS = ("cpu", "cuda", "tensorrt")
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: with both, either may win.
_GPU_INSTALL = ("Install onnxruntime-gpu in place of onnxruntime (the two cannot be installed together): "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu nvidia-ml-py")
_EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _shapes_option(shapes: dict[str, tuple[int, ...]]) -> str:
    """ONNX Runtime's TensorRT profile syntax: `name:1x2x3,name2:4x5`."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


def tensorrt_limits(manifest: mf.Manifest) -> Limits:
    """The TensorRT provider's shape ranges: the default limits of `prefixport build-engine`."""
    return Limits.for_manifest(manifest)


def tensorrt_provider_options(folder: Path, manifest: mf.Manifest, limits: Any,
                              device_id: int = 0) -> dict[str, Any]:
    """TensorRT provider options: engines cached under `engines/onnxruntime-trt/` (created here),
    one explicit profile spanning prefill and decode within `limits`."""
    from ..engine_cache import ENGINES_DIR
    from ..profiles import plan_profiles, union_shapes

    shapes = union_shapes(plan_profiles(limits), manifest)
    cache = Path(folder) / ENGINES_DIR / "onnxruntime-trt"
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": _shapes_option({n: s[0] for n, s in shapes.items()}),
        "trt_profile_opt_shapes": _shapes_option({n: s[1] for n, s in shapes.items()}),
        "trt_profile_max_shapes": _shapes_option({n: s[2] for n, s in shapes.items()}),
    }


SPINNING = ("on", "run", "off")  # pool threads: spin always, during a run only, never


def _session(path: Path, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors on a bad file
        raise ExportFolderError(f"ONNX Runtime cannot load {path}: {e}") from e


def _pointer(value: Any) -> int:
    return value.ctypes.data if isinstance(value, np.ndarray) else value.ptr


class OnnxRuntimeBackend:
    """Runs `model.onnx` of an export folder with one ONNX Runtime provider: `cpu`, or on an NVIDIA
    GPU `cuda` or `tensorrt` (onnxruntime-gpu; `device="cuda"` is the same as `provider="cuda"`).
    `spinning` is ONNX Runtime's: "on" (its default: pool threads spin between and after runs),
    "run" (they spin during a run and sleep once it returns: for sessions that take turns in one
    process, a draft export's and its target's, which otherwise steal each other's cores) or "off".
    An export with --lora that ships its plain graph (`manifest.plain_graph`) opens it too, on the
    CPU, unless `plain_graph=False`: a run whose rows hold no LoRA or IA3 (`run(..., weights=None)`)
    goes through it, at the plain export's speed, for a second copy of the weights in memory
    (docs/design.md, "LoRA and IA3")."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, manifest: mf.Manifest, provider: str | None = None,
                 device: str | None = None, threads: int | None = None, device_id: int = 0,
                 spinning: str = "on", plain_graph: bool = True) -> None:
        provider = provider or device or "cpu"
        if provider not in PROVIDERS:
            raise PrefixportError(f"provider {provider!r} is not supported by this backend; "
                                  f"use: {', '.join(PROVIDERS)}")
        if device not in (None, "cpu", "cuda") or (device == "cpu" and provider != "cpu"):
            raise PrefixportError(f"device {device!r} does not go with provider {provider!r}")
        available = ort.get_available_providers()
        if _EP[provider] not in available:
            raise DeviceError(
                f"provider {provider!r} needs onnxruntime-gpu and an NVIDIA GPU"
                + (" with TensorRT installed" if provider == "tensorrt" else "")
                + f"; this onnxruntime offers {', '.join(available)}. " + _GPU_INSTALL
            )
        self.provider, self.device, self.device_id = provider, "cpu" if provider == "cpu" else "cuda", device_id
        self.limits = tensorrt_limits(manifest) if provider == "tensorrt" else None  # its profile's ranges
        path = Path(folder) / mf.MODEL_NAME
        if not path.is_file():
            raise ExportFolderError(f"{folder} has no {mf.MODEL_NAME}; re-run `prefixport export`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if spinning not in SPINNING:
            raise PrefixportError(f"spinning must be one of {', '.join(SPINNING)}, got {spinning!r}")
        if spinning == "off":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif spinning == "run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list[Any] = ["CPUExecutionProvider"]
        if provider != "cpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        if provider == "tensorrt":
            options_trt = tensorrt_provider_options(Path(folder), manifest, self.limits, device_id)
            providers.insert(0, ("TensorrtExecutionProvider", options_trt))
        self.session = _session(path, options, providers)
        plain = Path(folder) / manifest.plain_graph if manifest.weights and manifest.plain_graph else None
        self.plain = (_session(plain, options, providers)  # a folder whose plain.onnx was removed: the one graph
                      if plain_graph and provider == "cpu" and plain is not None and plain.is_file() else None)
        self.plain_runs = 0  # runs that went through the plain graph
        if _EP[provider] not in self.session.get_providers():  # it fell back (a CUDA or TensorRT library missing)
            raise DeviceError(f"ONNX Runtime could not start {_EP[provider]} (running with "
                              f"{', '.join(self.session.get_providers())}); its log above names the missing library")
        self.manifest = manifest
        self.np_dtype = np.dtype(manifest.dtype)  # prompt_embeds and logits
        self.kv_dtype = np.dtype(manifest.kv_dtype)  # the cache: np_dtype, or int8 (docs/design.md)
        self._outputs = list(manifest.outputs)
        self._past_names = mf.past_names(manifest.num_layers)
        self._weight_names = manifest.weights.input_names(manifest.num_layers) if manifest.weights else []
        self._device_buffers: Any = None
        self._bindings = threading.local()

    @property
    def runs_plain(self) -> bool:
        """Whether `run` takes `weights=None` on an export with --lora: its plain graph, open."""
        return self.plain is not None

    def run(self, inputs: dict[str, Any], past: Sequence[Any], present: Sequence[Any],
            weights: Sequence[Any] | None = ()) -> np.ndarray:
        """Bind the inputs, the cache rows as past and present (the same buffers where the graph
        writes in place), the rows' LoRA and IA3 tables (`weights`, an export with --lora; None: the
        rows hold none, run the plain graph) and a fresh logits array; run; return the logits
        [B, L, vocab]."""
        logits = np.empty((*inputs["logits_index"].shape, self.manifest.vocab_size), self.np_dtype)
        session = self.session if weights is not None else self.plain
        if session is None:
            raise PrefixportError("the backend is closed" if self.session is None else
                                  "this backend has no plain graph open: pass the rows' LoRA/IA3 tables")
        binding = self._cache_binding(session, past, present, weights if weights is not None else ())
        for name, value in inputs.items():
            if self.device == "cpu":
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            elif isinstance(value, np.ndarray):
                binding.bind_ortvalue_input(name, self._on_device(value))
            else:  # a device buffer: an adapter's soft prompt
                binding.bind_input(name, "cuda", self.device_id, value.dtype, value.shape, value.ptr)
        binding.bind_output(self._outputs[0], "cpu", 0, self.np_dtype, logits.shape, logits.ctypes.data)
        session.run_with_iobinding(binding)
        self.plain_runs += session is self.plain
        return logits

    def _cache_binding(self, session: ort.InferenceSession, past: Sequence[Any], present: Sequence[Any],
                       weights: Sequence[Any]) -> ort.IOBinding:
        """An IO binding of `session` with the cache rows and the weight tables bound (by pointer),
        reused by this thread while the same row views come again (`KVCache.bind` hands out the
        same lists until its buffers change, and the binding holds them, so they cannot be freed
        and their ids reused): only the small inputs and the logits are bound per call. One per
        thread and session: an Engine serves many, and steps alternate between the two graphs."""
        held = getattr(self._bindings, "held", None)  # this thread's {id(session): (past, present, weights, binding)}
        if held is None:
            held = self._bindings.held = {}
        last = held.get(id(session))
        if last is not None and last[0] is past and last[1] is present and last[2] is weights:
            return last[3]
        expected = len(self._weight_names) if session is self.session else 0
        if len(weights) != expected:
            raise PrefixportError(f"this export takes {expected} LoRA/IA3 tables, {len(weights)} given")
        binding = session.io_binding()
        for names, values in ((self._past_names, past), (self._outputs[1:], present)):
            bind = binding.bind_input if names is self._past_names else binding.bind_output
            for name, value in zip(names, values):
                bind(name, *self._where(value), self.kv_dtype, value.shape, _pointer(value))
        for name, value in zip(self._weight_names, weights):
            binding.bind_input(name, *self._where(value), self.np_dtype, value.shape, _pointer(value))
        held[id(session)] = (past, present, weights, binding)
        return binding

    def _where(self, value: Any) -> tuple[str, int]:
        return ("cpu", 0) if isinstance(value, np.ndarray) else ("cuda", self.device_id)

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def upload(self, array: np.ndarray, dtype: Any = None) -> Any:
        host = np.ascontiguousarray(array, self.np_dtype if dtype is None else dtype)
        return host if self.device == "cpu" else self._gpu().from_numpy(host)

    def allocate(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        dtype = np.dtype(self.kv_dtype if dtype is None else dtype)
        if self.device != "cpu":
            return self._gpu().zeros(shape, dtype)
        buffer = np.empty(shape, dtype)
        buffer.fill(0)  # written now, not page by page as slots fill: the memory is held from the start
        return buffer

    def copy_into(self, dst: Any, src: Any, row: int = 0, slots: int | None = None, at: int = 0,
                  src_at: int = 0) -> None:
        if self.device == "cpu":
            n = src.shape[2] - src_at if slots is None else slots
            dst[row : row + src.shape[0], :, at : at + n] = src[:, :, src_at : src_at + n]
        else:
            self._gpu().copy_into(dst, src, row, slots, at, src_at)

    def to_numpy(self, buffer: Any) -> np.ndarray:
        return np.array(buffer) if self.device == "cpu" else buffer.to_numpy()

    def _gpu(self) -> Any:
        """Device buffers for the cache on the GPU (cuda-bindings), made on first use."""
        if self._device_buffers is None:
            from ..cuda import DeviceBuffers

            self._device_buffers = DeviceBuffers(self.device_id)
        return self._device_buffers

    def memory_stats(self) -> dict[str, int]:
        return process_memory() | (gpu_memory(self.device_id) if self.device == "cuda" else {})

    def close(self) -> None:
        self.session = self.plain = None
