"""Adapters: PEFT checkpoint -> tensor bundle, and bundle reading/validation (numpy + safetensors only)."""

from __future__ import annotations

import re
from pathlib import Path

from .. import manifest as mf
from .bundle import Bundle, load_bundle, refuse_peft_folder, save_bundle
from .peft import convert
from .prompt_format import PromptFormat

__all__ = ["ADAPTERS_DIR", "Bundle", "PromptFormat", "bundle_path", "convert", "convert_checkpoint",
           "convert_for_export", "load_bundle", "resolve_adapter", "save_bundle"]

ADAPTERS_DIR = "adapters"


def convert_for_export(peft_dir: str | Path, export_dir: str | Path, name: str | None = None,
                       task: int | None = None, prompt_format: str | None = None, force: bool = False) -> Bundle:
    """A PEFT checkpoint converted for the export in `export_dir` (checked against its manifest),
    in memory. `name` defaults to the checkpoint folder's name (+ `-taskN`); characters other than
    letters, digits, `.`, `_` and `-` become `_`. `prompt_format`: raw, chat or a template with one
    {prompt}, how the adapter's prompts were formatted in training (None: not recorded). `force`:
    convert a checkpoint whose `base_model_name_or_path` names another model than the export's
    (refused otherwise: its outputs would be wrong; `peft.check_base_model`)."""
    manifest = mf.Manifest.load(export_dir)
    if name is None:
        name = Path(peft_dir).resolve().name + (f"-task{task}" if task is not None else "")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return convert(peft_dir, manifest, name=name, task=task, prompt_format=prompt_format, force=force)


def bundle_path(export_dir: str | Path, name: str) -> Path:
    """Where an export keeps the bundle NAME: `export_dir/adapters/NAME.safetensors`."""
    return Path(export_dir) / ADAPTERS_DIR / f"{name}.safetensors"


def convert_checkpoint(peft_dir: str | Path, export_dir: str | Path, name: str | None = None,
                       task: int | None = None, out: str | Path | None = None,
                       prompt_format: str | None = None, force: bool = False) -> tuple[Bundle, Path]:
    """Convert a PEFT checkpoint for the export in `export_dir` (`convert_for_export`); write it to
    `out` or to `export_dir/adapters/NAME.safetensors`. (A soft prompt baked into a prefix needs
    the runtime: `Engine.bake_prefix` on `convert_for_export`'s bundle, then `save_bundle`.)"""
    bundle = convert_for_export(peft_dir, export_dir, name=name, task=task, prompt_format=prompt_format,
                                force=force)
    path = Path(out) if out else bundle_path(export_dir, bundle.name)
    return bundle, save_bundle(bundle, path)


def resolve_adapter(export_dir: str | Path, name_or_path: str) -> Path:
    """An adapter given as a file path, or as a NAME under the export's adapters/ folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = bundle_path(export_dir, name_or_path)
    if candidate.is_file():
        return candidate
    from ..errors import AdapterError

    refuse_peft_folder(path)
    folder = Path(export_dir) / ADAPTERS_DIR
    known = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    raise AdapterError(f"adapter {name_or_path!r} is neither a file nor a bundle under {folder} "
                       f"(the adapters there: {', '.join(known) or 'none'}); convert one with "
                       "`prefixport adapter convert`")
