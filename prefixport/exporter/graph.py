"""The traced graph: a thin torch module with the inputs of docs/design.md, and its export to ONNX."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import manifest as mf
from ..errors import ExportError
from ..verification import weight_tables
from . import attention, weights as weight_inputs
from .specs import ArchSpec


class GraphModule(torch.nn.Module):
    """The graph of docs/design.md ("The graph contract"): tokens, soft prompt, per-row lengths
    and the KV slot buffers in; logits and the buffers with this call's keys and values out.

    The soft prompt is prepended after the model's embedding module (so any scaling the module
    applies is not applied to it), exactly where PEFT puts it. Positions are the slots: row b's
    query i sits at `past_lengths[b] + i`. Logits are taken at the positions `logits_index` names
    (the runtime passes each row's last real position, `input_lengths - 1`, to generate, and every
    position to score a prompt), so the vocabulary projection runs only where it is needed.
    """

    def __init__(self, model: Any, arch: ArchSpec, fused: bool = False,
                 weights: mf.WeightAdapters | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_layers = arch.num_layers(model.config)
        self.softcap = arch.final_logit_softcap(model.config)
        self.fused = fused
        self.weights = weights
        model.config._attn_implementation = attention.register(fused)
        # LoRA and IA3 per row (weights.py): the wrapped modules read the call's tensors from here
        self.tables = weight_inputs.install(model, arch, weights) if weights else weight_inputs.Tables()
        self.weight_names = weights.input_names(self.num_layers) if weights else []

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64, right-padded
        prompt_embeds: torch.Tensor,  # [B, V, H]
        past_lengths: torch.Tensor,  # [B] int64: filled slots of each row before this call
        input_lengths: torch.Tensor,  # [B] int64: this call's positions of each row, 1..V+S
        logits_index: torch.Tensor,  # [B, K] int64: this call's positions whose logits are returned
        past: list[torch.Tensor],  # 2L x [B, kv_heads, capacity, head_dim]: key, value per layer
        weights: list[torch.Tensor] | None = None,  # LoRA A/B and IA3 per row, in `weight_names` order
    ) -> tuple[torch.Tensor, ...]:
        self.tables.by_name = dict(zip(self.weight_names, weights or []))
        token_embeds = self.model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([prompt_embeds.to(token_embeds.dtype), token_embeds], dim=1)  # [B, Q, H]
        query = inputs_embeds.shape[1]
        cache = attention.SlotCache(list(zip(past[0::2], past[1::2])), past_lengths, input_lengths, query,
                                    self.fused)
        out = self.model.base_model(
            inputs_embeds=inputs_embeds,
            position_ids=cache.positions,
            cache=cache,
            use_cache=True,
            slot_cache=cache,
        )
        hidden = out.last_hidden_state  # [B, Q, H]
        hidden = hidden.gather(1, logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, K, H]
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def sample_inputs(
    arch: ArchSpec, config: Any, dtype: torch.dtype, batch: int, virtual: int, seq: int, past: int,
    capacity: int | None = None, generator: torch.Generator | None = None, scored: int | None = None,
    weights: mf.WeightAdapters | None = None, rank: int = 3,
) -> dict[str, Any]:
    """Random inputs of the given sizes: every row `past` filled slots, `virtual + seq` new ones;
    logits at the last `scored` positions (default: every position); with `weights`, LoRA tables
    of `rank` and IA3 vectors (random, so that the adapted path is checked too)."""
    kv, hd, hidden = arch.num_kv_heads(config), arch.head_dim(config), config.hidden_size
    capacity = capacity or past + virtual + seq
    g = generator
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g),
        "prompt_embeds": torch.randn(batch, virtual, hidden, generator=g).to(dtype) * 0.02,
        "past_lengths": torch.full((batch,), past, dtype=torch.int64),
        "input_lengths": torch.full((batch,), virtual + seq, dtype=torch.int64),
        "logits_index": torch.arange(virtual + seq - (scored or virtual + seq), virtual + seq).repeat(batch, 1),
        "past": [
            torch.randn(batch, kv, capacity, hd, generator=g).to(dtype)
            for _ in range(2 * arch.num_layers(config))
        ],
        **({"weights": [torch.from_numpy(t).to(dtype) for t in weight_tables(
            weights, arch.num_layers(config), batch, rank, np.dtype(np.float32), np.random.default_rng(0)).values()]}
           if weights else {}),
    }


def export_onnx(module: GraphModule, arch: ArchSpec, config: Any, path: Path, opset: int) -> None:
    """torch.onnx.export (dynamo) with every axis of the contract symbolic."""
    dtype = next(module.parameters()).dtype
    # Sizes >= 2 and all different: dynamo turns a sample axis of size 0 or 1 into a constant.
    inputs = sample_inputs(arch, config, dtype, batch=2, virtual=3, seq=5, past=7, capacity=19, scored=4,
                           weights=module.weights, rank=6)
    batch, seq, scored = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("scored")
    virtual, capacity = torch.export.Dim("n_virtual"), torch.export.Dim("capacity")
    rank = torch.export.Dim("lora_rank", min=0)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "prompt_embeds": {0: batch, 1: virtual},
        "past_lengths": {0: batch},
        "input_lengths": {0: batch},
        "logits_index": {0: batch, 1: scored},
        "past": [{0: batch, 2: capacity}] * len(inputs["past"]),
    }
    if module.weights:
        dynamic_shapes["weights"] = [{0: batch} if n.startswith("ia3.") else {0: batch, 1: rank}
                                     for n in module.weight_names]
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
                input_names=mf.input_names(n, module.weights),
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
