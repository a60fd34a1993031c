"""`prefixport bench`: adapter swap, memory, latency, throughput and floor, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..adapters import ADAPTERS_DIR
from ..errors import PrefixportError
from .report import write
from .suite import Suite


def run_bench(export_dir: str | Path, adapters: list[str] | None = None, peft_dirs: list[str] | None = None,
              device: str | None = None, quick: bool = False, out: str | Path | None = None,
              say: Callable[[str], None] = lambda message: None, backend: str = "onnxruntime",
              provider: str | None = None, precision: str | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the suite on an export; adapters are bundle files or names under EXPORT/adapters/
    (default: all of them). Writes bench.json, bench.md and PNG plots to `out`.

    `backend` onnxruntime (`provider` cpu, cuda or tensorrt; `device="cuda"` means cuda) or
    tensorrt (`precision` of the engine); on a GPU memory is the device's VRAM counter."""
    from ..adapters import resolve_adapter
    from ..runtime.backends import backend_options

    export_dir = Path(export_dir)
    paths = [resolve_adapter(export_dir, a) for a in adapters] if adapters else \
        sorted((export_dir / ADAPTERS_DIR).glob("*.safetensors"))
    if not paths:
        raise PrefixportError(f"no adapters to benchmark: convert some into {export_dir / ADAPTERS_DIR} "
                              "or pass --adapters")
    options = backend_options(backend, provider, device, precision)
    suite = Suite(export_dir, paths, [Path(p) for p in peft_dirs or []], quick, say, backend, options)
    results = suite.run()
    return results, write(results, out or export_dir / "bench")
