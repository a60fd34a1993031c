"""An int8 KV cache's scales, as the runtime needs them (docs/design.md, "The int8 cache").

The graph quantises the keys and values it computes itself (its scales are initializers); what the
runtime writes into the cache from outside, a prefix adapter's keys and values, it quantises here
with the same scales, exactly as the graph's kernel does: `clip(round(x / scale), -128, 127)`,
round half to even. They are read from the export's `kv_scales.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import manifest as mf
from ..errors import ExportFolderError

INT8_MIN, INT8_MAX = -128, 127


class KVScales:
    """Per layer, K and V (`manifest.past_names` order): a scale per KV head and channel."""

    def __init__(self, scales: Sequence[np.ndarray]) -> None:
        # [kv_heads, 1, head_dim]: broadcasts over [kv_heads, n, head_dim] and [rows, kv_heads, n, head_dim]
        self.scales = [np.asarray(s, np.float32).reshape(s.shape[-3], 1, s.shape[-1]) for s in scales]

    @classmethod
    def load(cls, folder: str | Path, manifest: mf.Manifest) -> "KVScales | None":
        """The export's scales; None for a float cache."""
        if not manifest.kv_quantized:
            return None
        from safetensors.numpy import load_file

        path = Path(folder) / mf.KV_SCALES_NAME
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError) as e:  # missing, truncated, not safetensors
            raise ExportFolderError(f"{path} cannot be read ({e}): an int8 KV cache needs its scales; "
                                    "re-run `prefixport export ... --kv-cache-dtype int8`") from e
        names = mf.past_names(manifest.num_layers)
        want = (1, manifest.num_kv_heads, 1, manifest.head_dim)
        bad = [n for n in names if n not in tensors or tuple(tensors[n].shape) != want]
        if bad:
            raise ExportFolderError(f"{path} lacks {bad[0]} of shape {list(want)}: it does not belong to this "
                                    "export; re-run `prefixport export ... --kv-cache-dtype int8`")
        return cls([tensors[n] for n in names])

    def quantize(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float keys and values ([..., kv_heads, n, head_dim], one per past tensor) as the cache holds them."""
        return [np.clip(np.rint(np.asarray(a, np.float32) / s), INT8_MIN, INT8_MAX).astype(np.int8)
                for a, s in zip(arrays, self.scales, strict=True)]

    def dequantize(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """What the attention reads from int8 keys and values: float32 `q x scale`."""
        return [np.asarray(a, np.float32) * s for a, s in zip(arrays, self.scales, strict=True)]

    def clipped(self, arrays: Sequence[np.ndarray]) -> float:
        """The fraction of float values beyond the int8 range of their channel (saturated)."""
        out = total = 0
        for a, s in zip(arrays, self.scales, strict=True):
            q = np.abs(np.asarray(a, np.float32) / s)
            out += int((q > INT8_MAX + 0.5).sum())
            total += q.size
        return out / max(total, 1)
