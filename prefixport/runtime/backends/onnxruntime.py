"""ONNX Runtime backend: one InferenceSession; the KV cache stays in OrtValues between steps.

Providers: `cpu`; `cuda` and `tensorrt` through onnxruntime-gpu, with IO binding so the cache and
adapters stay on the GPU and only the last-position logits come back.
"""

from __future__ import annotations

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


class OnnxRuntimeBackend:
    """Runs `model.onnx` of an export folder with one ONNX Runtime provider: `cpu`, or on an NVIDIA
    GPU `cuda` or `tensorrt` (onnxruntime-gpu; `device="cuda"` is the same as `provider="cuda"`)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, manifest: mf.Manifest, provider: str | None = None,
                 device: str | None = None, threads: int | None = None, device_id: int = 0) -> None:
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
        providers: list[Any] = ["CPUExecutionProvider"]
        if provider != "cpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        if provider == "tensorrt":
            options_trt = tensorrt_provider_options(Path(folder), manifest, self.limits, device_id)
            providers.insert(0, ("TensorrtExecutionProvider", options_trt))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors on a bad file
            raise ExportFolderError(f"ONNX Runtime cannot load {path}: {e}") from e
        if _EP[provider] not in self.session.get_providers():  # it fell back (a CUDA or TensorRT library missing)
            raise DeviceError(f"ONNX Runtime could not start {_EP[provider]} (running with "
                              f"{', '.join(self.session.get_providers())}); its log above names the missing library")
        self.manifest = manifest
        self.np_dtype = np.dtype(manifest.dtype)
        self._outputs = list(manifest.outputs)
        self._past_names = mf.past_names(manifest.num_layers)

    def run(self, inputs: dict[str, Any], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        if self.device == "cuda":
            return self._run_bound(inputs, past)
        feeds = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
                 for name, value in inputs.items()}
        feeds.update(zip(self._past_names, past))
        outputs = self.session.run_with_ort_values(self._outputs, feeds)
        logits = outputs[0].numpy()[:, -1, :]
        return logits, outputs[1:]

    def _run_bound(self, inputs: dict[str, Any], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """GPU: small inputs copied up, past and adapters bound where they live, present kept on
        the GPU, only the last-position logits copied back."""
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, ort.OrtValue) else self._on_device(value))
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._outputs[0], "cpu")
        for name in self._outputs[1:]:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1, :], list(outputs[1:])

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def upload(self, array: np.ndarray) -> Any:
        return array if self.device == "cpu" else self._on_device(array)

    def empty_past(self, batch: int) -> list[Any]:
        m = self.manifest
        empty = np.zeros((batch, m.num_kv_heads, 0, m.head_dim), self.np_dtype)
        return self.to_past([empty]) * (2 * m.num_layers)

    def to_past(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        return [self._on_device(np.ascontiguousarray(a, self.np_dtype)) for a in arrays]

    def past_to_numpy(self, past: Sequence[Any]) -> list[np.ndarray]:
        return [value.numpy() for value in past]

    def memory_stats(self) -> dict[str, int]:
        return process_memory() | (gpu_memory(self.device_id) if self.device == "cuda" else {})

    def close(self) -> None:
        self.session = None
