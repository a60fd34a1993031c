"""Check a backend against ONNX Runtime on the CPU over the same export: what `build-engine` runs
on a fresh engine before keeping it. Torch-free: the reference is the graph the engine came from.

Cases: a prefill from no past, a batch of two with a soft prompt, a decode step, a prefill after a
prefix, and a soft prompt alone (no real tokens). Each backend gets the same inputs and the same
past (the reference's), so a difference is this step's alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from .. import manifest as mf
from ..errors import EngineError
from ..runtime.backends import Backend
from ..runtime.generation import graph_inputs

# Max abs difference of the last-position logits allowed against float32 ONNX Runtime on the CPU.
# float16: the converted graph differed by 0.031 on the default model (benchmarks/fp16_graph.py).
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1}


@dataclass
class CheckResult:
    name: str
    logits_max_abs_diff: float
    present_max_rel_diff: float  # max |a - b| / max(1, max |b|) over the filled KV slots

    def as_dict(self) -> dict:
        return asdict(self)


CAPACITY = 24  # cache slots per row in the cases


def cases(manifest: mf.Manifest, seed: int = 0) -> Iterator[tuple[str, dict[str, np.ndarray], Any]]:
    """(name, inputs, past): past is a number of rows for a fresh cache (random contents, none
    of it filled), or "previous" for the reference's cache after the case before."""
    rng = np.random.default_rng(seed)
    dt, hidden, vocab = np.dtype(manifest.dtype), manifest.hidden_size, manifest.vocab_size
    soft = lambda b, v: (rng.standard_normal((b, v, hidden)) * 0.05).astype(dt)  # noqa: E731

    def call(lengths: list[int], past: list[int], virtual: int = 0, every: bool = False) -> dict[str, np.ndarray]:
        rows = [rng.integers(0, vocab, n).tolist() for n in lengths]
        return graph_inputs(rows, soft(len(lengths), virtual), virtual, np.array(past), every=every)

    yield "prefill", call([7], [0]), 1
    yield "prefill after a prefix", call([5], [7]), "previous"
    yield "prefill + soft prompt (batch 2), every position", call([6, 6], [0, 0], virtual=4, every=True), 2
    yield "decode step", call([1, 1], [10, 10]), "previous"
    yield "soft prompt alone", call([0], [0], virtual=5), 1


def _run(backend: Backend, manifest: mf.Manifest, inputs: dict[str, np.ndarray],
         arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call on a cache holding `arrays`; the logits and the cache after it, on the host."""
    past = []
    for array in arrays:
        buffer = backend.allocate(array.shape)
        backend.copy_into(buffer, array)
        past.append(buffer)
    present = past if manifest.cache == "shared" else [backend.allocate(a.shape) for a in arrays]
    logits = backend.run(inputs, past, present)
    return np.asarray(logits, np.float32), [backend.to_numpy(b) for b in present]


def compare(candidate: Backend, reference: Backend, manifest: mf.Manifest, precision: str = "fp32",
            seed: int = 0) -> list[CheckResult]:
    """Run every case on both backends; an EngineError names the first case past TOLERANCE."""
    tolerance = TOLERANCE[precision]
    results, previous = [], None
    rng = np.random.default_rng(seed + 1)
    for name, inputs, past in cases(manifest, seed):
        if past == "previous":
            arrays = previous
        else:
            arrays = [rng.standard_normal((past, manifest.num_kv_heads, CAPACITY, manifest.head_dim))
                      .astype(manifest.dtype) for _ in range(2 * manifest.num_layers)]
        want, want_present = _run(reference, manifest, inputs, arrays)
        got, got_present = _run(candidate, manifest, inputs, arrays)
        total = inputs["past_lengths"] + inputs["input_lengths"]
        filled = (np.arange(CAPACITY)[None, :] < total[:, None])[:, None, :, None]
        present_diff = max(float(np.abs(np.where(filled, a, 0) - np.where(filled, b, 0)).max())
                           / max(1.0, float(np.abs(b).max())) for a, b in zip(got_present, want_present))
        diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
        results.append(CheckResult(name, diff, present_diff))
        if not diff <= tolerance:
            raise EngineError(f"the {precision} engine disagrees with ONNX Runtime on the CPU in case {name!r}: "
                              f"logits differ by {diff:.3g} (tolerance {tolerance:g})")
        previous = want_present
    return results
