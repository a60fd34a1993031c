"""Fused attention for the exported graph: one ONNX Runtime `GroupQueryAttention` node per layer.

transformers still computes q/k/v, rotary and its own 4D additive mask (causal, padding, sliding
window: every architecture quirk stays the model's). Only "append to the cache, attend" is
replaced: in the ONNX graph by `com.microsoft.GroupQueryAttention`, which appends the new keys
and values to the past itself, attends with the mask as `attention_bias` and never materialises
repeated KV heads; in PyTorch (the reference the export is verified against) by the model's own
eager attention after a plain concatenation, exactly as unfused.

Every row's cache holds the same number of slots (the graph contract), so `seqlens_k` is
total - 1 for every row and padding lives in the mask alone. ONNX Runtime's kernel refuses one
shape: batch > 1 with both a past and more than one new position; the runtime never feeds it
(rows are prefilled one at a time).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

NAME = "prefixport_gqa"
OP = "com.microsoft::GroupQueryAttention"


class _PastLayer(DynamicLayer):
    """A cache layer that leaves appending to the fused attention (no concatenation here)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return key_states, value_states


class FusedCache(DynamicCache):
    """The graph's past KV; `fused_attention` replaces each layer's tensors with the present."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor) -> None:
        layers = []
        for key, value in past:
            layer = _PastLayer()
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
            layers.append(layer)
        Cache.__init__(self, layers=layers)
        # seqlens_k (total - 1 per row) and total_sequence_length, once for all layers.
        ones = torch.ones_like(attention_mask, dtype=torch.int32)
        self.seqlens_k = ones.sum(dim=1, dtype=torch.int32) - 1
        self.total_length = ones[0].sum(dtype=torch.int32)


def fused_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, S, D], rotated
    key: torch.Tensor,  # [B, KVH, S, D] new positions only (see _PastLayer)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # [B, 1, S, P + S] additive, from the model's eager mask
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    fused_cache: FusedCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: returns [B, S, H, D] like the eager one."""
    if fused_cache is None or attention_mask is None:
        raise RuntimeError("fused attention needs the graph's FusedCache and the model's 4D mask")
    layer = fused_cache.layers[module.layer_idx]
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if torch.onnx.is_in_onnx_export():
        out, layer.keys, layer.values = _onnx_gqa(query, key, value, layer, fused_cache, attention_mask,
                                                  scale, softcap)
        return out, None
    layer.keys = torch.cat([layer.keys, key], dim=-2)
    layer.values = torch.cat([layer.values, value], dim=-2)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    extra = {"softcap": softcap} if softcap is not None else {}
    out, _ = eager(module, query, layer.keys, layer.values, attention_mask, scaling=scale, dropout=dropout, **extra)
    return out, None


def _onnx_gqa(query, key, value, layer, cache: FusedCache, bias, scale: float, softcap: float | None):
    batch, heads, seq, dim = query.shape
    kv_heads, past = key.shape[1], layer.keys.shape[2]

    def packed(x: torch.Tensor) -> torch.Tensor:  # [B, N, S, D] -> [B, S, N * D]
        return x.transpose(1, 2).reshape(batch, seq, x.shape[1] * dim)

    attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": scale}
    if softcap:
        attrs["softcap"] = float(softcap)
    out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        OP,
        [packed(query), packed(key), packed(value), layer.keys, layer.values, cache.seqlens_k,
         cache.total_length, None, None, None, bias.to(query.dtype)],
        attrs,
        dtypes=(query.dtype, key.dtype, value.dtype),
        shapes=([batch, seq, heads * dim], [batch, kv_heads, past + seq, dim], [batch, kv_heads, past + seq, dim]),
        version=1,
    )
    return out.reshape(batch, seq, heads, dim), present_key, present_value


def register() -> str:
    """Make `NAME` a transformers attention implementation (with the eager, additive mask)."""
    AttentionInterface.register(NAME, fused_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME
