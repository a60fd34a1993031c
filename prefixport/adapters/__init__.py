"""Adapters: PEFT checkpoint -> tensor bundle, and bundle reading/validation (numpy + safetensors only)."""

from __future__ import annotations

import re
from pathlib import Path

from .. import manifest as mf
from .bundle import Bundle, load_bundle, save_bundle
from .peft import convert

__all__ = ["Bundle", "convert", "convert_checkpoint", "load_bundle", "resolve_adapter", "save_bundle"]

ADAPTERS_DIR = "adapters"


def convert_checkpoint(peft_dir: str | Path, export_dir: str | Path, name: str | None = None,
                       task: int | None = None, bake_prefix: bool = False,
                       out: str | Path | None = None) -> tuple[Bundle, Path]:
    """Convert a PEFT checkpoint for the export in `export_dir`; write it to `out` or to
    `export_dir/adapters/NAME.safetensors`. `bake_prefix` turns a soft prompt into a prefix."""
    manifest = mf.Manifest.load(export_dir)
    if name is None:
        name = Path(peft_dir).resolve().name + (f"-task{task}" if task is not None else "")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    bundle = convert(peft_dir, manifest, name=name, task=task)
    if bake_prefix:
        from ..runtime import Engine

        engine = Engine.load(export_dir)
        try:
            bundle = engine.bake_prefix(bundle)
        finally:
            engine.close()
    path = Path(out) if out else Path(export_dir) / ADAPTERS_DIR / f"{name}.safetensors"
    return bundle, save_bundle(bundle, path)


def resolve_adapter(export_dir: str | Path, name_or_path: str) -> Path:
    """An adapter given as a file path, or as a NAME under the export's adapters/ folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = Path(export_dir) / ADAPTERS_DIR / f"{name_or_path}.safetensors"
    if candidate.is_file():
        return candidate
    from ..errors import AdapterError

    raise AdapterError(f"adapter {name_or_path!r} is neither a file nor a bundle under {candidate.parent}; "
                       "convert one with `prefixport adapter convert`")
