"""The traced graph: a thin torch module with DESIGN.md's inputs, and its export to ONNX."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import DynamicCache

from .. import manifest as mf
from ..errors import ExportError
from . import attention
from .specs import ArchSpec


class GraphModule(torch.nn.Module):
    """Soft prompt + tokens + past KV in; logits (last position, or all) + present KV out.

    The soft prompt is prepended after the model's embedding module (so any scaling the module
    applies is not applied to it), exactly where PEFT puts it. With `fused`, each layer's
    attention becomes one GroupQueryAttention node (see `attention.py`); the model's own eager
    attention otherwise.
    """

    def __init__(self, model: Any, num_layers: int, fused: bool = False, all_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.fused = fused
        self.logits_to_keep = 0 if all_logits else 1  # transformers: 0 = every position
        model.config._attn_implementation = attention.register() if fused else "eager"

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        prompt_embeds: torch.Tensor,  # [B, V, H]
        attention_mask: torch.Tensor,  # [B, P + V + S] int64
        position_ids: torch.Tensor,  # [B, V + S] int64
        past: list[torch.Tensor],  # 2L x [B, kv_heads, P, head_dim]: key, value per layer
    ) -> tuple[torch.Tensor, ...]:
        token_embeds = self.model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([prompt_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        pairs = list(zip(past[0::2], past[1::2]))
        extra: dict[str, Any] = {}
        if self.fused:
            cache = extra["fused_cache"] = attention.FusedCache(pairs, attention_mask)
        else:
            cache = DynamicCache(ddp_cache_data=pairs)
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=self.logits_to_keep,
            **extra,
        )
        presents: list[torch.Tensor] = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def sample_inputs(
    arch: ArchSpec, config: Any, dtype: torch.dtype, batch: int, virtual: int, seq: int, past: int,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Random inputs of the given sizes, with the layout the runtime feeds (no padding)."""
    kv, hd, hidden = arch.num_kv_heads(config), arch.head_dim(config), config.hidden_size
    g = generator
    positions = torch.arange(past, past + virtual + seq).expand(batch, -1).contiguous()
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "prompt_embeds": torch.randn(batch, virtual, hidden, generator=g).to(dtype) * 0.02,
        "attention_mask": torch.ones(batch, past + virtual + seq, dtype=torch.int64),
        "position_ids": positions,
        "past": [
            torch.randn(batch, kv, past, hd, generator=g).to(dtype)
            for _ in range(2 * arch.num_layers(config))
        ],
    }


def export_onnx(module: GraphModule, arch: ArchSpec, config: Any, path: Path, opset: int) -> None:
    """torch.onnx.export (dynamo) with every axis of the contract symbolic."""
    dtype = next(module.parameters()).dtype
    # Sizes >= 2 and all different: dynamo turns a sample axis of size 0 or 1 into a constant.
    inputs = sample_inputs(arch, config, dtype, batch=2, virtual=3, seq=5, past=7)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    virtual, past = torch.export.Dim("n_virtual"), torch.export.Dim("past")
    total = torch.export.Dim("total")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "prompt_embeds": {0: batch, 1: virtual},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: torch.export.Dim("query")},
        "past": [{0: batch, 2: past}] * len(inputs["past"]),
    }
    n = arch.num_layers(config)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=inputs,
                input_names=mf.input_names(n),
                output_names=mf.output_names(n),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                # protobuf caps a file at 2 GB: larger weights go to model.onnx.data
                external_data=weight_bytes(module) > 1.8e9,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # torch.export and the ONNX translator raise many unrelated types
            raise ExportError(f"torch.onnx.export failed for {config.model_type}: {type(e).__name__}: {e}") from e
    # The exporter falls back to its own opset when a conversion fails: never record a wrong one.
    written = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    if written.get("", written.get("ai.onnx")) != opset:
        raise ExportError(f"the graph was written with opset {written}, not the requested {opset}; "
                          f"choose another --opset")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters as they are stored."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
