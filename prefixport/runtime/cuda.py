"""Device memory through NVIDIA's CUDA Python bindings (`cuda-python`; never torch).

`DeviceArray` is a typed buffer on the GPU that TensorRT reads and writes; copies go through one
`Stream`. Every failure becomes a `DeviceError` that says what is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeviceError


def cudart() -> Any:
    """The CUDA runtime module of cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            raise DeviceError("the GPU paths need NVIDIA's CUDA Python bindings: "
                              "pip install 'prefixport[tensorrt]' (cuda-python)") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result tuple (error, *values); raise a DeviceError on an error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        hint = ""
        if "cudaErrorNoDevice" in str(err) or "cudaErrorInsufficientDriver" in str(err):
            hint = " (no NVIDIA GPU with a working driver is visible to this process)"
        raise DeviceError(f"CUDA {what} failed: {text}{hint}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class GpuInfo:
    """What an engine is built for: TensorRT engines run only on the GPU model they were built on."""

    name: str
    compute_capability: tuple[int, int]
    total_bytes: int

    @property
    def slug(self) -> str:
        """The GPU's name as a file-name part, e.g. `nvidia-h200`."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def device_info(index: int = 0) -> GpuInfo:
    """The name, compute capability and memory of GPU `index`; a DeviceError where there is none."""
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "device query")
    if count <= index:
        raise DeviceError(f"no CUDA GPU number {index}: this machine has {count}")
    prop = check(rt.cudaGetDeviceProperties(index), "device properties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.split("\x00")[0].strip(), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


def memory_info() -> dict[str, int]:
    """Device memory in use and in all, from the driver (every process on the GPU counts)."""
    free, total = check(cudart().cudaMemGetInfo(), "memory query")
    return {"device_used_bytes": int(total - free), "device_total_bytes": int(total)}


class Stream:
    """A CUDA stream with the device's stream-ordered memory pool. A backend does all its copies,
    launches, allocations and frees on its one stream, so none of them needs a device-wide sync.
    Destroyed when the last array allocated on it is gone."""

    def __init__(self, device: int = 0) -> None:
        self.rt = cudart()
        check(self.rt.cudaSetDevice(device), "device selection")
        self.handle = check(self.rt.cudaStreamCreate(), "stream creation")
        try:  # keep freed blocks in the pool rather than returning them at every synchronize
            from cuda.bindings import driver

            pool = check(self.rt.cudaDeviceGetDefaultMemPool(device), "memory pool query")
            self.rt.cudaMemPoolSetAttribute(pool, self.rt.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                            driver.cuuint64_t(2**64 - 1))
        except Exception:  # older bindings or another value type: the default threshold only costs speed
            pass

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "stream synchronize")

    def __del__(self) -> None:
        try:
            self.rt.cudaStreamDestroy(self.handle)
        except Exception:  # interpreter shutdown: the module may be gone
            pass


class DeviceArray:
    """An array on the GPU: a pointer, a shape and a dtype, allocated and freed in `stream`'s
    order (freed when garbage collected). A zero-size array still owns a small block, so its
    pointer is never null."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | str, stream: Stream, base: Any = None,
                 ptr: int = 0) -> None:
        self.stream, self.rt = stream, stream.rt
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.base = base  # a view keeps the array it looks into alive, and frees nothing
        self.ptr = ptr if base is not None else int(check(self.rt.cudaMallocAsync(max(self.nbytes, 256),
                                                                                 stream.handle),
                                                          f"allocation of {self.nbytes:,} bytes"))

    def __getitem__(self, rows: slice) -> "DeviceArray":
        """A view of rows [start, stop) of the first axis (contiguous: no copy)."""
        start, stop, _ = rows.indices(self.shape[0])
        row_bytes = self.nbytes // max(self.shape[0], 1)
        return DeviceArray((stop - start, *self.shape[1:]), self.dtype, self.stream, base=self,
                           ptr=self.ptr + start * row_bytes)

    def reshape(self, shape: tuple[int, ...]) -> "DeviceArray":
        """A view of the same bytes with another shape of as many elements."""
        if int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize != self.nbytes:
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return DeviceArray(shape, self.dtype, self.stream, base=self, ptr=self.ptr)

    @classmethod
    def from_numpy(cls, array: np.ndarray, stream: Stream, dtype: np.dtype | str | None = None) -> "DeviceArray":
        """A device copy of `array` (synchronised before returning, so `array` may be freed)."""
        host = np.ascontiguousarray(array, dtype or array.dtype)
        out = cls(host.shape, host.dtype, stream)
        out.upload(host)
        stream.synchronize()
        return out

    def zero(self) -> "DeviceArray":
        """Fill with zero bytes (asynchronous); returns self."""
        if self.nbytes:
            check(self.rt.cudaMemsetAsync(self.ptr, 0, self.nbytes, self.stream.handle), "memset")
        return self

    def upload(self, host: np.ndarray) -> None:
        """Copy a C-contiguous host array of the same size in (asynchronous: keep `host` alive
        until the stream is synchronised)."""
        if host.nbytes != self.nbytes:
            raise DeviceError(f"copying {host.nbytes} bytes into a device array of {self.nbytes}")
        if self.nbytes:
            check(self.rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, self.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream.handle),
                  "copy to GPU")

    def to_numpy(self) -> np.ndarray:
        """A host copy (synchronises the stream)."""
        host = np.empty(self.shape, self.dtype)
        if self.nbytes:
            check(self.rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream.handle),
                  "copy from GPU")
        self.stream.synchronize()
        return host

    def __del__(self) -> None:
        try:
            if self.ptr and self.base is None:
                self.rt.cudaFreeAsync(self.ptr, self.stream.handle)
                self.ptr = 0
        except Exception:  # interpreter shutdown: the module may be gone
            pass


def copy_slots(dst: DeviceArray, src: DeviceArray | np.ndarray, row: int, slots: int | None, stream: Stream,
               at: int = 0, src_at: int = 0) -> None:
    """src [r, heads, n, head_dim] (device or host) into dst[row:row+r]: `slots` slots of src from
    `src_at` (default: all from there) to dst's slots from `at`. One 2-D copy, one line per row
    and head."""
    rt = stream.rt
    rows, heads, n, head_dim = src.shape
    count = n - src_at if slots is None else slots
    if src_at + count > n or at + count > dst.shape[2] or row + rows > dst.shape[0]:
        raise DeviceError(f"copying slots [{src_at}, {src_at + count}) of {tuple(src.shape)} to slots from {at} of "
                          f"rows from {row} of {dst.shape}: out of bounds")
    item = dst.dtype.itemsize
    host = isinstance(src, np.ndarray)
    if isinstance(src, np.ndarray):
        src = np.ascontiguousarray(src, dst.dtype)  # the host array may be freed once this returns: see below
        src_ptr = src.ctypes.data + src_at * head_dim * item
    else:
        src_ptr = src.ptr + src_at * head_dim * item
    dst_ptr = dst.ptr + (row * heads * dst.shape[2] + at) * head_dim * item
    if count and rows:
        check(rt.cudaMemcpy2DAsync(dst_ptr, dst.shape[2] * head_dim * item, src_ptr, n * head_dim * item,
                                   count * head_dim * item, rows * heads, rt.cudaMemcpyKind.cudaMemcpyDefault,
                                   stream.handle), "cache copy")
    if host:
        stream.synchronize()  # the host array may be freed once this returns


class DeviceBuffers:
    """The cache-buffer operations of a backend on the GPU (ONNX Runtime's CUDA providers)."""

    def __init__(self, device: int = 0) -> None:
        self.stream = Stream(device)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        array = DeviceArray(shape, dtype, self.stream).zero()
        self.stream.synchronize()
        return array

    def from_numpy(self, array: np.ndarray) -> DeviceArray:
        return DeviceArray.from_numpy(array, self.stream)

    def copy_into(self, dst: DeviceArray, src: Any, row: int, slots: int | None, at: int = 0,
                  src_at: int = 0) -> None:
        copy_slots(dst, src, row, slots, self.stream, at, src_at)
        self.stream.synchronize()  # ONNX Runtime runs on its own stream
