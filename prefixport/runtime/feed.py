"""`AdapterFeed`: what an adapter adds to a row, as the backend holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AdapterFeed:
    """What an adapter adds to a row: a soft prompt, a prefix's keys and values, or a LoRA's or
    IA3's tables, as the backend holds them (on its device)."""

    prompt_embeds: Any = None  # [1, V, H] (`Backend.upload`)
    virtual: int = 0  # V
    past: list[Any] | None = None  # 2 per layer: [1, kv_heads, P, head_dim]
    past_len: int = 0
    # a LoRA's or IA3's tables, by graph input name, each [1, 1, n, dim] (`weight_rows.py`)
    weights: dict[str, Any] | None = None
    name: str | None = None  # the adapter's registered name (None: no adapter)
    digest: str = ""  # of its tensors: the prompt cache keys its chains by name and digest

    @property
    def identity(self) -> str:
        """Name and tensor digest: what keys the adapter's prompt cache chains and lookup history."""
        return f"{self.name}:{self.digest}"

    @property
    def n_virtual(self) -> int:
        return self.past_len if self.past is not None else self.virtual
