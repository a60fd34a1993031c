"""Adapter bundles (docs/design.md): one safetensors file of plain tensors plus string metadata.

    kind "prompt": prompt_embeds [n_virtual, hidden]
    kind "prefix": past_key_values.{i}.key / .value [kv_heads, n_virtual, head_dim] per layer
    kind "lora":   lora.{layer}.{path}.a [r, in] and .b [out, r] (PEFT's lora_A / lora_B weights as saved)
                   per adapted module; metadata `rank` (the largest r) and `scalings` (JSON
                   {"{layer}.{path}": float}, what PEFT multiplies B·A·x by; s·B finite in float32);
                   r, in, out >= 1, a path's [in, out] the same in every layer
    kind "ia3":    ia3.{layer}.{path} [dim] per adapted module (a path's dim the same in every layer);
                   metadata `feedforward` (JSON list of the paths whose vector scales the module's
                   input; the others scale its output)

`path` is a module path inside a decoder layer, e.g. "self_attn.q_proj" (manifest.WeightAdapters).
Format version 2 adds the optional `prompt_format` (raw, chat or a template: `prompt_format.py`);
version 3 the kinds lora and ia3 (n_virtual "0": they add no virtual tokens). Versions 1 and 2 are
still read (a version 1 bundle's prompt format is unknown). Only safetensors is ever read: no
pickle, no code.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .. import manifest as mf
from ..errors import AdapterError
from .prompt_format import PromptFormat

FORMAT_VERSION = "3"  # written
READ_VERSIONS = ("1", "2", "3")  # read: 2 adds the optional prompt_format, 3 the kinds lora and ia3
KINDS = ("prompt", "prefix", "lora", "ia3")
WEIGHT_KINDS = ("lora", "ia3")  # adapters of the layers' weights: no virtual tokens (n_virtual "0")
KIND_METADATA = {"lora": ("rank", "scalings"), "ia3": ("feedforward",)}  # required beside REQUIRED_METADATA
DTYPES = ("float32", "float16")
REQUIRED_METADATA = ("format", "format_version", "kind", "name", "n_virtual", "dtype", "fingerprint", "peft_type")
# safetensors dtypes that safetensors' numpy path can return; for the others (BF16, F8_*, F6_*, F4) it
# raises TypeError or AttributeError, so they are refused by name before any tensor is read.
NUMPY_READABLE = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64")
# Bounds on what is parsed and read from a file, far above any adapter's (a header of a few KB; one
# tensor, or two per layer): a 100 MB header of a million tiny tensors takes seconds and GBs to read.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 4096
# lora.{layer}.{path}.a / .b and ia3.{layer}.{path}: `path` is dotted names inside one decoder layer
_PATH = r"([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)"
LORA_NAME = re.compile(rf"lora\.(0|[1-9][0-9]*)\.{_PATH}\.([ab])")
IA3_NAME = re.compile(rf"ia3\.(0|[1-9][0-9]*)\.{_PATH}")
# The runtime multiplies a LoRA's B by its scaling in float32 (runtime/store.py, weight_tables)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite(value: object) -> bool:
    """A JSON number (not a bool) that is a finite float: NaN, Infinity and integers beyond a float's
    range (a JSON integer may have thousands of digits) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class Bundle:
    """An adapter in memory: its tensors (numpy) and metadata (strings)."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def n_virtual(self) -> int:
        """Virtual tokens (prompt, prefix); 0 for the weight adapters (lora, ia3)."""
        return 0 if self.kind in WEIGHT_KINDS else int(self.metadata["n_virtual"])

    @property
    def rank(self) -> int:
        """A LoRA's rank (the largest of its modules'; each module's is its A's rows); 0 for other kinds."""
        return int(self.metadata["rank"]) if self.kind == "lora" else 0

    @property
    def scalings(self) -> dict[str, float]:
        """A LoRA's scaling per module, {"{layer}.{path}": s}: a module's output gains s · B·A·x. {} for other kinds."""
        return _json_scalings(self.metadata["scalings"], self.name) if self.kind == "lora" else {}

    @property
    def feedforward(self) -> list[str]:
        """An IA3's paths whose vector scales the module's input (PEFT's feedforward modules); the
        others scale its output. [] for other kinds."""
        return _json_paths(self.metadata["feedforward"], self.name) if self.kind == "ia3" else []

    @property
    def modules(self) -> list[tuple[int, str]]:
        """The (layer, path) pairs a lora or ia3 bundle adapts, sorted; [] for other kinds."""
        return weight_modules(self.tensors, self.kind)

    @property
    def prompt_format(self) -> PromptFormat | None:
        """How its prompts were formatted in training; None: not recorded (a version 1 bundle, or
        converted without --prompt-format)."""
        spec = self.metadata.get("prompt_format")
        return PromptFormat.parse(spec, f"{self.name}: prompt_format") if spec is not None else None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def prefix(self, num_layers: int) -> list[np.ndarray]:
        """The prefix as a flat past list (key, value per layer), each [kv_heads, n_virtual, head_dim]."""
        return [self.tensors[n] for n in mf.past_names(num_layers)]


def make_bundle(*, name: str, kind: str, tensors: dict[str, np.ndarray], fingerprint: str, peft_type: str,
                **extra: str) -> Bundle:
    """A bundle with complete metadata (n_virtual and dtype read from the tensors)."""
    first = next(iter(tensors.values()))
    n_virtual = 0 if kind in WEIGHT_KINDS else first.shape[0] if kind == "prompt" else first.shape[1]
    metadata = {
        "format": "prefixport-adapter",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "n_virtual": str(n_virtual),
        "dtype": str(first.dtype),
        "fingerprint": fingerprint,
        "peft_type": peft_type,
        **{k: str(v) for k, v in extra.items()},
    }
    return Bundle({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata)


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(bundle.tensors, str(tmp), metadata=bundle.metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: Path, hint: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file; any malformed file is an AdapterError."""
    try:
        with open(path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
        if header_bytes > MAX_HEADER_BYTES:  # parsing is bounded by the header, not by safetensors' 100 MB
            raise ValueError(f"the first 8 bytes declare a header of {header_bytes:,} bytes; an adapter's header "
                             f"is a few KB and at most {MAX_HEADER_BYTES:,} are read")
        with safe_open(str(path), framework="numpy") as f:
            keys = f.keys()
            if len(keys) > MAX_TENSORS:
                raise AdapterError(f"{path} holds {len(keys):,} tensors; an adapter holds one (a soft prompt) or two "
                                   f"per layer (a prefix), at most {MAX_TENSORS:,} are read{hint}")
            for k in keys:
                dtype = f.get_slice(k).get_dtype()
                if dtype not in NUMPY_READABLE:
                    raise AdapterError(f"{path}: tensor {k!r} has dtype {dtype}, which prefixport cannot read; "
                                       "adapters hold float32 or float16 tensors: re-save it in float32")
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if _looks_like_pickle(path):
            raise AdapterError(f"{path} looks like a pickle or torch.save file, not safetensors (whatever its name); "
                               "prefixport never loads pickles (unpickling runs arbitrary code): re-save the adapter "
                               "as safetensors where you trust the file") from e
        raise AdapterError(f"{path} is not a readable safetensors file ({e}); it may be truncated{hint}") from e


def _looks_like_pickle(path: Path) -> bool:
    """Pickle protocol 2+ starts with PROTO (0x80, version) and an opcode (a safetensors length there has a
    zero third byte below 64 KiB of header); torch.save's default format is a zip."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return (len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0) or head == b"PK\x03\x04"


def refuse_peft_folder(path: Path) -> None:
    """An AdapterError saying to convert it first, where `path` is a PEFT checkpoint folder."""
    if (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} is a PEFT checkpoint folder, not a bundle: convert it first with "
                           f"`prefixport adapter convert {path} --export EXPORT_DIR --name NAME` (or "
                           "prefixport.adapters.convert_checkpoint), then use the .safetensors it writes")


def load_bundle(path: str | Path, manifest: mf.Manifest | None = None) -> Bundle:
    """Read a bundle and check it; against `manifest` too when given (shapes, base model)."""
    path = Path(path)
    if not path.is_file():
        refuse_peft_folder(path)
        raise AdapterError(f"{path}: no such adapter file")
    tensors, metadata = read_safetensors(
        path, " or not a bundle: convert the PEFT checkpoint again with `prefixport adapter convert`")
    bundle = Bundle(tensors, metadata)
    check_bundle(bundle, str(path))
    if manifest is not None:
        check_fits(bundle, manifest, str(path))
    return bundle


def check_bundle(bundle: Bundle, where: str = "adapter") -> None:
    """Self-consistency: metadata complete, known kind and version, tensors finite and well formed."""
    meta = bundle.metadata
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing or meta.get("format") != "prefixport-adapter":
        raise AdapterError(f"{where} is not a prefixport adapter bundle (metadata lacks {missing or ['format']}); "
                           "convert the PEFT checkpoint with `prefixport adapter convert`")
    if meta["format_version"] not in READ_VERSIONS:
        raise AdapterError(f"{where} has bundle format version {meta['format_version']!r}, this prefixport "
                           f"reads versions {', '.join(READ_VERSIONS)}; convert the PEFT checkpoint again")
    if "prompt_format" in meta:
        PromptFormat.parse(meta["prompt_format"], f"{where}: prompt_format")
    kind = meta["kind"]
    if kind not in KINDS:
        raise AdapterError(f"{where} has kind {kind!r}; expected one of {', '.join(KINDS)}")
    if meta["dtype"] not in DTYPES:
        raise AdapterError(f"{where} has dtype {meta['dtype']!r}; expected one of {', '.join(DTYPES)}")
    try:
        n_virtual = int(meta["n_virtual"])
    except ValueError:
        raise AdapterError(f"{where}: n_virtual {meta['n_virtual']!r} is not a number") from None
    if kind in WEIGHT_KINDS:
        if meta["format_version"] != FORMAT_VERSION:
            raise AdapterError(f"{where}: a bundle of kind {kind!r} is format version {FORMAT_VERSION} (the version "
                               f"that added it); this one says {meta['format_version']!r}: convert the PEFT "
                               "checkpoint again")
        if n_virtual != 0:
            raise AdapterError(f"{where}: a bundle of kind {kind!r} adds no virtual tokens, so its n_virtual is 0; "
                               f"this one says {n_virtual}: convert the PEFT checkpoint again")
        lacking = [k for k in KIND_METADATA[kind] if k not in meta]
        if lacking:
            raise AdapterError(f"{where}: a bundle of kind {kind!r} records {', '.join(KIND_METADATA[kind])} in its "
                               f"metadata; this one lacks {', '.join(lacking)}: convert the PEFT checkpoint again")
    elif n_virtual < 1:
        raise AdapterError(f"{where}: n_virtual must be >= 1, got {n_virtual}")
    if not bundle.tensors:
        raise AdapterError(f"{where} holds no tensors")
    if kind in WEIGHT_KINDS:
        _check_weight_layout(bundle, where)
    else:
        _check_layout(bundle.tensors, kind, n_virtual, where)
    for name, t in bundle.tensors.items():
        if str(t.dtype) != meta["dtype"]:
            raise AdapterError(f"{where}: tensor {name} is {t.dtype}, the metadata says {meta['dtype']}")
        if not np.isfinite(t).all():
            raise AdapterError(f"{where}: tensor {name} holds NaN or Inf; the adapter is broken (retrain or "
                               "re-save it)")
    if kind == "lora":
        _check_scaled(bundle, where)


def _check_layout(tensors: dict[str, np.ndarray], kind: str, n_virtual: int, where: str) -> None:
    """The tensors are those of `kind` with n_virtual virtual tokens (what a manifest adds is check_fits')."""
    again = "; convert the PEFT checkpoint again with `prefixport adapter convert`"
    names = sorted(tensors)
    if kind == "prompt":
        if names != ["prompt_embeds"]:
            raise AdapterError(f"{where}: a prompt bundle holds one tensor, prompt_embeds; this one holds "
                               f"{names[:4]}{again}")
        shape = tensors["prompt_embeds"].shape
        if len(shape) != 2 or shape[0] != n_virtual:
            raise AdapterError(f"{where}: prompt_embeds has shape {list(shape)}; with n_virtual {n_virtual} it must be "
                               f"[{n_virtual}, hidden]{again}")
        return
    layers = len(tensors) // 2
    if layers < 1 or set(names) != set(mf.past_names(layers)):
        raise AdapterError(f"{where}: a prefix bundle holds past_key_values.{{i}}.key and .value for layers 0..L-1; "
                           f"this one holds {len(names)} tensors ({names[:4]}){again}")
    for name in mf.past_names(layers):
        shape = tensors[name].shape
        if len(shape) != 3 or shape[1] != n_virtual:
            raise AdapterError(f"{where}: {name} has shape {list(shape)}; with n_virtual {n_virtual} it must be "
                               f"[kv_heads, {n_virtual}, head_dim]{again}")
    shapes = sorted({tensors[name].shape for name in names})
    if len(shapes) > 1:  # every layer's keys and values have one shape
        raise AdapterError(f"{where}: the prefix tensors disagree in shape ({', '.join(map(str, map(list, shapes)))}); "
                           f"each is [kv_heads, n_virtual, head_dim]{again}")


def weight_modules(tensors: dict[str, np.ndarray], kind: str) -> list[tuple[int, str]]:
    """The (layer, path) pairs of a lora or ia3 bundle's tensor names, sorted (names that are not its
    kind's are left out: _check_weight_layout refuses them)."""
    pattern = LORA_NAME if kind == "lora" else IA3_NAME if kind == "ia3" else None
    if pattern is None:
        return []
    matches = (pattern.fullmatch(name) for name in tensors)
    return sorted({(int(m.group(1)), m.group(2)) for m in matches if m})


def _json_scalings(text: str, where: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict) or not all(finite(v) and abs(v) <= FLOAT32_MAX for v in value.values()):
        raise AdapterError(f"{where}: the metadata `scalings` must be a JSON object of finite numbers within float32's "
                           "range, one per \"{layer}.{path}\"; convert the PEFT checkpoint again")
    return {str(k): float(v) for k, v in value.items()}


def _json_paths(text: str, where: str) -> list[str]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{where}: the metadata `feedforward` must be a JSON list of module paths; convert "
                           "the PEFT checkpoint again")
    return list(value)


def _check_weight_layout(bundle: Bundle, where: str) -> None:
    """A lora bundle: an A [r, in] and a B [out, r] per module, `rank` their largest r, one scaling per
    module; an ia3 bundle: one vector [dim] per module, `feedforward` naming some of its paths."""
    again = "; convert the PEFT checkpoint again with `prefixport adapter convert`"
    kind, tensors, meta = bundle.kind, bundle.tensors, bundle.metadata
    pattern, form = (LORA_NAME, "lora.{layer}.{path}.a / .b") if kind == "lora" else (IA3_NAME, "ia3.{layer}.{path}")
    strays = sorted(name for name in tensors if not pattern.fullmatch(name))
    if strays:
        raise AdapterError(f"{where}: a {kind} bundle holds {form} tensors only; this one also holds "
                           f"{strays[:4]}{again}")
    modules = weight_modules(tensors, kind)
    dims: dict[str, tuple[tuple[int, ...], int]] = {}  # path -> its dims, of the first layer that has it

    def same_dims(layer: int, path: str, shape: tuple[int, ...], what: str) -> None:
        first, first_layer = dims.setdefault(path, (shape, layer))
        if shape != first:
            raise AdapterError(f"{where}: {path} {what} {list(shape)} in layer {layer} and {list(first)} in layer "
                               f"{first_layer}; a module has the same shape in every layer{again}")

    if kind == "ia3":
        for layer, path in modules:
            shape = tensors[mf.ia3_name(layer, path)].shape
            if len(shape) != 1 or shape[0] < 1:
                raise AdapterError(f"{where}: {mf.ia3_name(layer, path)} has shape {list(shape)}; an IA3 vector is "
                                   f"[dim]{again}")
            same_dims(layer, path, shape, "has an IA3 vector of shape")
        paths = {path for _, path in modules}
        unknown = [p for p in _json_paths(meta["feedforward"], where) if p not in paths]
        if unknown:
            raise AdapterError(f"{where}: the metadata `feedforward` names {unknown[:4]}, which the bundle has no "
                               f"IA3 vector for{again}")
        return
    ranks = []
    for layer, path in modules:
        a_name, b_name = mf.lora_a_name(layer, path), mf.lora_b_name(layer, path)
        if a_name not in tensors or b_name not in tensors:
            raise AdapterError(f"{where}: module {layer}.{path} has {'an A' if a_name in tensors else 'a B'} but "
                               f"no {'B' if a_name in tensors else 'A'}; a LoRA module holds both{again}")
        a, b = tensors[a_name].shape, tensors[b_name].shape
        if len(a) != 2 or len(b) != 2 or min(*a, *b) < 1 or b[1] != a[0]:
            raise AdapterError(f"{where}: module {layer}.{path} has A {list(a)} and B {list(b)}; a LoRA of rank r "
                               f"has A [r, in] and B [out, r], r, in and out >= 1{again}")
        same_dims(layer, path, (a[1], b[0]), "has [in, out] features")
        ranks.append(a[0])
    try:
        rank = int(meta["rank"])
    except ValueError:
        raise AdapterError(f"{where}: rank {meta['rank']!r} is not a number{again}") from None
    if rank != max(ranks):
        raise AdapterError(f"{where}: the metadata says rank {rank}, its largest module has rank {max(ranks)}{again}")
    scalings = _json_scalings(meta["scalings"], where)
    keys = {f"{layer}.{path}" for layer, path in modules}
    if set(scalings) != keys:
        raise AdapterError(f"{where}: `scalings` must hold one value per module; missing "
                           f"{sorted(keys - set(scalings))[:4]}, unexpected {sorted(set(scalings) - keys)[:4]}{again}")


def _check_scaled(bundle: Bundle, where: str) -> None:
    """Each LoRA module's s·B, which the runtime computes in float32, is finite there (B finite and s
    within float32's range are check_bundle's)."""
    for key, s in bundle.scalings.items():
        b = bundle.tensors[f"lora.{key}.b"]
        top = float(np.abs(b).max(initial=0.0))
        if abs(s) * top > FLOAT32_MAX:
            raise AdapterError(f"{where}: module {key} has scaling {s:g} and B values up to {top:g}: their product "
                               "overflows float32, where the runtime computes it. Is the adapter broken (lora_alpha, "
                               "or B, out of range)? Retrain or re-save it")


def _check_weights_fit(bundle: Bundle, manifest: mf.Manifest, where: str) -> None:
    """A lora or ia3 bundle fits the export's LoRA and IA3 inputs (manifest.WeightAdapters)."""
    kind = "LoRA" if bundle.kind == "lora" else "IA3"
    weights = manifest.weights
    if weights is None:
        raise AdapterError(f"{where} is an {kind} adapter, and this export takes no LoRA or IA3 inputs (it was made "
                           "without --lora): re-export the model with `prefixport export --lora`")
    modules = bundle.modules
    for layer, path in modules:
        if layer >= manifest.num_layers:
            raise AdapterError(f"{where} adapts decoder layer {layer}; this export's model has {manifest.num_layers} "
                               f"layers (0..{manifest.num_layers - 1}): was it trained for another base model?")
    paths = sorted({path for _, path in modules})
    if bundle.kind == "lora":
        lacking = [p for p in paths if p not in weights.lora]
        if lacking:
            raise AdapterError(f"{where} adapts {', '.join(lacking)} with LoRA; this export takes LoRA on "
                               f"{', '.join(weights.lora) or 'no module'} only (`prefixport export --lora "
                               "--lora-targets` chooses them): re-export with targets that include these")
        if bundle.rank > weights.max_rank:
            raise AdapterError(f"{where} has LoRA rank {bundle.rank}; this export takes ranks up to "
                               f"{weights.max_rank}: re-export with `prefixport export --lora --lora-max-rank "
                               f"{bundle.rank}`")
        for layer, path in modules:
            features_in, features_out = weights.shapes[path]
            a = bundle.tensors[mf.lora_a_name(layer, path)].shape
            b = bundle.tensors[mf.lora_b_name(layer, path)].shape
            if a[1] != features_in or b[0] != features_out:
                raise AdapterError(f"{where}: module {layer}.{path} has A {list(a)} and B {list(b)}; this export's "
                                   f"{path} has {features_in} inputs and {features_out} outputs, so A [r, "
                                   f"{features_in}] and B [{features_out}, r]: was it trained for another base model?")
        return
    feedforward = set(bundle.feedforward)
    for path in paths:
        side = "input" if path in feedforward else "output"
        if path not in weights.ia3:
            raise AdapterError(f"{where} adapts {path} with IA3; this export takes IA3 on "
                               f"{', '.join(weights.ia3) or 'no module'} only (`prefixport export --lora "
                               "--ia3-targets` chooses them): re-export with targets that include it")
        if weights.ia3[path] != side:
            listed = "lists" if side == "input" else "leaves out"
            raise AdapterError(f"{where}: its IA3 vector on {path} scales the module's {side} (its "
                               f"feedforward_modules {listed} {path}); this export's IA3 on {path} scales the "
                               f"{weights.ia3[path]}: the two do not compute the same thing. Retrain the IA3 with "
                               f"{path} {'left out of' if side == 'input' else 'in'} feedforward_modules")
    for layer, path in modules:
        shape, dim = bundle.tensors[mf.ia3_name(layer, path)].shape, weights.ia3_dim(path)
        if shape != (dim,):
            raise AdapterError(f"{where}: {mf.ia3_name(layer, path)} has shape {list(shape)}, this export needs "
                               f"[{dim}] (the {path}'s {weights.ia3[path]} features): was it trained for another "
                               "base model?")


def expected_shapes(kind: str, n_virtual: int, manifest: mf.Manifest) -> dict[str, tuple[int, ...]]:
    if kind == "prompt":
        return {"prompt_embeds": (n_virtual, manifest.hidden_size)}
    kv = (manifest.num_kv_heads, n_virtual, manifest.head_dim)
    return {n: kv for n in mf.past_names(manifest.num_layers)}


def check_fits(bundle: Bundle, manifest: mf.Manifest, where: str = "adapter") -> None:
    """The bundle was made for this export's base model and has its shapes."""
    if bundle.metadata["fingerprint"] != manifest.fingerprint:
        raise AdapterError(
            f"{where} was converted for another base model (fingerprint {bundle.metadata['fingerprint'][:19]}…, "
            f"this export is {manifest.fingerprint[:19]}… from {manifest.source}); convert the PEFT "
            "checkpoint against this export, or use the export of the model it was trained on"
        )
    if bundle.kind in WEIGHT_KINDS:
        _check_weights_fit(bundle, manifest, where)
        return
    expected = expected_shapes(bundle.kind, bundle.n_virtual, manifest)
    if set(bundle.tensors) != set(expected):
        extra, lacking = sorted(set(bundle.tensors) - set(expected)), sorted(set(expected) - set(bundle.tensors))
        raise AdapterError(f"{where}: tensors do not fit a {bundle.kind} adapter for this export "
                           f"(unexpected: {extra[:4]}, missing: {lacking[:4]})")
    for name, shape in expected.items():
        if bundle.tensors[name].shape != shape:
            raise AdapterError(f"{where}: {name} has shape {list(bundle.tensors[name].shape)}, this export "
                               f"needs {list(shape)} ({manifest.num_layers} layers, {manifest.num_kv_heads} KV "
                               f"heads, head dim {manifest.head_dim}, hidden {manifest.hidden_size})")
