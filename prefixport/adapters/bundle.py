"""Adapter bundles (docs/design.md): one safetensors file of plain tensors plus string metadata.

    kind "prompt": prompt_embeds [n_virtual, hidden]
    kind "prefix": past_key_values.{i}.key / .value [kv_heads, n_virtual, head_dim] per layer

Format version 2 adds the optional `prompt_format` (raw, chat or a template: `prompt_format.py`);
version 1 bundles, without it, are still read (their prompt format is unknown).
Only safetensors is ever read: no pickle, no code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .. import manifest as mf
from ..errors import AdapterError
from .prompt_format import PromptFormat

FORMAT_VERSION = "2"  # written
READ_VERSIONS = ("1", "2")  # read: 2 adds the optional prompt_format
KINDS = ("prompt", "prefix")
DTYPES = ("float32", "float16")
REQUIRED_METADATA = ("format", "format_version", "kind", "name", "n_virtual", "dtype", "fingerprint", "peft_type")
# safetensors dtypes that safetensors' numpy path can return; for the others (BF16, F8_*, F6_*, F4) it
# raises TypeError or AttributeError, so they are refused by name before any tensor is read.
NUMPY_READABLE = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64")
# Bounds on what is parsed and read from a file, far above any adapter's (a header of a few KB; one
# tensor, or two per layer): a 100 MB header of a million tiny tensors takes seconds and GBs to read.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 4096


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
        return int(self.metadata["n_virtual"])

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
    n_virtual = first.shape[0] if kind == "prompt" else first.shape[1]
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
    if meta["kind"] not in KINDS:
        raise AdapterError(f"{where} has kind {meta['kind']!r}; expected one of {', '.join(KINDS)}")
    if meta["dtype"] not in DTYPES:
        raise AdapterError(f"{where} has dtype {meta['dtype']!r}; expected one of {', '.join(DTYPES)}")
    try:
        n_virtual = int(meta["n_virtual"])
    except ValueError:
        raise AdapterError(f"{where}: n_virtual {meta['n_virtual']!r} is not a number") from None
    if n_virtual < 1:
        raise AdapterError(f"{where}: n_virtual must be >= 1, got {n_virtual}")
    if not bundle.tensors:
        raise AdapterError(f"{where} holds no tensors")
    _check_layout(bundle.tensors, meta["kind"], n_virtual, where)
    for name, t in bundle.tensors.items():
        if str(t.dtype) != meta["dtype"]:
            raise AdapterError(f"{where}: tensor {name} is {t.dtype}, the metadata says {meta['dtype']}")
        if not np.isfinite(t).all():
            raise AdapterError(f"{where}: tensor {name} holds NaN or Inf; the adapter is broken (retrain or "
                               "re-save it)")


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
