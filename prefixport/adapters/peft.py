"""PEFT checkpoint (adapter_config.json + adapter_model.safetensors) -> Bundle, without torch.

Semantics (docs/design.md, peft 0.21):
- PROMPT_TUNING, P_TUNING: the saved `prompt_embeddings` [n_virtual, hidden] already is the soft
  prompt (PEFT saves the prompt encoder's output, MLP or LSTM included).
- MULTITASK_PROMPT_TUNING: task t's prompt is prompt_embeddings * (prefix_task_cols[t] @ prefix_task_rows[t]).
- PREFIX_TUNING: prompt_embeddings [n_virtual, num_layers * 2 * kv_heads * head_dim] (after the
  projection MLP when prefix_projection was on), viewed as [n_virtual, 2 * num_layers, kv_heads,
  head_dim]; index 2l is layer l's key, 2l + 1 its value.
- LORA, IA3: the saved lora_A / lora_B weights and ia3_l vectors per module of the decoder layers
  (`lora.py`, which also says what is refused and why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..errors import AdapterError, shown
from .base_model import model_name, same_model
from .bundle import Bundle, check_bundle, check_fits, make_bundle, read_safetensors
from .lora import convert_ia3, convert_lora
from .prompt_format import PromptFormat

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
WEIGHT_TYPES = {"LORA": "lora", "IA3": "ia3"}  # PEFT type -> bundle kind
SUPPORTED = (*PROMPT_TYPES, "PREFIX_TUNING", *WEIGHT_TYPES)
WEIGHTS = "adapter_model.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{peft_dir} has no adapter_config.json, so it is not a PEFT checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: also JSONDecodeError, UnicodeDecodeError and integers of over 4300 digits;
    # RecursionError: arrays or objects nested thousands deep
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); re-save the adapter with PEFT") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return config


def _field(config: dict[str, Any], name: str, where: Path) -> Any:
    if config.get(name) is None:
        raise AdapterError(f"{where}/adapter_config.json lacks the field {name!r}; re-save the adapter with PEFT")
    return config[name]


def _int_field(config: dict[str, Any], name: str, where: Path) -> int:
    """A whole-number field (PEFT writes JSON integers; anything else is refused, not truncated)."""
    value = _field(config, name, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{where}/adapter_config.json: {name} is {shown(value)}, not a whole number; re-save the "
                           "adapter with PEFT")
    return value


def read_weights(peft_dir: Path) -> dict[str, np.ndarray]:
    """The tensors of adapter_model.safetensors. A pickle is refused, never opened."""
    path = peft_dir / WEIGHTS
    if not path.is_file():
        pickles = [p for p in PICKLES if (peft_dir / p).exists()]
        if pickles:
            raise AdapterError(
                f"{peft_dir} holds {pickles[0]}, a pickle, which prefixport never loads (unpickling runs "
                "arbitrary code). Re-save it as safetensors where you trust the file: "
                "`PeftModel.from_pretrained(base_model, DIR).save_pretrained(DIR, safe_serialization=True)`"
            )
        raise AdapterError(f"{peft_dir} has no {WEIGHTS}; save the adapter with PEFT's `save_pretrained` "
                           "(safetensors is its default)")
    return read_safetensors(path, "")[0]


def _tensor(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
    if name not in weights:
        raise AdapterError(f"{where}/{WEIGHTS} lacks the tensor {name!r} (has: {sorted(weights)[:6]})")
    t = weights[name]
    if t.dtype not in (np.float32, np.float16):
        raise AdapterError(f"{where}: {name} has dtype {t.dtype}; expected float32 or float16 (bfloat16: "
                           "re-save the adapter in float32)")
    if t.shape != shape:
        raise AdapterError(f"{where}: {name} has shape {list(t.shape)}, expected {list(shape)} for this export "
                           f"and adapter_config.json; was it trained for another base model?")
    return t


def convert(peft_dir: str | Path, manifest: mf.Manifest, name: str | None = None,
            task: int | None = None, prompt_format: str | None = None, force: bool = False) -> Bundle:
    """Convert a PEFT checkpoint folder to a bundle for the export described by `manifest`;
    `prompt_format` (raw, chat or a template with one {prompt}) records how its prompts were
    formatted in training (None: not recorded). A checkpoint whose `base_model_name_or_path`
    names another model than the export's `source` is refused (`check_base_model`) unless `force`.
    The bundle records the base model's name (`source`), never a local path."""
    peft_dir = Path(peft_dir)
    if prompt_format is not None:
        PromptFormat.parse(prompt_format, "--prompt-format")
    if not peft_dir.is_dir():
        raise AdapterError(f"{peft_dir}: no such PEFT checkpoint folder")
    config = read_config(peft_dir)
    peft_type = _field(config, "peft_type", peft_dir)
    if peft_type not in SUPPORTED:
        raise AdapterError(f"PEFT type {shown(peft_type)} is not supported; supported: {', '.join(SUPPORTED)}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{peft_dir}: an encoder-decoder adapter (num_transformer_submodules="
                           f"{shown(config['num_transformer_submodules'])}); only decoder-only models are supported")
    n_virtual = 0 if peft_type in WEIGHT_TYPES else _int_field(config, "num_virtual_tokens", peft_dir)
    if n_virtual < 1 and peft_type not in WEIGHT_TYPES:
        raise AdapterError(f"{peft_dir}: num_virtual_tokens must be >= 1, got {n_virtual}")
    weights = read_weights(peft_dir)
    if peft_type != "MULTITASK_PROMPT_TUNING" and task is not None:
        raise AdapterError(f"--task applies to multitask prompt tuning only; this adapter is {peft_type}")
    extra = {"source": model_name(config.get("base_model_name_or_path"))}
    if prompt_format is not None:
        extra["prompt_format"] = prompt_format
    if peft_type in WEIGHT_TYPES:
        kind = WEIGHT_TYPES[peft_type]
        tensors, more = (convert_lora if kind == "lora" else convert_ia3)(config, weights, manifest, peft_dir)
        extra.update(more)
    elif peft_type in PROMPT_TYPES:
        token_dim = _int_field(config, "token_dim", peft_dir)
        if token_dim != manifest.hidden_size:
            raise AdapterError(f"{peft_dir}: token_dim {token_dim} does not match this export's hidden size "
                               f"{manifest.hidden_size}; the adapter was trained for another base model")
        prompt = _tensor(weights, "prompt_embeddings", (n_virtual, token_dim), peft_dir)
        if peft_type == "MULTITASK_PROMPT_TUNING":
            prompt, task = _task_prompt(config, weights, prompt, task, peft_dir)
            extra["task"] = str(task)
        tensors = {"prompt_embeds": prompt}
        kind = "prompt"
    else:
        layers, kv, hd = manifest.num_layers, manifest.num_kv_heads, manifest.head_dim
        if _int_field(config, "num_layers", peft_dir) != layers:
            raise AdapterError(f"{peft_dir}: num_layers {config['num_layers']} does not match this export's "
                               f"{layers}; the adapter was trained for another base model")
        flat = _tensor(weights, "prompt_embeddings", (n_virtual, layers * 2 * kv * hd), peft_dir)
        # [V, 2L, kv, hd] -> [2L, kv, V, hd]
        stacked = flat.reshape(n_virtual, 2 * layers, kv, hd).transpose(1, 2, 0, 3)
        names = mf.past_names(layers)
        tensors = {n: np.ascontiguousarray(stacked[j]) for j, n in enumerate(names)}
        kind = "prefix"
    bundle = make_bundle(name=name or peft_dir.name, kind=kind, tensors=tensors,
                         fingerprint=manifest.fingerprint, peft_type=peft_type, **extra)
    check_bundle(bundle, str(peft_dir))
    check_fits(bundle, manifest, str(peft_dir))
    if not force:
        check_base_model(config.get("base_model_name_or_path"), manifest, peft_dir)
    return bundle


def check_base_model(base: object, manifest: mf.Manifest, where: Path) -> None:
    """Refuse a checkpoint trained on another model than the export's (by name: `same_model`;
    an unknown or empty name passes). Shapes can match across models of one family (a base and
    its instruct tune): the adapter would then convert and run, with wrong outputs."""
    if same_model(base, manifest.source) is False:
        raise AdapterError(
            f"{where} was trained on {shown(model_name(base))} (adapter_config.json's base_model_name_or_path), "
            f"but this export is of {shown(model_name(manifest.source))}: its shapes fit, but its outputs on "
            "this model would be wrong. Convert it for an export of the model it was trained on, or pass "
            "--force (force=True) if both name the same model")


def _task_prompt(config: dict[str, Any], weights: dict[str, np.ndarray], prompt: np.ndarray,
                 task: int | None, where: Path) -> tuple[np.ndarray, int]:
    num_tasks = _int_field(config, "num_tasks", where)
    rank = _int_field(config, "num_ranks", where)
    if task is None:
        if num_tasks != 1:
            raise AdapterError(f"{where} holds {num_tasks} tasks; choose one with --task N (0..{num_tasks - 1}),"
                               " one bundle per task")
        task = 0
    if not 0 <= task < num_tasks:
        raise AdapterError(f"task {task} is out of range: {where} holds tasks 0..{num_tasks - 1}")
    n_virtual, dim = prompt.shape
    cols = _tensor(weights, "prefix_task_cols", (num_tasks, n_virtual, rank), where)
    rows = _tensor(weights, "prefix_task_rows", (num_tasks, rank, dim), where)
    scale = cols[task].astype(np.float32) @ rows[task].astype(np.float32)
    return (prompt.astype(np.float32) * scale).astype(prompt.dtype), task
