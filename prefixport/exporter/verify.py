"""Check an exported graph against the PyTorch module it came from (`prefixport.verification`'s
cases, ONNX Runtime the candidate, PyTorch the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import manifest as mf
from ..errors import VerificationError
from ..runtime.backends.onnxruntime import OnnxRuntimeBackend
from ..verification import SEED, CaseResult, backend_runner, run_cases
from .graph import GraphModule

# Allowed difference between ONNX Runtime and PyTorch: max abs difference of the logits, and of
# each present KV tensor relative to its largest magnitude (keys reach the hundreds). The fused
# kernels sum in another order than PyTorch: on the default model, over 30 seeds, float32 logits
# differ by up to 1.3e-4 at the last position, and by up to 7.6e-3 (p50 1e-4) in the cases that
# compare every position (random tokens: logits up to 35 at early positions); a wrong mask or
# position moves them by > 0.1.
TOLERANCE = {"float32": 1.5e-2, "float16": 5e-2}

__all__ = ["TOLERANCE", "CaseResult", "verify"]


def verify(folder: Path, module: GraphModule, manifest: mf.Manifest, seed: int = SEED) -> list[CaseResult]:
    """Run each case through ONNX Runtime and PyTorch; raise VerificationError past TOLERANCE."""
    def torch_run(inputs: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        weights = [torch.from_numpy(inputs[n]) for n in module.weight_names]
        with torch.no_grad():
            out = module(**{k: torch.from_numpy(v) for k, v in inputs.items() if k not in module.weight_names},
                         past=[torch.from_numpy(p.copy()) for p in past], weights=weights)
        return out[0].float().numpy(), [t.numpy() for t in out[1:]]

    embed_std = float(module.model.get_input_embeddings().weight.detach().float().std())
    tolerance = TOLERANCE[manifest.dtype]
    backend = OnnxRuntimeBackend(folder, manifest)
    results: list[CaseResult] = []
    try:
        for result in run_cases(backend_runner(backend), torch_run, manifest, seed, embed_std):
            results.append(result)
            worst = max(result.logits_max_abs_diff, result.present_max_rel_diff)
            if worst == float("inf"):
                raise VerificationError(f"verification case {result.name!r}: ONNX Runtime gave NaN/Inf")
            if not result.within(tolerance):
                raise VerificationError(
                    f"verification case {result.name!r}: ONNX Runtime differs from PyTorch by {worst:.3g} "
                    f"(logits {result.logits_max_abs_diff:.3g}, KV relative {result.present_max_rel_diff:.3g}),"
                    f" above the {manifest.dtype} tolerance {tolerance}; the export is not usable")
    finally:
        backend.close()
    return results
