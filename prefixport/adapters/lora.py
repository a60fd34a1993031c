"""PEFT LoRA and IA3 checkpoints -> the tensors and metadata of a lora or ia3 bundle (numpy only).

Semantics (peft 0.21, `peft/tuners/lora/layer.py`, `peft/tuners/ia3/layer.py`), for a module at
`base_model.model.{layers_path}.{layer}.{path}`:
- LoRA: y = W·x + s · B·(A·x), A = `lora_A.weight` [r, in], B = `lora_B.weight` [out, r] (nn.Linear
  weights whatever the base module, GPT-2's Conv1D included), s = alpha / r, or alpha / sqrt(r) with
  use_rslora; r and alpha per module from rank_pattern / alpha_pattern, whose keys match the module's
  name (`peft.utils.other.get_pattern_key`: the first key K, in the file's order, such that the name
  matches `(.*\\.)?(K)$`), else `r` and `lora_alpha`.
- IA3: `ia3_l` [1, in] scales the module's input (a feedforward module: `feedforward_modules` lists a
  suffix of its name, or a regex matching the whole name), [out, 1] its output.

What changes the forward beyond that is refused (`refuse_lora_options`): docs/adapters.md lists it and why.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..errors import AdapterError, shown
from .bundle import FLOAT32_MAX, finite

PREFIX = "base_model.model."  # PEFT's checkpoint keys: the tuner's wrapper, then the model's module names
LORA_LEAVES = {".lora_A.weight": "a", ".lora_B.weight": "b"}
# Tensors that only training uses (VeLoRA's compressed-activation projection, MonteCLoRA's sampler):
# at inference both variants compute plain LoRA, so these are skipped.
TRAINING_ONLY = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler\.[A-Za-z_]+)$")
# init_lora_weights that rewrite the base weights at initialisation (W - s·B0·A0, or W quantised):
# the trained A and B only make sense on that rewritten base
REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoraConfig fields (peft 0.21) whose variant changes what the layer computes at inference, and why
# the graph's LoRA inputs (one A and one B per module and row) cannot hold it
VARIANTS = {
    "use_dora": "DoRA (use_dora) divides the adapted weight W + s·B·A by its column norms and scales it by a learned "
                "magnitude vector: that needs the base weight at run time, which a row's A and B do not carry",
    "lora_bias": "lora_bias adds a learned bias to B's output, which the graph's LoRA inputs have no place for",
    "use_qalora": "QALoRA (use_qalora) pools the input in groups before A, so its A is not [r, in]",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies the adapter only from its invocation "
                               "tokens on, which the graph cannot tell",
    "use_bdlora": "BD-LoRA (use_bdlora) stores A or B block-diagonal, not as the dense [r, in] / [out, r] the graph takes",
    "arrow_config": "Arrow (arrow_config) routes each token among several LoRA experts",
    "kasa_config": "KaSA (kasa_config) truncates the base weight's smallest singular components and puts a learned "
                   "diagonal between A and B",
    "layer_replication": "layer_replication stacks copies of decoder layers into a deeper model than the export's",
    "target_parameters": "target_parameters adapts raw parameters (e.g. mixture-of-experts weights), not linear modules",
}


def _number(config: dict[str, Any], name: str, where: Path, default: Any = None, rank: bool = False) -> Any:
    """A finite number of the config, or with `rank` a whole number >= 1 (PEFT refuses any other r)."""
    value = config.get(name, default)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if rank else finite(value)
    if not ok:
        raise AdapterError(f"{where}/adapter_config.json: {name} is {shown(value)}, not a "
                           f"{'whole number >= 1 (a rank)' if rank else 'finite number'}; re-save the adapter with PEFT")
    return value


# PEFT matches rank_pattern / alpha_pattern keys and an IA3 feedforward_modules string with Python's re,
# which has no timeout and backtracks: a repeated group such as `(.*)*x` takes hours on a module name of
# 30 characters. prefixport takes what PEFT's own patterns look like (a module name, or a regex with a
# few repetitions of single characters or classes) and refuses the rest before matching anything.
MAX_PATTERN_CHARS = 1000
MAX_REPEATS = 3
_BOUNDS = re.compile(r"\{([0-9]*)(,([0-9]*))?\}")


def backtracking(pattern: str) -> str | None:
    """Why matching `pattern` could take exponential (or high polynomial) time: a repeated group, or
    more than MAX_REPEATS repetitions (*, +, {m,n}); None if it cannot. Conservative: what it cannot
    parse counts as a repetition."""
    repeats, i, after_group = 0, 0, False
    while i < len(pattern):
        ch = pattern[i]
        bounds = _BOUNDS.match(pattern, i) if ch == "{" else None
        if ch in "*+" or bounds:
            if bounds is None:  # * or +
                many = True
            elif bounds.group(2) is None:  # {m}
                many = int(bounds.group(1) or "0") > 1
            else:  # {m,n}, {m,}, {,n}
                many = not bounds.group(3) or int(bounds.group(3)) > 1
            if many:
                if after_group:
                    return "a group repeated by *, + or {m,n}"
                repeats += 1
            i = bounds.end() if bounds else i + 1
            if i < len(pattern) and pattern[i] in "?+":  # lazy or possessive: the same repetition
                i += 1
            after_group = False
            continue
        if ch == "\\":
            i += 2
        elif ch == "[":  # a class: up to its closing bracket (one first or after ^ is a member)
            i += 2 if pattern.startswith("[^", i) else 1
            i += 1 if pattern.startswith("]", i) else 0
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif ch == "(":
            i += 2 if pattern.startswith("(?", i) else 1  # (?:, (?P<name>, (?=, ...: not a repetition
        else:
            i += 1
        after_group = ch == ")"
    return f"{repeats} repetitions (at most {MAX_REPEATS})" if repeats > MAX_REPEATS else None


def _regex(pattern: str, what: str, where: Path, source: str | None = None) -> re.Pattern[str]:
    """`source` (default: `pattern`) compiled, where `pattern` is a regular expression that matches
    in bounded time; else an AdapterError."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{where}/adapter_config.json: {what} {shown(pattern)} has {len(pattern):,} characters; "
                           f"prefixport takes patterns of up to {MAX_PATTERN_CHARS:,}. Name the modules instead")
    try:
        compiled = re.compile(pattern if source is None else source)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{where}/adapter_config.json: {what} {shown(pattern)} is not a regular expression "
                           f"({e}); re-save the adapter with PEFT") from None
    why = backtracking(pattern)
    if why:
        raise AdapterError(f"{where}/adapter_config.json: {what} {shown(pattern)} is a regular expression prefixport "
                           f"does not match ({why}): matching it could backtrack for hours. Name the modules "
                           "instead (e.g. \"q_proj\", \"layers.3.self_attn.v_proj\") or use a simpler pattern")
    return compiled


def _patterns(config: dict[str, Any], name: str, where: Path, rank: bool) -> list[tuple[re.Pattern[str], Any]]:
    """rank_pattern or alpha_pattern, checked, as (PEFT's match for the key, value) in the file's order
    (compiled once: thousands of keys would overflow `re`'s cache and be compiled again per module)."""
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"{where}/adapter_config.json: {name} is {shown(patterns)}, not a JSON object; re-save "
                           "the adapter with PEFT")
    for key in patterns:
        _number(patterns, key, where, rank=rank)
    return [(_regex(key, f"{name} key", where, rf"(.*\.)?({key})$"), value) for key, value in patterns.items()]


def pattern_value(patterns: list[tuple[re.Pattern[str], Any]], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key K (in order) such that
    `module` matches `(.*\\.)?(K)$` (`_patterns`' compiled keys), else `default`."""
    for pattern, value in patterns:
        if pattern.match(module):
            return value
    return default


def weights_of(manifest: mf.Manifest, kind: str) -> mf.WeightAdapters:
    weights = manifest.weights
    if weights is None:
        raise AdapterError(f"this is an {kind} adapter, and the export ({manifest.source}) takes no LoRA or IA3 "
                           "inputs (it was made without --lora): re-export the model with `prefixport export --lora`")
    return weights


def refuse_lora_options(config: dict[str, Any], weights: dict[str, np.ndarray], where: Path) -> None:
    """An AdapterError for any LoraConfig option that makes the checkpoint more than y = W·x + s·B·A·x
    on the export's frozen base weights."""
    for name, why in VARIANTS.items():
        if config.get(name):
            raise AdapterError(f"{where} is a LoRA variant prefixport cannot serve: {why}. Train a plain LoRA, "
                               "or merge this one into the base model (PEFT's merge_and_unload) and export that")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
        how = ("replaces the base weights by quantised ones, which the adapter was trained to correct"
               if init.lower() == "loftq" else "subtracts the initial B·A from the base weights")
        fix = ("train a plain LoRA on the base model, or merge this one into its quantised base and export that"
               if init.lower() == "loftq" else
               "have PEFT save it as a plain LoRA of twice the rank, which needs no change to the base model: "
               "`model.save_pretrained(DIR, path_initial_model_for_weight_conversion=INIT_DIR)` (INIT_DIR: the "
               "adapter saved right after get_peft_model, before training), then convert DIR")
        raise AdapterError(f"{where} was initialised with init_lora_weights={init!r}, which {how}: its A and B only "
                           f"hold on that modified base model, not on the export's. To convert it, {fix}")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save:
        raise AdapterError(f"{where} also trained whole modules (modules_to_save: {shown(modules_to_save)}), saved "
                           "beside the LoRA; the export's weights are frozen and take LoRA only. Train without "
                           "modules_to_save, or merge the adapter into the base model (merge_and_unload) and export that")
    tokens = config.get("trainable_token_indices")
    if tokens:
        raise AdapterError(f"{where} also trained some token embeddings (trainable_token_indices: {shown(tokens)}); "
                           "the export's embeddings are frozen and take LoRA only. Train without them, or merge the "
                           "adapter into the base model (merge_and_unload) and export that")
    biases = sorted(k for k in weights if k.endswith(".bias"))
    if config.get("bias", "none") != "none" and biases:
        raise AdapterError(f"{where} was trained with bias={config['bias']!r}, which trains the base model's own "
                           f"biases ({biases[0]}, ...); the export's biases are frozen and a LoRA row carries A and B "
                           "only. Train with bias='none', or merge the adapter into the base model and export that")


def _module(key: str, leaf: str, layers_path: str, where: Path) -> tuple[int, str]:
    """(layer, path) of the checkpoint key `base_model.model.{layers_path}.{layer}.{path}{leaf}`."""
    name = key[len(PREFIX):-len(leaf)] if key.startswith(PREFIX) else ""
    head = layers_path + "."
    layer, _, path = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
    if not (re.fullmatch(r"[0-9]+", layer) and path):
        raise AdapterError(f"{where} adapts {shown(name or key)}, outside the decoder layers ({layers_path}.N...): "
                           "prefixport takes LoRA and IA3 on the modules of the decoder layers only (not the "
                           "embeddings or lm_head). Train the adapter on decoder-layer modules only")
    if not re.fullmatch(r"0|[1-9][0-9]*", layer):  # "00" would be layer 0's tensor a second time
        raise AdapterError(f"{where} holds {shown(key)}, of decoder layer {layer!r}: PyTorch numbers layers 0, 1, "
                           "2, ... without leading zeros, so no module has that name (was the file edited?); re-save "
                           "the adapter with PEFT")
    return int(layer), path


def _put(tensors: dict[str, np.ndarray], name: str, t: np.ndarray, key: str, where: Path) -> None:
    """tensors[name] = t, where no other checkpoint tensor took that place."""
    if name in tensors:
        raise AdapterError(f"{where} holds two tensors for {name} ({shown(key)} and another); re-save the adapter "
                           "with PEFT")
    tensors[name] = t


def convert_lora(config: dict[str, Any], weights: dict[str, np.ndarray], manifest: mf.Manifest,
                 where: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A LORA checkpoint's bundle tensors and metadata (rank, scalings, ...); fit to the export is
    check_fits'."""
    layers_path = weights_of(manifest, "LoRA").layers_path
    refuse_lora_options(config, weights, where)
    r_default = _number(config, "r", where, rank=True)
    alpha_default = _number(config, "lora_alpha", where)
    rank_pattern = _patterns(config, "rank_pattern", where, rank=True)
    alpha_pattern = _patterns(config, "alpha_pattern", where, rank=False)
    rslora = bool(config.get("use_rslora", False))
    tensors: dict[str, np.ndarray] = {}
    modules: dict[tuple[int, str], str] = {}  # (layer, path) -> its module name, as PEFT's patterns see it
    for key, t in weights.items():
        if TRAINING_ONLY.search(key):
            continue
        leaf = next((leaf for leaf in LORA_LEAVES if key.endswith(leaf)), None)
        if leaf is None:
            raise AdapterError(f"{where} holds {shown(key)}, which is no LoRA A or B of a linear module; "
                               "prefixport converts plain LoRA on linear modules (lora_A.weight, lora_B.weight)")
        layer, path = _module(key, leaf, layers_path, where)
        modules[(layer, path)] = key[len(PREFIX):-len(leaf)]
        name = (mf.lora_a_name if LORA_LEAVES[leaf] == "a" else mf.lora_b_name)(layer, path)
        _put(tensors, name, _float(t, key, where), key, where)
    if not tensors:
        raise AdapterError(f"{where} holds no LoRA tensors (lora_A.weight, lora_B.weight); re-save it with PEFT")
    scalings = {}
    for (layer, path), module in sorted(modules.items()):
        a = tensors.get(mf.lora_a_name(layer, path))
        b = tensors.get(mf.lora_b_name(layer, path))
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            shapes = [None if t is None else list(t.shape) for t in (a, b)]
            raise AdapterError(f"{where}: {module} has lora_A {shapes[0]} and lora_B {shapes[1]}; a LoRA of rank r "
                               "has both, [r, in] and [out, r]. Re-save the adapter with PEFT")
        r = pattern_value(rank_pattern, module, r_default)
        if a.shape[0] != r:
            raise AdapterError(f"{where}: {module} has rank {a.shape[0]}, while adapter_config.json gives it rank "
                               f"{r} (r, rank_pattern), so its scaling is unknown; re-save the adapter with PEFT")
        alpha = pattern_value(alpha_pattern, module, alpha_default)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if abs(scaling) > FLOAT32_MAX:
            raise AdapterError(f"{where}: {module} has scaling {scaling:g} (lora_alpha or its alpha_pattern "
                               f"{shown(alpha)}, over {'sqrt(r)' if rslora else 'r'}, r {r}), beyond float32's range "
                               "where the runtime applies it; re-save the adapter with PEFT with a sane lora_alpha")
        scalings[f"{layer}.{path}"] = scaling
    paths = sorted({path for _, path in modules})
    extra = {"rank": str(max(a.shape[0] for name, a in tensors.items() if name.endswith(".a"))),
             "scalings": json.dumps(scalings), "lora_alpha": str(alpha_default), "use_rslora": str(rslora).lower(),
             "fan_in_fan_out": str(bool(config.get("fan_in_fan_out", False))).lower(),
             "target_modules": json.dumps(paths)}
    return _one_dtype(tensors), extra


def convert_ia3(config: dict[str, Any], weights: dict[str, np.ndarray], manifest: mf.Manifest,
                where: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An IA3 checkpoint's bundle tensors (each vector flattened) and metadata (feedforward)."""
    layers_path = weights_of(manifest, "IA3").layers_path
    modules_to_save = config.get("modules_to_save")
    if modules_to_save:
        raise AdapterError(f"{where} also trained whole modules (modules_to_save: {shown(modules_to_save)}), saved "
                           "beside the IA3 vectors; the export's weights are frozen. Train without modules_to_save, "
                           "or merge the adapter into the base model (merge_and_unload) and export that")
    feedforward_modules = config.get("feedforward_modules") or []
    if not isinstance(feedforward_modules, (str, list)) or (
            isinstance(feedforward_modules, list) and not all(isinstance(m, str) for m in feedforward_modules)):
        raise AdapterError(f"{where}/adapter_config.json: feedforward_modules is {shown(feedforward_modules)}, "
                           "neither a list of names nor a regular expression; re-save the adapter with PEFT")
    feedforward_regex = (_regex(feedforward_modules, "feedforward_modules", where)
                         if isinstance(feedforward_modules, str) else None)
    tensors: dict[str, np.ndarray] = {}
    paths, feedforward = set(), set()
    for key, t in weights.items():
        if not key.endswith(".ia3_l"):
            raise AdapterError(f"{where} holds {shown(key)}, which is no IA3 vector (ia3_l) of a linear module")
        layer, path = _module(key, ".ia3_l", layers_path, where)
        module = key[len(PREFIX):-len(".ia3_l")]
        # PEFT's IA3Model._check_target_module_feedforward (a string: checked by _regex above)
        is_ff = (bool(feedforward_regex.fullmatch(module)) if feedforward_regex is not None
                 else any(module.endswith(m) for m in feedforward_modules))
        if t.ndim != 2 or (t.shape[0] != 1 if is_ff else t.shape[1] != 1):
            kind, shape = ("a feedforward", "[1, in]") if is_ff else ("a non-feedforward", "[out, 1]")
            raise AdapterError(f"{where}: {key} has shape {list(t.shape)}; on {kind} module (feedforward_modules) "
                               f"PEFT's IA3 vector is {shape}. Was it saved for another module type, or was "
                               "adapter_config.json edited? Re-save the adapter with PEFT")
        _put(tensors, mf.ia3_name(layer, path), _float(t, key, where).reshape(-1), key, where)
        paths.add(path)
        if is_ff:
            feedforward.add(path)
    if not tensors:
        raise AdapterError(f"{where} holds no IA3 vectors (ia3_l); re-save it with PEFT")
    return _one_dtype(tensors), {"feedforward": json.dumps(sorted(feedforward)),
                                 "target_modules": json.dumps(sorted(paths))}


def _float(t: np.ndarray, key: str, where: Path) -> np.ndarray:
    if t.dtype not in (np.float32, np.float16):
        raise AdapterError(f"{where}: {key} has dtype {t.dtype}; expected float32 or float16 (bfloat16: re-save the "
                           "adapter in float32)")
    return t


def _one_dtype(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All float16 stay float16; a mix is float32 (a bundle holds one dtype)."""
    if len({t.dtype for t in tensors.values()}) == 1:
        return tensors
    return {k: t.astype(np.float32) for k, t in tensors.items()}
