"""TensorRT backend: the engine built by `prefixport build-engine` for this GPU, run through
NVIDIA's CUDA Python bindings (never torch). The KV cache and the adapters stay on the GPU as
`DeviceArray`s; the engine writes each step's present into the cache's scratch rows (TensorRT
cannot alias an output with an input: the export's "copy" mode); only the logits come back.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ... import manifest as mf
from ...errors import DeviceError, EngineError
from .. import cuda
from ..cuda import DeviceArray
from ..engine_cache import ENGINES_DIR, find_engine
from ..profiles import choose_profile, plan_profiles
from . import gpu_memory, process_memory


def tensorrt_module() -> Any:
    """`import tensorrt`, or a DeviceError that says how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise DeviceError(f"TensorRT is not installed ({e}): pip install 'prefixport[tensorrt]' "
                          "on a machine with an NVIDIA GPU and driver") from None
    return tensorrt


class TensorRTBackend:
    """Runs `engines/KEY.plan` of an export folder: the engine built for this GPU model, compute
    capability and TensorRT version (`precision`: "fp32", "fp16", or None for either, fp32 first)."""

    name = "tensorrt"
    runs_plain = False  # no --lora export has an engine

    def __init__(self, folder: str | Path, manifest: mf.Manifest, precision: str | None = None,
                 device_id: int = 0, device: str = "cuda") -> None:
        if device != "cuda":
            raise DeviceError(f"the tensorrt backend runs on an NVIDIA GPU (device 'cuda'), not {device!r}")
        if manifest.weights:  # `build-engine` refuses such an export (engines/build.py: check_buildable)
            raise EngineError(f"{folder} takes LoRA and IA3 tables (--lora): no TensorRT engine is built for it; "
                              "serve it on ONNX Runtime")
        trt = tensorrt_module()
        gpu = cuda.device_info(device_id)
        self.record = find_engine(folder, manifest, gpu.slug, gpu.name, gpu.compute_capability, trt.__version__,
                                  precision)
        self.manifest, self.device, self.device_id = manifest, "cuda", device_id
        self.limits = self.record.engine_limits
        self.profiles = plan_profiles(self.limits)
        self.stream = cuda.Stream(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        plan = (Path(folder) / ENGINES_DIR / self.record.plan).read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} could not load {self.record.plan} (its log above says "
                              f"why); rebuild it with `prefixport build-engine {folder}`")
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise EngineError(f"{self.record.plan} has {self.engine.num_optimization_profiles} optimisation "
                              f"profiles, this prefixport plans {len(self.profiles)}; rebuild it with "
                              f"`prefixport build-engine {folder}`")
        self.context = self.engine.create_execution_context()
        self._profile = 0
        self._lock = threading.Lock()  # one execution context: one call at a time (ORT sessions allow many)
        self._past_names = mf.past_names(manifest.num_layers)
        self._outputs = list(manifest.outputs)
        names = list(manifest.inputs) + self._outputs
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.np_dtype = self._dtypes[self._past_names[0]]

    # --- the protocol --------------------------------------------------------------------------

    def run(self, inputs: dict[str, Any], past: Sequence[Any], present: Sequence[Any],
            weights: Sequence[Any] | None = ()) -> np.ndarray:
        with self._lock:
            try:
                return self._run(inputs, past, present)
            except BaseException:
                try:  # copies still queued may read host arrays about to be freed
                    self.stream.synchronize()
                except DeviceError:
                    pass
                raise

    def _run(self, inputs: dict[str, Any], past: Sequence[Any], present: Sequence[Any]) -> np.ndarray:
        batch, seq = inputs["input_ids"].shape
        virtual, capacity = inputs["prompt_embeds"].shape[1], past[0].shape[2]
        profile = choose_profile(self.profiles, batch, seq, virtual, capacity)
        ctx, stream = self.context, self.stream
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, int(stream)):
                raise EngineError(f"TensorRT refused to switch to profile {self.profiles[profile].name}")
            self._profile = profile
        hosts, devices = [], []  # kept alive until the stream is synchronised
        for name, value in inputs.items():
            if not isinstance(value, DeviceArray):
                host = np.ascontiguousarray(value, self._dtypes[name])
                value = DeviceArray(host.shape, host.dtype, stream)
                value.upload(host)
                hosts.append(host)
            devices.append(value)
            self._bind_input(name, value)
        for name, value in zip(self._past_names, past):
            self._bind_input(name, value)
        logits = DeviceArray(tuple(ctx.get_tensor_shape(self._outputs[0])), self._dtypes[self._outputs[0]], stream)
        ctx.set_tensor_address(self._outputs[0], logits.ptr)
        for name, value in zip(self._outputs[1:], present):  # the cache's scratch rows: no allocation
            ctx.set_tensor_address(name, value.ptr)
        if not ctx.execute_async_v3(int(stream)):
            raise EngineError("TensorRT failed to run the engine (its log above says why)")
        return logits.to_numpy()  # synchronises

    def _bind_input(self, name: str, value: DeviceArray) -> None:
        if value.dtype != self._dtypes[name]:
            raise EngineError(f"{name} is {value.dtype}, the engine takes {self._dtypes[name]}")
        if not self.context.set_input_shape(name, value.shape):
            raise EngineError(f"TensorRT refused the shape {value.shape} for {name} "
                              f"(profile {self.profiles[self._profile].name})")
        self.context.set_tensor_address(name, value.ptr)

    def upload(self, array: np.ndarray, dtype: Any = None) -> Any:
        return DeviceArray.from_numpy(array, self.stream, self.np_dtype if dtype is None else dtype)

    def allocate(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return DeviceArray(shape, self.np_dtype if dtype is None else dtype, self.stream).zero()

    def copy_into(self, dst: Any, src: Any, row: int = 0, slots: int | None = None, at: int = 0,
                  src_at: int = 0) -> None:
        cuda.copy_slots(dst, src, row, slots, self.stream, at, src_at)

    def to_numpy(self, buffer: Any) -> np.ndarray:
        return np.asarray(buffer.to_numpy())

    def memory_stats(self) -> dict[str, int]:
        return process_memory() | gpu_memory(self.device_id)

    def close(self) -> None:
        if getattr(self, "context", None) is not None:
            self.stream.synchronize()
        self.context = self.engine = None
