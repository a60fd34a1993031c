"""Check an exported graph against the PyTorch module it came from, on fresh random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import manifest as mf
from ..errors import VerificationError
from ..runtime.backends.onnxruntime import OnnxRuntimeBackend
from ..runtime.generation import prefill_inputs
from .graph import GraphModule

# Allowed difference between ONNX Runtime and PyTorch: max abs difference of the logits, and of
# each present KV tensor relative to its largest magnitude (keys reach the hundreds). The fused
# kernels sum in another order than PyTorch: on the default model, float32 logits differ by up to
# 4.5e-4 over 30 seeds (one run reached 1.03e-3); a wrong mask or position moves them by > 0.1.
TOLERANCE = {"float32": 2e-3, "float16": 5e-2}


@dataclass
class CaseResult:
    name: str
    logits_max_abs_diff: float
    present_max_rel_diff: float  # max |ort - torch| / max(1, max |torch|), over the KV tensors


def _torch_run(module: GraphModule, inputs: dict[str, np.ndarray], past: list[np.ndarray]):
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                     past=[torch.from_numpy(p) for p in past])
    return out[0][:, -1].float().numpy(), [t.numpy() for t in out[1:]]


def _cases(manifest: mf.Manifest, embed_std: float, rng: np.random.Generator):
    """(name, inputs, past or None) with past None meaning "take the previous case's present"."""
    dt, hidden, vocab = np.dtype(manifest.dtype), manifest.hidden_size, manifest.vocab_size
    ids = lambda n: rng.integers(0, vocab, n).tolist()  # noqa: E731
    soft = lambda b, v: (rng.standard_normal((b, v, hidden)) * embed_std).astype(dt)  # noqa: E731
    empty = lambda b: [np.zeros((b, manifest.num_kv_heads, 0, manifest.head_dim), dt)  # noqa: E731
                       for _ in range(2 * manifest.num_layers)]
    yield "prefill", prefill_inputs([ids(7)], soft(1, 0))[0], empty(1)
    inputs, next_pos = prefill_inputs([ids(6), ids(6)], soft(2, 4))
    yield "prefill + soft prompt (batch 2)", inputs, empty(2)
    decode = {
        "input_ids": np.array([ids(1), ids(1)], np.int64),
        "prompt_embeds": soft(2, 0),
        "attention_mask": np.ones((2, int(next_pos[0]) + 1), np.int64),
        "position_ids": next_pos.reshape(2, 1),
    }
    yield "decode step with past", decode, None
    yield "prefill batch 2, left padding", prefill_inputs([ids(8), ids(3)], soft(2, 0))[0], empty(2)


def verify(folder: Path, module: GraphModule, manifest: mf.Manifest, seed: int | None = None) -> list[CaseResult]:
    """Run each case through ONNX Runtime and PyTorch; raise VerificationError past TOLERANCE."""
    rng = np.random.default_rng(seed)
    backend = OnnxRuntimeBackend(folder, manifest)
    embed_std = float(module.model.get_input_embeddings().weight.detach().float().std())
    tolerance = TOLERANCE[manifest.dtype]
    results, previous_present = [], None
    try:
        for name, inputs, past in _cases(manifest, embed_std, rng):
            past = previous_present if past is None else past
            ref_logits, ref_present = _torch_run(module, inputs, past)
            logits, present = backend.run(inputs, backend.to_past(past))
            present = backend.past_to_numpy(present)
            logits_diff = float(np.abs(logits.astype(np.float32) - ref_logits).max())
            # Padded slots are masked out of every later step, so their contents never matter (the
            # fused attention and eager attention fill them differently): compare attended slots.
            attended = inputs["attention_mask"].astype(bool)[:, None, :, None]
            present_diff = max(_relative_diff(np.where(attended, a, 0), np.where(attended, b, 0))
                               for a, b in zip(present, ref_present))
            results.append(CaseResult(name, logits_diff, present_diff))
            if not np.isfinite(logits).all():
                raise VerificationError(f"verification case {name!r}: ONNX Runtime gave NaN/Inf logits")
            if max(logits_diff, present_diff) > tolerance:
                raise VerificationError(
                    f"verification case {name!r}: ONNX Runtime differs from PyTorch by "
                    f"{max(logits_diff, present_diff):.3g} (logits {logits_diff:.3g}, KV relative {present_diff:.3g}),"
                    f" above the {manifest.dtype} tolerance {tolerance}; the export is not usable"
                )
            previous_present = ref_present
    finally:
        backend.close()
    return results


def _relative_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float32)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(actual.astype(np.float32) - expected).max(initial=0.0)) / scale

