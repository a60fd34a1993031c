"""Backends run the exported graph. Each lives in its own module and implements `Backend`."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..limits import Limits


class Backend(Protocol):
    """What the generation loop needs from a backend.

    `past` handles are the backend's own device values (OrtValues for ONNX Runtime): they go from
    one step's outputs to the next step's inputs without a round trip through numpy.
    """

    name: str
    device: str  # "cpu" or "cuda"
    limits: Limits | None  # the shapes a TensorRT engine (or provider) accepts; None: the model's own

    def run(self, inputs: dict[str, np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """Feed `input_ids`, `prompt_embeds`, `attention_mask`, `position_ids` and the past
        (key, value per layer); return last-position logits [batch, vocab] and the present."""
        ...

    def empty_past(self, batch: int) -> list[Any]:
        """A past of length 0 for `batch` rows."""
        ...

    def to_past(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        """Backend handles for past tensors given as numpy arrays [B, kv_heads, P, head_dim]."""
        ...

    def upload(self, array: np.ndarray) -> Any:
        """An input kept where the backend computes (an adapter's soft prompt): `run` takes it in
        place of the array. The array itself on the CPU."""
        ...

    def past_to_numpy(self, past: Sequence[Any]) -> list[np.ndarray]: ...

    def memory_stats(self) -> dict[str, int]:
        """Bytes held, by kind (e.g. process RSS, device memory)."""
        ...

    def close(self) -> None: ...


def process_memory() -> dict[str, int]:
    """This process's current RSS (Linux /proc) and peak RSS, in bytes."""
    stats = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux
    try:
        stats["rss_bytes"] = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return stats


def gpu_memory(device: int = 0) -> dict[str, int]:
    """Device memory in use and in all, from the driver (cuda-python, else NVML); {} without either."""
    from ...errors import DeviceError
    from .. import cuda

    try:
        return cuda.memory_info()
    except DeviceError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device))
            return {"device_used_bytes": int(info.used), "device_total_bytes": int(info.total)}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no GPU
        return {}


BACKENDS = ("onnxruntime", "tensorrt")


def load_backend(name: str, folder: str, manifest: Any, **options: Any) -> Backend:
    """Open the export in `folder` with the named backend (`onnxruntime` or `tensorrt`)."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, manifest, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest, **options)
    from ...errors import PrefixportError

    raise PrefixportError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
