"""The decode floor: how fast this process can read memory, probed several ways.

A decode step at batch 1 reads every weight at least once, so `weight bytes / read bandwidth` is a
time it cannot beat, provided the probes reach the machine's real bandwidth. One probe is not
enough: numpy's BLAS sgemv reads slowly under the OPENBLAS settings some machines set (a "floor"
of 15.5 ms against a measured 11.7 ms decode), so the floor takes the fastest of three probes, each
its fastest repeat, over an array far larger than the caches:

- `sgemv`: a float32 matrix-vector product in numpy's BLAS (its own threads);
- `reduce`: a max-reduction split over `threads` Python threads (numpy releases the GIL);
- `onnxruntime`: ONNX Runtime's MatMul [1, K] x [K, N] on `threads` intra-op threads, the kernel
  family the decode step runs (needs the `onnx` package to build the graph; skipped without it).

The suite then checks the floor against the measured decode step and says so if it was beaten.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from .measure import timed

COLUMNS = 4096  # the matrix's inner dimension (K): rows of 16 KB, like a hidden-size weight


def fastest(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls after one warm-up call, in seconds."""
    fn()
    return min(timed(fn, repeats))


def _sgemv(matrix: np.ndarray, repeats: int) -> float:
    vector = np.ones(matrix.shape[1], dtype=np.float32)
    return fastest(lambda: matrix @ vector, repeats)


def _reduce(matrix: np.ndarray, repeats: int, threads: int) -> float:
    chunks = np.array_split(matrix, threads)
    with ThreadPoolExecutor(threads) as pool:
        return fastest(lambda: list(pool.map(np.max, chunks)), repeats)


def _onnxruntime(matrix: np.ndarray, repeats: int, threads: int) -> float | None:
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    k, n = matrix.shape[1], matrix.shape[0]
    weight = matrix.reshape(k, n)  # the same bytes, as the right-hand side of x @ W
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "read_bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()  # the weight is an input bound in place: no copy per run
    binding.bind_cpu_input("x", np.ones((1, k), np.float32))
    binding.bind_cpu_input("w", weight)
    binding.bind_output("y")
    return fastest(lambda: session.run_with_iobinding(binding), repeats)


def read_bandwidth(megabytes: int = 512, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Bytes per second of the fastest probe (see the module docstring), with every probe's rate."""
    threads = threads or os.cpu_count() or 1
    matrix = np.ones(megabytes * 2**20 // 4, dtype=np.float32).reshape(-1, COLUMNS)
    seconds = {"sgemv": _sgemv(matrix, repeats), "reduce": _reduce(matrix, repeats, threads),
               "onnxruntime": _onnxruntime(matrix, repeats, threads)}
    probes = {name: matrix.nbytes / s for name, s in seconds.items() if s is not None}
    best = max(probes, key=probes.__getitem__)
    return {"bytes_per_s": probes[best], "method": best, "probes": probes, "array_mb": megabytes,
            "repeats": repeats, "threads": threads}
