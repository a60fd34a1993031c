"""Backends run the exported graph. Each lives in its own module and implements `Backend`."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ... import manifest as mf
from ..limits import Limits


class Backend(Protocol):
    """What the generation loop needs from a backend: run the graph on the KV cache's buffers
    in place, and the few buffer operations the cache needs on the backend's device.

    A buffer is a numpy array on the CPU and a `cuda.DeviceArray` on the GPU; both slice rows
    (`buffer[a:b]`) without copying, so a cache row range binds as it lies.
    """

    name: str
    device: str  # "cpu" or "cuda"
    manifest: mf.Manifest

    @property
    def limits(self) -> Limits | None:
        """The shapes a TensorRT engine (or provider) accepts; None: the model's own."""
        ...

    @property
    def runs_plain(self) -> bool:
        """Whether `run` takes `weights=None` for an export with --lora (no row holds a LoRA or
        IA3: the backend runs the export's plain graph, docs/design.md "LoRA and IA3")."""
        ...

    def run(self, inputs: dict[str, Any], past: Sequence[Any], present: Sequence[Any],
            weights: Sequence[Any] | None = ()) -> np.ndarray:
        """Feed `input_ids`, `prompt_embeds`, `past_lengths`, `input_lengths`, `logits_index`, the
        cache rows (`past`: key, value per layer) and, for an export with --lora, the rows' LoRA and
        IA3 tables (`weights`, in `WeightAdapters.input_names` order; None where `runs_plain` and
        the rows hold none); the graph writes the present into `present` (the same buffers as
        `past` for a "shared" export). Returns the logits [batch, K, vocab] on the host (K:
        `logits_index`'s width)."""
        ...

    def upload(self, array: np.ndarray, dtype: Any = None) -> Any:
        """A buffer holding `array` in `dtype` (default: the export's float dtype) where the backend
        computes (an adapter's soft prompt, or a prefix in the cache's dtype): `run` and `copy_into`
        take it in place of the array."""
        ...

    def allocate(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """A zeroed buffer of `dtype`, default the KV cache's (`manifest.kv_dtype`: the export's
        float dtype, or int8). A "copy" graph reads every slot: no garbage."""
        ...

    def copy_into(self, dst: Any, src: Any, row: int = 0, slots: int | None = None, at: int = 0,
                  src_at: int = 0) -> None:
        """src [r, kv_heads, n, head_dim] (a buffer or a host array) into dst[row:row+r]: `slots`
        of src's slots from `src_at` (default: all the rest) go to dst's slots from `at`."""
        ...

    def to_numpy(self, buffer: Any) -> np.ndarray:
        """A host copy of a buffer."""
        ...

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


def load_backend(name: str, folder: str | Path, manifest: Any, **options: Any) -> Backend:
    """Open the export in `folder` with the named backend (`onnxruntime` or `tensorrt`)."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, manifest, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest, **options)
    from ...errors import PrefixportError

    raise PrefixportError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
