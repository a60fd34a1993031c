"""Per-architecture specs: everything prefixport knows about a model family, in one registry.

A spec holds data only. The export path is the same for every architecture: the model's own
embedding module, q/k/v, norms and rotary, with attention over the slot cache (`attention.py`,
whose sliding window comes from each layer's own `sliding_window`); a spec says where the config
keeps the numbers the graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """How to read one architecture's config. `notes` records quirks that the export relies on."""

    model_type: str
    kv_heads_attr: str = "num_key_value_heads"
    layers_path: str = "model.layers"  # the decoder layers under the CausalLM (PEFT's checkpoint keys name them so)
    notes: str = ""

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def num_kv_heads(self, config: Any) -> int:
        return int(getattr(config, self.kv_heads_attr))

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else int(config.hidden_size // config.num_attention_heads)

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings)

    def final_logit_softcap(self, config: Any) -> float | None:
        """tanh soft-capping of the logits that the CausalLM head applies (Gemma), or None."""
        cap = getattr(config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def sliding_window(self, config: Any) -> int | None:
        """The attention window of sliding layers, or None when every layer attends to all."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if not window or (layer_types is not None and "sliding_attention" not in layer_types):
            return None
        return int(window)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    _REGISTRY[spec.model_type] = spec
    return spec


register(ArchSpec("llama", notes="rotary positions from position_ids; grouped-query attention"))
register(ArchSpec("mistral", notes="sliding-window attention: the model's own mask path applies it"))
register(ArchSpec("qwen2", notes="biased q/k/v projections; optional sliding window via layer_types"))
register(ArchSpec("phi3", notes="fused qkv and gate_up projections"))
register(
    ArchSpec(
        "gemma3_text",
        notes="embedding scaled by sqrt(hidden) inside the embedding module, so soft prompts are "
        "not scaled; hybrid sliding/full layers masked by the model; explicit head_dim",
    )
)
register(
    ArchSpec(
        "gpt2",
        kv_heads_attr="n_head",
        layers_path="transformer.h",
        notes="learned absolute positions added inside the model from position_ids; no GQA",
    )
)


def supported() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(config: Any) -> ArchSpec:
    """The spec for a transformers config; a clear error naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported architectures: "
            f"{', '.join(supported())}"
        )
    return _REGISTRY[model_type]
