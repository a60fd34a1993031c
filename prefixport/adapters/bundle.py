"""Adapter bundles (DESIGN.md): one safetensors file of plain tensors plus string metadata.

    kind "prompt": prompt_embeds [n_virtual, hidden]
    kind "prefix": past_key_values.{i}.key / .value [kv_heads, n_virtual, head_dim] per layer

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

FORMAT_VERSION = "1"
KINDS = ("prompt", "prefix")
DTYPES = ("float32", "float16")
REQUIRED_METADATA = ("format", "format_version", "kind", "name", "n_virtual", "dtype", "fingerprint", "peft_type")


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
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e}); it may be truncated{hint}") from e


def load_bundle(path: str | Path, manifest: mf.Manifest | None = None) -> Bundle:
    """Read a bundle and check it; against `manifest` too when given (shapes, base model)."""
    path = Path(path)
    if not path.is_file():
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
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterError(f"{where} has bundle format version {meta['format_version']!r}, this prefixport "
                           f"reads version {FORMAT_VERSION}; convert the PEFT checkpoint again")
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
    for name, t in bundle.tensors.items():
        if str(t.dtype) != meta["dtype"]:
            raise AdapterError(f"{where}: tensor {name} is {t.dtype}, the metadata says {meta['dtype']}")
        if not np.isfinite(t).all():
            raise AdapterError(f"{where}: tensor {name} holds NaN or Inf; the adapter is broken (retrain or "
                               "re-save it)")


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
