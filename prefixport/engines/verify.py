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
from ..runtime.generation import prefill_inputs

# Max abs difference of the last-position logits allowed against float32 ONNX Runtime on the CPU.
# float16: the converted graph differed by 0.031 on the default model (benchmarks/fp16_graph.py).
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1}


@dataclass
class CheckResult:
    name: str
    logits_max_abs_diff: float
    present_max_rel_diff: float  # max |a - b| / max(1, max |b|) over the attended KV slots

    def as_dict(self) -> dict:
        return asdict(self)


def cases(manifest: mf.Manifest, seed: int = 0) -> Iterator[tuple[str, dict[str, np.ndarray], Any]]:
    """(name, inputs, past): past is a number of rows for an empty past, or "previous" for the
    reference's present of the case before."""
    rng = np.random.default_rng(seed)
    dt, hidden, vocab = np.dtype(manifest.dtype), manifest.hidden_size, manifest.vocab_size
    ids = lambda n: rng.integers(0, vocab, n).tolist()  # noqa: E731
    soft = lambda b, v: (rng.standard_normal((b, v, hidden)) * 0.05).astype(dt)  # noqa: E731
    first = prefill_inputs([ids(7)], soft(1, 0))
    yield "prefill", first[0], 1
    yield "prefill after a prefix", prefill_inputs([ids(5)], soft(1, 0), past_len=7)[0], "previous"
    inputs, next_pos = prefill_inputs([ids(6), ids(6)], soft(2, 4))
    yield "prefill + soft prompt (batch 2)", inputs, 2
    decode = {"input_ids": np.array([ids(1), ids(1)], np.int64), "prompt_embeds": soft(2, 0),
              "attention_mask": np.ones((2, int(next_pos[0]) + 1), np.int64), "position_ids": next_pos.reshape(2, 1)}
    yield "decode step", decode, "previous"
    yield "soft prompt alone", prefill_inputs([[]], soft(1, 5))[0], 1


def compare(candidate: Backend, reference: Backend, manifest: mf.Manifest, precision: str = "fp32",
            seed: int = 0) -> list[CheckResult]:
    """Run every case on both backends; an EngineError names the first case past TOLERANCE."""
    tolerance = TOLERANCE[precision]
    results, previous = [], None
    for name, inputs, past in cases(manifest, seed):
        if past == "previous":
            arrays = previous
        else:
            arrays = [np.zeros((past, manifest.num_kv_heads, 0, manifest.head_dim), manifest.dtype)
                      for _ in range(2 * manifest.num_layers)]
        want_logits, want_present = reference.run(inputs, reference.to_past(arrays))
        got_logits, got_present = candidate.run(inputs, candidate.to_past(arrays))
        want_present = reference.past_to_numpy(want_present)
        got_present = candidate.past_to_numpy(got_present)
        attended = inputs["attention_mask"].astype(bool)[:, None, :, None]
        present_diff = max(float(np.abs(np.where(attended, a, 0) - np.where(attended, b, 0)).max())
                           / max(1.0, float(np.abs(b).max())) for a, b in zip(got_present, want_present))
        got, want = np.asarray(got_logits, np.float32), np.asarray(want_logits, np.float32)
        diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
        results.append(CheckResult(name, diff, present_diff))
        if not diff <= tolerance:
            raise EngineError(f"the {precision} engine disagrees with ONNX Runtime on the CPU in case {name!r}: "
                              f"logits differ by {diff:.3g} (tolerance {tolerance:g})")
        previous = want_present
    return results
