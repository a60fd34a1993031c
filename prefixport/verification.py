"""One verification of an exported graph, torch-free: a candidate and a reference run the same
cases (same inputs, same past) and each case's difference is measured.

`prefixport export` runs it with ONNX Runtime as the candidate and the PyTorch module as the
reference (`exporter/verify.py`); `prefixport build-engine` with the new TensorRT engine against
ONNX Runtime on the CPU over the same `model.onnx` (`engines/build.py`). Each caller owns its
tolerance and its error (docs/design.md, "Verification").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from . import manifest as mf
from .runtime.backends import Backend
from .runtime.generation import graph_inputs

CAPACITY = 24  # cache slots per row in the cases
SEED = 0  # the cases are drawn from it: a graph verifies the same way each time

# One graph call: (inputs, past arrays) -> (logits [batch, K, vocab], the cache after the call).
Runner = Callable[[dict[str, np.ndarray], list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


@dataclass
class CaseResult:
    name: str
    logits_max_abs_diff: float  # inf where the candidate gave NaN/Inf
    present_max_rel_diff: float  # max |a - b| / max(1, max |b|) over the filled KV slots

    def within(self, tolerance: float) -> bool:
        return max(self.logits_max_abs_diff, self.present_max_rel_diff) <= tolerance

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cases(manifest: mf.Manifest, rng: np.random.Generator, embed_std: float = 0.05
          ) -> Iterator[tuple[str, dict[str, np.ndarray], list[np.ndarray] | None]]:
    """(name, inputs, past): past is a fresh random cache, or None for the reference's cache after
    the case before. Every past slot that is read was written by a case before (random keys far
    from the model's would make the tolerance meaningless); a wrong slot or position still shows."""
    dt, hidden, vocab = np.dtype(manifest.dtype), manifest.hidden_size, manifest.vocab_size
    shape = (manifest.num_kv_heads, CAPACITY, manifest.head_dim)

    def soft(batch: int, virtual: int) -> np.ndarray:
        return (rng.standard_normal((batch, virtual, hidden)) * embed_std).astype(dt)

    def cache(batch: int) -> list[np.ndarray]:
        return [rng.standard_normal((batch, *shape)).astype(dt) for _ in range(2 * manifest.num_layers)]

    weights = manifest.weights

    def call(lengths: list[int], past: list[int], virtual: int = 0, every: bool = False,
             rank: int = 4) -> dict[str, np.ndarray]:
        rows = [rng.integers(0, vocab, n).tolist() for n in lengths]
        inputs = graph_inputs(rows, soft(len(lengths), virtual), virtual, np.array(past), every=every)
        if weights is not None:  # LoRA of `rank` (0: none) and IA3 per row, random: the adapted path is checked
            inputs |= weight_tables(weights, manifest.num_layers, len(lengths), rank, dt, rng)
        return inputs

    yield "prefill", call([7], [0]), cache(1)
    yield "prefill after a prefix", call([4], [7], virtual=2), None
    yield "prefill + soft prompt (batch 2), every position", call([6, 6], [0, 0], virtual=4, every=True), cache(2)
    yield "decode step with past", call([1, 1], [10, 10]), None
    yield "prefill batch 2, right padding, every position", call([8, 3], [0, 0], every=True), cache(2)
    yield "decode, rows of different lengths", call([1, 1], [8, 3]), None
    yield "soft prompt alone", call([0], [0], virtual=5), cache(1)
    if weights is not None:
        yield "decode without LoRA (rank 0)", call([1], [5], rank=0), None


def weight_tables(weights: mf.WeightAdapters, num_layers: int, batch: int, rank: int, dtype: np.dtype,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random LoRA tables of `rank` (A and B small) and IA3 vectors (near 1), by input name."""
    out = {}
    for name in weights.input_names(num_layers):
        noise = rng.standard_normal((batch, *weights.row_shape(name, rank)))
        out[name] = (1 + 0.1 * noise if name.startswith("ia3.") else 0.05 * noise).astype(dtype)
    return out


def run_cases(candidate: Runner, reference: Runner, manifest: mf.Manifest, seed: int = SEED,
              embed_std: float = 0.05) -> Iterator[CaseResult]:
    """Each case on both sides, in order; the caller stops at the first result past its tolerance."""
    previous: list[np.ndarray] = []
    for name, inputs, past in cases(manifest, np.random.default_rng(seed), embed_std):
        arrays = previous if past is None else past
        want, want_present = reference(inputs, arrays)
        got, got_present = candidate(inputs, arrays)
        # Only the filled slots of each row matter (what lies beyond is never attended).
        total = inputs["past_lengths"] + inputs["input_lengths"]
        filled = (np.arange(CAPACITY)[None, :] < total[:, None])[:, None, :, None]
        present = max(_relative_diff(np.where(filled, a, 0), np.where(filled, b, 0))
                      for a, b in zip(got_present, want_present))
        got = np.asarray(got, np.float32)
        logits = float(np.abs(got - np.asarray(want, np.float32)).max()) if np.isfinite(got).all() else float("inf")
        yield CaseResult(name, logits, present)
        previous = want_present


def backend_runner(backend: Backend) -> Runner:
    """A backend as a Runner: the past copied into its own buffers (untouched for the other side)."""
    def run(inputs: dict[str, np.ndarray], arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        past = []
        for array in arrays:
            buffer = backend.allocate(array.shape)
            backend.copy_into(buffer, array)
            past.append(buffer)
        present = past if backend.manifest.cache == "shared" else [backend.allocate(a.shape) for a in arrays]
        names = backend.manifest.weights.input_names(backend.manifest.num_layers) if backend.manifest.weights else []
        weights = [inputs[n] for n in names]
        logits = backend.run({k: v for k, v in inputs.items() if k not in names}, past, present, weights)
        return np.asarray(logits, np.float32), [backend.to_numpy(b) for b in present]

    return run


def _relative_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    if not np.isfinite(actual).all():
        return float("inf")
    expected = expected.astype(np.float32)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(actual.astype(np.float32) - expected).max(initial=0.0)) / scale
