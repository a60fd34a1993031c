"""Built engines under `OUTDIR/engines/`: one `.plan` per GPU model, compute capability, TensorRT
version and precision, each with a `.json` record that says what it was built from and for.

An engine runs only on the GPU model and TensorRT version it was built with, and only with the
`model.onnx` it was built from: anything else is refused with a hint to rebuild. The runtime reads
the cache (`find_engine`, for the TensorRT backend); `prefixport.engines.build` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..errors import EngineError
from .limits import Limits

ENGINES_DIR = "engines"
PRECISIONS = ("fp32", "fp16")


def engine_key(gpu_slug: str, compute_capability: tuple[int, int], tensorrt_version: str, precision: str) -> str:
    """e.g. `nvidia-h200-sm90-trt11.4.0.106-fp16`."""
    major, minor = compute_capability
    return f"{gpu_slug}-sm{major}{minor}-trt{tensorrt_version}-{precision}"


@dataclass
class EngineRecord:
    """`engines/KEY.json`: what `engines/KEY.plan` was built for and from."""

    key: str
    plan: str  # file name under engines/
    gpu: str
    compute_capability: list[int]
    tensorrt: str
    precision: str  # "fp32" | "fp16" (fp16: the graph converted with float32 inputs and outputs kept)
    limits: dict[str, Any]
    onnx_sha256: str  # of the model.onnx it was built from
    onnx_bytes: int
    onnx_mtime_ns: int
    fingerprint: str  # the base model's (manifest)
    build_seconds: float = 0.0
    plan_bytes: int = 0
    versions: dict[str, Any] = field(default_factory=dict)
    verification: list[dict[str, Any]] = field(default_factory=list)  # verification.CaseResult dicts

    @property
    def engine_limits(self) -> Limits:
        return Limits(**self.limits)

    def describe(self) -> str:
        cc = ".".join(map(str, self.compute_capability))
        return f"{self.key} ({self.gpu}, compute capability {cc}, TensorRT {self.tensorrt}, {self.precision})"


def _graph_files(folder: Path) -> list[Path]:
    """The export's model.onnx and its external data, if any."""
    return sorted(Path(folder).glob(mf.MODEL_NAME + "*"))


def _stat(folder: Path) -> tuple[int, int]:
    """Total size and newest mtime of the graph's files."""
    stats = [p.stat() for p in _graph_files(folder)]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def onnx_digest(folder: Path) -> tuple[str, int, int]:
    """sha256, size and mtime of the export's model.onnx (and its external data, if any)."""
    digest = hashlib.sha256()
    for path in _graph_files(folder):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return ("sha256:" + digest.hexdigest(), *_stat(folder))


def records(folder: str | Path) -> list[EngineRecord]:
    """Every engine record in `folder/engines`, in key order."""
    out = []
    for path in sorted((Path(folder) / ENGINES_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            out.append(EngineRecord(**{k: v for k, v in data.items() if k in EngineRecord.__dataclass_fields__}))
        except (OSError, ValueError, TypeError) as e:
            raise EngineError(f"{path} is not a readable engine record ({e}); delete it and rebuild with "
                              f"`prefixport build-engine {folder}`") from e
    return out


def save_record(folder: str | Path, record: EngineRecord) -> Path:
    path = Path(folder) / ENGINES_DIR / f"{record.key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def find_engine(folder: str | Path, manifest: mf.Manifest, gpu_slug: str, gpu_name: str,
                compute_capability: tuple[int, int], tensorrt_version: str,
                precision: str | None = None) -> EngineRecord:
    """The engine for this machine; an EngineError that names what exists and how to rebuild.

    `precision=None` takes fp32 where both were built (exact), else whichever exists.
    """
    folder = Path(folder)
    rebuild = f"`prefixport build-engine {folder}" + (" --fp16`" if precision == "fp16" else "`")
    here = (f"this machine: {gpu_name}, compute capability {'.'.join(map(str, compute_capability))}, "
            f"TensorRT {tensorrt_version}")
    found = records(folder)
    if not found:
        raise EngineError(f"{folder} has no TensorRT engine; build one on this machine with {rebuild}")
    wanted = [engine_key(gpu_slug, compute_capability, tensorrt_version, p)
              for p in ((precision,) if precision else PRECISIONS)]
    by_key = {r.key: r for r in found}
    matches = [by_key[k] for k in wanted if k in by_key]
    if not matches:
        raise EngineError(
            f"no TensorRT engine in {folder / ENGINES_DIR} fits {here}"
            + (f", {precision}" if precision else "") + "; found: "
            + "; ".join(r.describe() for r in found)
            + f". An engine runs only on the GPU model and TensorRT version it was built with: rebuild with {rebuild}"
        )
    record = matches[0]
    if not (folder / ENGINES_DIR / record.plan).is_file():
        raise EngineError(f"the engine record {record.key} names {record.plan}, which is missing; "
                          f"rebuild with {rebuild}")
    if record.fingerprint != manifest.fingerprint:
        raise EngineError(f"the engine {record.key} was built for another base model; rebuild with {rebuild}")
    if (record.onnx_bytes, record.onnx_mtime_ns) != _stat(folder) and onnx_digest(folder)[0] != record.onnx_sha256:
        raise EngineError(f"the engine {record.key} was built from another model.onnx (the export changed "
                          f"since); rebuild with {rebuild}")
    return record
