"""`prefixport.json`: what the runtime needs to know about an export (docs/design.md, "The export
folder"). `FORMAT_VERSION` is the graph contract's version: the runtime refuses any other."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportFolderError

# 2: the slot cache (per-row lengths, one buffer for past and present); 3: logits_index; 4: LoRA and IA3
# tables per row (`weight_adapters`, absent from an export made without --lora)
FORMAT_VERSION = 4
MANIFEST_NAME = "prefixport.json"
MODEL_NAME = "model.onnx"
# An export with --lora: the same graph without its LoRA and IA3 inputs, run where no row holds any
# (docs/design.md, "LoRA and IA3": "The plain graph beside it")
PLAIN_MODEL_NAME = "plain.onnx"
# "shared": the runtime binds one buffer as past and present (GroupQueryAttention writes in place);
# "copy": present is a separate buffer of the same shape (plain ONNX ops write a copy).
CACHE_MODES = ("shared", "copy")
TOKENIZER_NAME = "tokenizer.json"
# The KV cache's element type (`prefixport export --kv-cache-dtype`): the export's own float dtype, or
# int8 (GroupQueryAttention's 8-bit cache with per-channel scales fixed at export: docs/design.md)
KV_DTYPES = ("float32", "float16", "int8")
KV_SCALES_NAME = "kv_scales.safetensors"  # an int8 cache's scales, for the runtime (prefix adapters)


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def past_names(num_layers: int) -> list[str]:
    """Past inputs (and prefix bundle tensors) in graph order: key, value per layer."""
    return [n for i in range(num_layers) for n in (past_key_name(i), past_value_name(i))]


def lora_a_name(layer: int, path: str) -> str:
    """A LoRA's A of decoder layer `layer`'s linear module `path` (e.g. "self_attn.q_proj"): PEFT's
    lora_A.weight [r, in], in a bundle; as a graph input [batch, rank, in]."""
    return f"lora.{layer}.{path}.a"


def lora_b_name(layer: int, path: str) -> str:
    """A LoRA's B: as a graph input [batch, rank, out] (B transposed, times the scaling); in a bundle
    PEFT's lora_B.weight [out, r]."""
    return f"lora.{layer}.{path}.b"


def ia3_name(layer: int, path: str) -> str:
    """An IA3 vector of layer `layer`'s module `path`: [batch, 1, dim] as a graph input, [dim] in a bundle."""
    return f"ia3.{layer}.{path}"


@dataclass(frozen=True)
class WeightAdapters:
    """What an export made with `--lora` takes per row beside the soft prompt and the prefix
    (docs/design.md, "LoRA and IA3"): for each decoder layer, a LoRA's A and B for every module of
    `lora` (rank up to `max_rank`, zero-padded) and an IA3 vector for every module of `ia3`, which
    scales the module's input ("input": PEFT's feedforward modules) or its output ("output").
    `shapes`: each module's [in, out] features; `layers_path`: where the model keeps its decoder
    layers (as PEFT's checkpoint keys name them, e.g. "model.layers")."""

    max_rank: int
    shapes: dict[str, list[int]]
    lora: list[str]
    ia3: dict[str, str]
    layers_path: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightAdapters":
        return cls(int(data["max_rank"]), {k: list(v) for k, v in data["shapes"].items()}, list(data["lora"]),
                   dict(data["ia3"]), str(data["layers_path"]))

    def ia3_dim(self, path: str) -> int:
        """An IA3 vector's length: the module's input features where it scales the input, else its output's."""
        features_in, features_out = self.shapes[path]
        return features_in if self.ia3[path] == "input" else features_out

    def row_shape(self, name: str, rank: int) -> tuple[int, int]:
        """One row's shape of the input `name` at LoRA rank `rank`: [rank, in] for an A, [rank, out]
        for a B, [1, dim] for an IA3 vector."""
        path = name.split(".", 2)[2]  # lora.{layer}.{path}.a|b, ia3.{layer}.{path}
        if name.startswith("ia3."):
            return 1, self.ia3_dim(path)
        features_in, features_out = self.shapes[path.rsplit(".", 1)[0]]
        return rank, features_in if name.endswith(".a") else features_out

    def input_names(self, num_layers: int) -> list[str]:
        """The graph inputs in graph order: per layer, each LoRA module's A and B, then each IA3 vector."""
        names = []
        for layer in range(num_layers):
            for path in self.lora:
                names += [lora_a_name(layer, path), lora_b_name(layer, path)]
            names += [ia3_name(layer, path) for path in self.ia3]
        return names


def input_names(num_layers: int, weights: WeightAdapters | None = None) -> list[str]:
    return ["input_ids", "prompt_embeds", "past_lengths", "input_lengths", "logits_index", *past_names(num_layers),
            *(weights.input_names(num_layers) if weights else [])]


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [present_key_name(i), present_value_name(i)]
    return names


@dataclass
class Manifest:
    """The contents of `prefixport.json`. Shapes follow docs/design.md's graph contract."""

    architecture: str  # the Hugging Face model_type, e.g. "llama"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: str  # "float32" | "float16": prompt_embeds, past/present and logits
    max_positions: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None
    fingerprint: str  # sha256 over the base model's weights
    source: str  # the model spec it was exported from
    # Window of sliding-attention layers (None: none). The graph masks by slot (= position), so a
    # row's slots hold its prefix, soft prompt and tokens contiguously from slot 0.
    sliding_window: int | None = None
    cache: str = "shared"  # CACHE_MODES
    fused_ops: dict[str, int] = field(default_factory=dict)  # ONNX Runtime contrib ops in the graph
    quantization: dict[str, Any] | None = None  # weight-only quantisation and its agreement with float
    # The cache's dtype: past/present (`dtype` where absent: manifests before the int8 cache). "int8":
    # `kv_quantization` says how (scales in KV_SCALES_NAME, calibration, agreement with the float cache).
    kv_dtype: str = ""
    kv_quantization: dict[str, Any] | None = None
    # LoRA and IA3 inputs (`export --lora`): WeightAdapters as a dict; None: the export takes none
    weight_adapters: dict[str, Any] | None = None
    # Such an export's PLAIN_MODEL_NAME, where it has one (exports made before it have none)
    plain_graph: str | None = None
    # One PEFT LoRA folded into the weights at export (`export --merge-lora`; exporter/merge.py): its
    # source folder, the sha256 of its adapter_model.safetensors, rank, targets. None: the base weights
    # as loaded. `fingerprint` is then the merged weights'.
    merged_lora: dict[str, Any] | None = None
    opset: int = 18
    format_version: int = FORMAT_VERSION
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    exporter: dict[str, str] = field(default_factory=dict)  # library versions used

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = input_names(self.num_layers, self.weights)
        if not self.outputs:
            self.outputs = output_names(self.num_layers)
        if not self.kv_dtype:
            self.kv_dtype = self.dtype

    @property
    def weights(self) -> WeightAdapters | None:
        """The LoRA and IA3 inputs the graph takes, or None (an export without --lora)."""
        return WeightAdapters.from_dict(self.weight_adapters) if self.weight_adapters else None

    @property
    def kv_quantized(self) -> bool:
        """Whether the cache holds integers (scaled per channel) rather than the export's floats."""
        return self.kv_dtype == "int8"

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():  # a wrong path, most often: never suggest exporting into it
            what = f"holds no prefixport export (no {MANIFEST_NAME})" if Path(folder).is_dir() else "is not a folder"
            raise ExportFolderError(f"{folder} {what}; check the path, or make an export with `prefixport export OUTDIR`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportFolderError(f"{path} cannot be read ({e}); re-run `prefixport export`") from e
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportFolderError(
                f"{path} has graph contract version {version!r}, this prefixport reads version "
                f"{FORMAT_VERSION} (the slot KV cache, logits at the positions asked for, LoRA and IA3 inputs); re-export the model with this version: "
                f"prefixport export {Path(folder)} --overwrite"
            )
        if data.get("kv_dtype") not in (None, "", *KV_DTYPES):
            raise ExportFolderError(f"{path} has a KV cache of dtype {data['kv_dtype']!r}; this prefixport "
                                    f"reads {', '.join(KV_DTYPES)}: re-export the model with this version")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise ExportFolderError(f"{path} is incomplete ({e}); re-run `prefixport export`") from e
