"""LoRA and IA3 as run-time inputs (docs/design.md, "LoRA and IA3"): which modules of a decoder
layer take them (`plan`), and the wrapped modules that compute them in the traced graph (`install`).

Every target module of every decoder layer becomes `RowAdapted(module)`: per row b of the call,

    y = base(x * s_in[b]) * s_out[b] + (x @ A[b]^T) @ B[b]

where A [batch, rank, in] (PEFT's lora_A.weight) and B [batch, rank, out] (PEFT's lora_B.weight
transposed, times its scaling) are the row's LoRA (zeros for a row without one; rank 0 where no
row of the call has one; ONNX Runtime fuses the transpose into the MatMul) and s_in / s_out
its IA3 vector on the module's input (PEFT's feedforward modules) or output (ones for a row
without one). A row without an adapter computes base(x) * 1 + 0: what the export without these
inputs computes, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import manifest as mf
from ..errors import ExportError
from .specs import ArchSpec

DEFAULT_MAX_RANK = 16


@dataclass(frozen=True)
class LoraOptions:
    """`prefixport export --lora`: the modules taking LoRA (PEFT-style names; empty: every linear
    module of a decoder layer) and IA3 (None: PEFT's IA3 targets for the architecture; empty: none),
    and the largest LoRA rank the export takes."""

    targets: tuple[str, ...] = ()
    ia3_targets: tuple[str, ...] | None = None
    max_rank: int = DEFAULT_MAX_RANK


def decoder_layers(model: Any, arch: ArchSpec) -> torch.nn.ModuleList:
    """The model's list of decoder layers (`arch.layers_path` under the CausalLM)."""
    module = model
    for part in arch.layers_path.split("."):
        module = getattr(module, part, None)
    if not isinstance(module, torch.nn.ModuleList):
        raise ExportError(f"{arch.model_type}: no decoder layers at {arch.layers_path!r}; the spec is wrong")
    return module


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear module (nn.Linear, or GPT-2's Conv1D), None for others."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _matches(path: str, target: str) -> bool:
    """PEFT's rule: a target names a module by its full path or by a suffix of dotted parts."""
    return path == target or path.endswith("." + target)


def plan(model: Any, arch: ArchSpec, options: LoraOptions) -> mf.WeightAdapters:
    """The modules taking LoRA (default: every linear module of a decoder layer, PEFT's
    "all-linear") and IA3 (default: PEFT's IA3 targets for the architecture, on the input of its
    feedforward modules and the output of the others)."""
    if options.max_rank < 1:
        raise ExportError(f"--lora-max-rank must be >= 1, got {options.max_rank}")
    layer = decoder_layers(model, arch)[0]
    shapes = {name: list(f) for name, module in layer.named_modules() if (f := _features(module)) is not None}
    if not shapes:
        raise ExportError(f"{arch.model_type}: no linear modules in a decoder layer to take LoRA")
    lora = _select(shapes, list(options.targets), "--lora-targets") if options.targets else list(shapes)
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_DEFAULT,
    )

    model_type = model.config.model_type
    chosen = list(options.ia3_targets) if options.ia3_targets is not None else IA3_DEFAULT.get(model_type, [])
    feedforward = FEEDFORWARD.get(model_type, [])
    ia3 = {path: "input" if any(_matches(path, f) for f in feedforward) else "output"
           for path in (_select(shapes, chosen, "--ia3-targets") if chosen else [])}
    return mf.WeightAdapters(options.max_rank, shapes, lora, ia3, arch.layers_path)


def _select(shapes: dict[str, list[int]], targets: list[str], option: str) -> list[str]:
    chosen = [path for path in shapes if any(_matches(path, t) for t in targets)]
    unknown = [t for t in targets if not any(_matches(path, t) for path in shapes)]
    if unknown:
        raise ExportError(f"{option}: no linear module of a decoder layer is named {', '.join(unknown)}; "
                          f"the modules are {', '.join(shapes)}")
    return chosen


class Tables:
    """The call's LoRA and IA3 tensors by input name, shared by the graph and every wrapped module
    (a plain object: tracing swaps a module's dict attributes for copies)."""

    def __init__(self) -> None:
        self.by_name: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.by_name[name]


class RowAdapted(torch.nn.Module):
    """A target module with its row's LoRA and IA3 (the module docstring's formula). The tensors of
    the call are looked up in `tables`, filled by the graph before each forward."""

    def __init__(self, base: torch.nn.Module, tables: Tables, lora: tuple[str, str] | None,
                 ia3: str | None, side: str) -> None:
        super().__init__()
        self.base, self.tables, self.lora, self.ia3, self.side = base, tables, lora, ia3, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.tables[self.ia3] if self.ia3 else None  # [B, 1, dim]
        y = self.base(x * scale if scale is not None and self.side == "input" else x)
        if scale is not None and self.side == "output":
            y = y * scale
        if self.lora:
            a, b = self.tables[self.lora[0]], self.tables[self.lora[1]]
            y = y + torch.matmul(torch.matmul(x, a.transpose(1, 2)), b)
        return y


def install(model: Any, arch: ArchSpec, weights: mf.WeightAdapters) -> Tables:
    """Wrap every target module of every decoder layer in `RowAdapted`; returns the tables the
    graph fills with the call's tensors (by input name) before running the model."""
    tables = Tables()
    for index, layer in enumerate(decoder_layers(model, arch)):
        for path in dict.fromkeys([*weights.lora, *weights.ia3]):
            parent_path, _, leaf = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            lora = (mf.lora_a_name(index, path), mf.lora_b_name(index, path)) if path in weights.lora else None
            ia3 = mf.ia3_name(index, path) if path in weights.ia3 else None
            setattr(parent, leaf, RowAdapted(getattr(parent, leaf), tables, lora, ia3, weights.ia3.get(path, "")))
    return tables

