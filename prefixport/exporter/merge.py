"""`prefixport export --merge-lora PEFT_DIR` (docs/export.md, "Merging one LoRA"): one PEFT LoRA
folded into the base weights before tracing, so that the export computes base + LoRA at no run-time
cost.

The checkpoint is read by prefixport's own readers (`adapters.peft.read_config` / `read_weights`:
adapter_model.safetensors only; a pickle is refused, never opened). PEFT then merges it, as
`PeftModel.from_pretrained(model, DIR).merge_and_unload()` would, but fed with those tensors: PEFT
opens no file of the folder. Its merge is W += s·B·A (Conv1D's fan_in_fan_out, rsLoRA, rank_pattern
and alpha_pattern as PEFT reads them), or DoRA's W' = m · (W + s·B·A) / ‖W + s·B·A‖ per output row:
exactly what PEFT's unmerged forward computes, up to float rounding (tests/test_merge_lora.py).

Refused, each with why (`read_lora`, `merge_lora`): another PEFT type (prompt, prefix and IA3
adapters convert to bundles instead), the LoRA variants PEFT computes otherwise or that are not
checked here, inits that rewrite the base weights (PiSSA, ...), trained base biases,
modules_to_save and trainable tokens (more than a LoRA), a LoRA on a weight tied to another module
(the tied lm_head and embedding: merging into one changes both), and a checkpoint that does not fit
the base model (modules it lacks, other shapes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters.lora import REWRITING_INITS, VARIANTS
from ..adapters.peft import WEIGHTS, read_config, read_weights
from ..errors import AdapterError, shown

MERGEABLE_VARIANTS = ("use_dora",)  # of lora.VARIANTS: PEFT merges DoRA exactly (checked in the tests)
# What PEFT's merge of these module types computes is checked against its unmerged forward in the tests
MERGEABLE_LAYERS = ("Linear", "Embedding")
DORA_VARIANTS = ("DoraLinearVariant",)
WHY_NOT = "--merge-lora folds a LoRA's A and B into the weights they adapt, and nothing else"
DIY = ("merge it with PEFT yourself (PeftModel.from_pretrained(model, DIR).merge_and_unload()), save the merged model "
       "with save_pretrained(FOLDER, safe_serialization=True) where you trust the checkpoint, and export FOLDER")


@dataclass(frozen=True)
class LoraCheckpoint:
    """A PEFT LoRA checkpoint as read for merging: adapter_config.json, the tensors of
    adapter_model.safetensors and that file's sha256."""

    folder: Path
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    digest: str


def read_lora(peft_dir: str | Path) -> LoraCheckpoint:
    """Read and check a PEFT LoRA checkpoint folder for merging (without a model): an AdapterError for
    any checkpoint that is not a LoRA --merge-lora can fold into the base weights exactly."""
    folder = Path(peft_dir)
    if not folder.is_dir():
        raise AdapterError(f"--merge-lora {folder}: no such PEFT checkpoint folder")
    config = read_config(folder)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        if peft_type in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "PREFIX_TUNING", "IA3"):
            raise AdapterError(
                f"{folder} is not a LoRA but {peft_type} (adapter_config.json's peft_type); --merge-lora merges LoRA "
                f"only. Serve it per request instead: `prefixport adapter convert {folder} --export OUTDIR`"
                + (" (IA3 needs an export made with --lora; its vectors cost one multiply per module)"
                   if peft_type == "IA3" else " (any export takes it)"))
        raise AdapterError(f"{folder} is not a LoRA but {shown(peft_type)} (adapter_config.json's peft_type); "
                           "--merge-lora merges LoRA only")
    for name, why in VARIANTS.items():
        if name not in MERGEABLE_VARIANTS and config.get(name):
            raise AdapterError(f"{folder} is a LoRA variant --merge-lora does not merge: {why}. "
                               f"To export it anyway, {DIY}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
        raise AdapterError(
            f"{folder} was initialised with init_lora_weights={init!r}, which "
            + ("replaces the base weights by quantised ones" if init.lower() == "loftq" else
               "subtracts the initial B·A from the base weights (PEFT redoes it, by a new SVD, each time it loads "
               "the adapter)")
            + ": its A and B only hold on that modified base. Have PEFT save it as a plain LoRA: "
              "`model.save_pretrained(DIR, path_initial_model_for_weight_conversion=INIT_DIR)`, then merge DIR")
    for name, what in (("modules_to_save", "whole modules"), ("trainable_token_indices", "some token embeddings")):
        if config.get(name):
            raise AdapterError(f"{folder} also trained {what} ({name}: {shown(config[name])}), saved beside the LoRA; "
                               f"{WHY_NOT}. Train without {name}, or {DIY}")
    weights = read_weights(folder)
    biases = sorted(k for k in weights if k.endswith(".bias"))
    if config.get("bias", "none") != "none" and biases:
        raise AdapterError(f"{folder} was trained with bias={config['bias']!r}, which trains the base model's own "
                           f"biases ({biases[0]}, ...); {WHY_NOT}. Train with bias='none', or {DIY}")
    for key, t in weights.items():
        if t.dtype not in (np.float32, np.float16):
            raise AdapterError(f"{folder}: {key} has dtype {t.dtype}; expected float32 or float16 (re-save the adapter "
                               "in float32)")
        if not np.isfinite(t).all():
            raise AdapterError(f"{folder}: {key} holds NaN or Inf values; the adapter is broken (re-train or "
                               "re-save it)")
    if not weights:
        raise AdapterError(f"{folder}/{WEIGHTS} holds no tensors; re-save the adapter with PEFT")
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    return LoraCheckpoint(folder, config, weights, "sha256:" + digest)


def _peft_config(checkpoint: LoraCheckpoint) -> Any:
    """The checkpoint's LoraConfig, built from the config read here. Fields this PEFT does not know
    are refused unless unset (a newer PEFT's option may change the forward); the init is made PEFT's
    default, since every value it initialises is replaced by the checkpoint's (the inits that rewrite
    the base weights were refused)."""
    import peft
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k, v in checkpoint.config.items() if k not in known and v not in (None, False, "", [], {}))
    if unknown:
        raise AdapterError(f"{checkpoint.folder}/adapter_config.json sets {', '.join(unknown)}, which PEFT "
                           f"{peft.__version__} does not know (saved by a newer PEFT?); what it changes cannot be "
                           "merged here. Upgrade peft, or re-save the adapter with this version")
    kwargs = {k: v for k, v in checkpoint.config.items() if k in known and k != "runtime_config"}
    kwargs.update(init_lora_weights=True, inference_mode=True)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{checkpoint.folder}/adapter_config.json is not a valid LoRA config for PEFT "
                           f"{peft.__version__} ({e}); re-save the adapter with PEFT") from e


def merge_lora(model: Any, peft_dir: str | Path | LoraCheckpoint, layers_path: str | None = None) -> dict[str, Any]:
    """Fold the LoRA of `peft_dir` into `model`'s weights, in place (its train/eval mode and
    requires_grad flags kept). Returns what the manifest records (`merged_lora`): the source folder,
    the sha256 of its adapter_model.safetensors, the PEFT type, the largest rank, lora_alpha, rsLoRA,
    DoRA, the adapted modules (paths within a decoder layer where `layers_path` names the model's
    decoder layers, else full names) and how many. A checkpoint that does not fit the model is an
    AdapterError, and the model is then left as it was."""
    import warnings

    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    checkpoint = peft_dir if isinstance(peft_dir, LoraCheckpoint) else read_lora(peft_dir)
    folder = checkpoint.folder
    config = _peft_config(checkpoint)
    training = model.training
    trainable = [(p, p.requires_grad) for p in model.parameters()]  # PEFT freezes the base weights
    with warnings.catch_warnings():  # PEFT's notes on Conv1D's fan_in_fan_out and the like
        warnings.simplefilter("ignore")
        try:
            wrapped = get_peft_model(model, config)
        except Exception as e:  # ValueError, peft's NoMatchingPeftModuleError, ...
            raise AdapterError(f"{folder} does not fit this base model ({e}); was it trained for another model?") from e
    try:
        layers = {name: m for name, m in wrapped.get_base_model().named_modules() if isinstance(m, LoraLayer)}
        _check_layers(layers, wrapped, folder)
        expected = {k: tuple(v.shape) for k, v in
                    get_peft_model_state_dict(wrapped, save_embedding_layers=False).items()}
        keys = _check_keys(expected, checkpoint, dict(wrapped.named_parameters()))
        result = set_peft_model_state_dict(wrapped, {k: torch.from_numpy(np.ascontiguousarray(checkpoint.weights[k]))
                                                     for k in keys})
        if getattr(result, "unexpected_keys", None):
            raise AdapterError(f"{folder}: PEFT did not place {shown(sorted(result.unexpected_keys))}; was the adapter "
                               "trained for another model?")
        ranks = [int(m.r["default"]) for m in layers.values()]
    except BaseException:
        wrapped.unload()  # the model as it was, without the adapter's layers
        _restore(model, training, trainable)
        raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            merged = wrapped.merge_and_unload(safe_merge=True)  # NaN or Inf in a merged weight: ValueError
        except ValueError as e:
            raise AdapterError(f"merging {folder}: {e}") from e
    assert merged is model, "PEFT's merge_and_unload returns the model it was given"
    _restore(model, training, trainable)
    return {"source": str(folder), "digest": checkpoint.digest, "peft_type": "LORA", "rank": max(ranks),
            "lora_alpha": checkpoint.config.get("lora_alpha"), "use_rslora": bool(config.use_rslora),
            "use_dora": bool(config.use_dora), "targets": _targets(layers, layers_path), "modules": len(layers)}


def _restore(model: Any, training: bool, trainable: list[tuple[Any, bool]]) -> None:
    model.train(training)
    for p, flag in trainable:
        p.requires_grad_(flag)
    if hasattr(model, "peft_config"):
        del model.peft_config


def _check_layers(layers: dict[str, Any], wrapped: Any, folder: Path) -> None:
    """What PEFT made of the config on this model: only module types and variants whose merge the
    tests check, and no weight shared with another module."""
    if not layers:
        raise AdapterError(f"{folder}: its target_modules match no module of this base model; was it trained for "
                           "another model?")
    owners: dict[int, list[str]] = {}
    for name, p in wrapped.get_base_model().named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in layers.items():
        kind = type(layer).__name__
        if kind not in MERGEABLE_LAYERS:
            raise AdapterError(f"{folder} adapts {name}, a {kind} layer; --merge-lora merges LoRA on linear and "
                               f"embedding modules only. To export it anyway, {DIY}")
        variant = layer.lora_variant.get("default")
        if variant is not None and type(variant).__name__ not in DORA_VARIANTS:
            raise AdapterError(f"{folder} is a LoRA variant ({type(variant).__name__} on {name}) that --merge-lora "
                               f"has not been checked against PEFT with. To export it anyway, {DIY}")
        weight = layer.get_base_layer().weight
        shared = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if shared:
            raise AdapterError(f"{folder} adapts {name}, whose weight is tied to {shared[0].removesuffix('.weight')} "
                               "(one tensor): merging the LoRA into it would change both modules, while PEFT's "
                               f"unmerged adapter changes {name} only. Train without {name.rsplit('.', 1)[-1]} in "
                               "target_modules, or untie the weights and export that model")


def _check_keys(expected: dict[str, tuple[int, ...]], checkpoint: LoraCheckpoint, params: dict[str, Any]) -> list[str]:
    """The checkpoint's tensors to load: exactly those PEFT's config makes on this model, in their
    shapes. A base weight PEFT saved beside them (an adapted embedding's or lm_head's whole weight,
    `save_embedding_layers`) is left out where it equals the model's, and refused where it differs."""
    import torch

    folder, weights = checkpoint.folder, checkpoint.weights
    for key in sorted(set(weights) - set(expected)):
        param = params.get(key) if key.endswith(".base_layer.weight") else None
        if param is None:
            continue
        if tuple(param.shape) != weights[key].shape or not torch.equal(
                param.detach(), torch.from_numpy(weights[key]).to(param.dtype)):
            name = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
            raise AdapterError(f"{folder}/{WEIGHTS} holds the whole weight of {name} (PEFT saves it beside a LoRA on "
                               "an embedding or lm_head), and it differs from this base model's: the adapter was "
                               "trained on another base model, or with a resized vocabulary, and PEFT would load that "
                               f"weight in place of the model's. {WHY_NOT}: merge it on the model it was trained on")
    extra = sorted(k for k in set(weights) - set(expected) if not k.endswith(".base_layer.weight") or k not in params)
    if extra:
        raise AdapterError(f"{folder}/{WEIGHTS} holds {_key(extra[0])}{_more(extra)}, "
                           "for which its config makes no module on this base model; was it trained for another "
                           "model?")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterError(f"{folder}/{WEIGHTS} lacks {_key(missing[0])}{_more(missing)}, "
                           "which its adapter_config.json (target_modules, layers_to_transform) makes PEFT create on "
                           "this base model; was it trained for another model, or the config edited?")
    for key, shape in sorted(expected.items()):
        if tuple(weights[key].shape) != shape:
            raise AdapterError(f"{folder}: {_key(key)} has shape {list(weights[key].shape)}, while this base model's "
                               f"module and adapter_config.json (r, rank_pattern) make it {list(shape)}; was it trained "
                               "for another base model?")
    return sorted(expected)


def _key(key: str) -> str:
    """A checkpoint key as the message shows it: quoted, without PEFT's wrapper prefix, at most 100 characters."""
    text = repr(key.removeprefix("base_model.model."))
    return text if len(text) <= 100 else text[:97] + "..."


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def _targets(layers: dict[str, Any], layers_path: str | None) -> list[str]:
    """The adapted modules: paths within a decoder layer (e.g. "self_attn.q_proj") for the modules of
    `layers_path`.N, full names for the others."""
    head = re.compile(rf"{re.escape(layers_path)}\.[0-9]+\.") if layers_path else None
    return sorted({head.sub("", name, count=1) if head and head.match(name) else name for name in layers})


__all__ = ["LoraCheckpoint", "merge_lora", "read_lora"]
