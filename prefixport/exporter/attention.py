"""Attention over the slot cache (docs/design.md, "The graph contract"): one function that every
architecture's attention module calls through transformers' attention interface.

Each layer's past is a buffer `[batch, kv_heads, capacity, head_dim]`; row b holds `past_lengths[b]`
tokens from slot 0, and this call's `input_lengths[b]` new positions go to the slots after them
(slot index = position). transformers still computes q/k/v, their norms and rotary; only "write the
new keys and values into the buffer, attend" is replaced:

- fused (the default export): one `com.microsoft.GroupQueryAttention` node per layer. It writes in
  place when the runtime binds the same buffer as past and present, masks by per-row length
  (`seqlens_k`), causality and the layer's sliding window (`local_window_size`), and never
  materialises repeated KV heads.
- unfused (`--no-optimize`, TensorRT): a ScatterElements into a copy of the buffer, then the model's
  own eager attention with an additive mask built from the same lengths.

In PyTorch (the reference an export is verified against) the unfused form runs. The per-layer
window comes from transformers' `sliding_window` keyword, so hybrid layers (Gemma 3) stay exact.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

FUSED = "prefixport_gqa"
UNFUSED = "prefixport_slots"
OP = "com.microsoft::GroupQueryAttention"


class _SlotLayer(DynamicLayer):
    """A cache layer that leaves writing to the attention function (no concatenation here)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return key_states, value_states


class SlotCache(DynamicCache):
    """The graph's KV buffers and lengths; the attention function replaces each layer's tensors
    with the present (the same buffer, with this call's keys and values written)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], past_lengths: torch.Tensor,
                 input_lengths: torch.Tensor, query: int, fused: bool) -> None:
        layers = []
        for key, value in past:
            layer = _SlotLayer()
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
            layers.append(layer)
        Cache.__init__(self, layers=layers)
        self.fused = fused
        self.past_lengths = past_lengths  # [B] int64
        total = past_lengths + input_lengths  # [B]: filled slots after this call
        self.seqlens_k = (total - 1).to(torch.int32)  # GroupQueryAttention: total - 1 per row
        self.total_length = total.max().to(torch.int32).reshape(1)
        # Absolute position (= slot) of each query: [B, Q]
        self.positions = past_lengths[:, None] + torch.arange(query, dtype=torch.int64)[None, :]
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, capacity_like: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, Q, capacity]: a query attends to slots up to its own, and within
        the window where the layer has one. Padded queries attend too; their outputs are unused."""
        if window not in self._masks:
            slots = torch.arange(capacity_like.shape[2], dtype=torch.int64)[None, None, :]
            pos = self.positions[:, :, None]
            allowed = slots <= pos
            if window:
                allowed = allowed & (slots > pos - window)
            zero = torch.zeros((), dtype=dtype)
            self._masks[window] = torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
        return self._masks[window]


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, Q, D], rotated
    key: torch.Tensor,  # [B, KVH, Q, D]: this call's positions only (see _SlotLayer)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # ignored: the mask comes from the lengths
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    slot_cache: SlotCache | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: returns [B, Q, H, D] like the eager one."""
    if slot_cache is None:
        raise RuntimeError("slot attention needs the graph's SlotCache")
    layer = slot_cache.layers[module.layer_idx]
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if slot_cache.fused and torch.onnx.is_in_onnx_export():
        out, layer.keys, layer.values = _onnx_gqa(query, key, value, layer, slot_cache, scale, softcap,
                                                  sliding_window)
        return out, None
    index = slot_cache.positions[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
    layer.keys = layer.keys.scatter(2, index, key)
    layer.values = layer.values.scatter(2, index, value)
    mask = slot_cache.mask(layer.keys, sliding_window, query.dtype)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    extra = {"softcap": softcap} if softcap is not None else {}
    out, _ = eager(module, query, layer.keys, layer.values, mask, scaling=scale, dropout=dropout, **extra)
    return out, None


def _onnx_gqa(query, key, value, layer, cache: SlotCache, scale: float, softcap: float | None,
              window: int | None):
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]

    def packed(x: torch.Tensor) -> torch.Tensor:  # [B, N, S, D] -> [B, S, N * D]
        return x.transpose(1, 2).reshape(batch, seq, x.shape[1] * dim)

    attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": scale}
    if softcap:
        attrs["softcap"] = float(softcap)
    if window:
        # ONNX Runtime 1.32's CPU kernel attends to the last `local_window_size` slots, as transformers'
        # `sliding_window` (measured against the PyTorch form on Gemma 3, beyond the window)
        attrs["local_window_size"] = int(window)
    out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        OP,
        [packed(query), packed(key), packed(value), layer.keys, layer.values, cache.seqlens_k, cache.total_length],
        attrs,
        dtypes=(query.dtype, key.dtype, value.dtype),
        shapes=([batch, seq, heads * dim], list(layer.keys.shape), list(layer.values.shape)),
        version=1,
    )
    return out.reshape(batch, seq, heads, dim), present_key, present_value


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The model builds no mask of its own: lengths, causality and windows live in the attention."""
    return None


def register(fused: bool) -> str:
    """Make slot attention a transformers attention implementation; returns its name."""
    name = FUSED if fused else UNFUSED
    AttentionInterface.register(name, slot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, _no_mask)
    return name
