"""ONNX Runtime backend: one InferenceSession; the KV cache stays in OrtValues between steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from ... import manifest as mf
from ...errors import ExportFolderError, PrefixportError
from . import process_memory

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxRuntimeBackend:
    """Runs `model.onnx` of an export folder on the CPU, or on an NVIDIA GPU (`device="cuda"`,
    needs onnxruntime-gpu) with the KV cache and adapters resident on the GPU (IO binding)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, manifest: mf.Manifest, device: str = "cpu",
                 threads: int | None = None) -> None:
        if device not in _PROVIDERS:
            raise PrefixportError(f"device {device!r} is not supported by this backend; use: cpu, cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PrefixportError(
                "device 'cuda' needs onnxruntime-gpu and an NVIDIA GPU; this onnxruntime offers "
                f"{', '.join(ort.get_available_providers())} (install with `pip install prefixport[gpu]`)"
            )
        self.device = device
        path = Path(folder) / mf.MODEL_NAME
        if not path.is_file():
            raise ExportFolderError(f"{folder} has no {mf.MODEL_NAME}; re-run `prefixport export`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_PROVIDERS[device])
        except Exception as e:  # onnxruntime raises its own untyped errors on a bad file
            raise ExportFolderError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.manifest = manifest
        self.np_dtype = np.dtype(manifest.dtype)
        self._outputs = list(manifest.outputs)
        self._past_names = mf.past_names(manifest.num_layers)

    def run(self, inputs: dict[str, np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        if self.device == "cuda":
            return self._run_bound(inputs, past)
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in inputs.items()}
        feeds.update(zip(self._past_names, past))
        outputs = self.session.run_with_ort_values(self._outputs, feeds)
        logits = outputs[0].numpy()[:, -1, :]
        return logits, outputs[1:]

    def _run_bound(self, inputs: dict[str, np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """GPU: small inputs copied up, past bound where it lives, present kept on the GPU,
        only the last-position logits copied back."""
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._outputs[0], "cpu")
        for name in self._outputs[1:]:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1, :], list(outputs[1:])

    def empty_past(self, batch: int) -> list[Any]:
        m = self.manifest
        empty = np.zeros((batch, m.num_kv_heads, 0, m.head_dim), self.np_dtype)
        return self.to_past([empty]) * (2 * m.num_layers)

    def to_past(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        device = ("cuda", 0) if self.device == "cuda" else ("cpu", 0)
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, self.np_dtype), *device) for a in arrays]

    def past_to_numpy(self, past: Sequence[Any]) -> list[np.ndarray]:
        return [value.numpy() for value in past]

    def memory_stats(self) -> dict[str, int]:
        return process_memory()

    def close(self) -> None:
        self.session = None
