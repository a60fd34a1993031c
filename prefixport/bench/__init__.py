"""`prefixport bench`: adapter swap, memory, latency, throughput and floor, side by side (the suite,
`run_bench`); `prefixport bench serve`, a serving benchmark of any OpenAI-compatible endpoint
(`serve.run_serve_bench`).

Importing this package loads nothing heavy: the suite's runtime imports happen in `run_bench`, so
the serving benchmark's client and `measure` stay light."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..runtime.settings import BackendSettings


def run_bench(export_dir: str | Path, adapters: list[str] | None = None, peft_dirs: list[str] | None = None, *,
              settings: BackendSettings | None = None, quick: bool = False, out: str | Path | None = None,
              say: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the suite on an export; adapters are bundle files or names under EXPORT/adapters/
    (default: all of them). Writes bench.json, bench.md and PNG plots to `out`.

    `settings` chooses the backend (default: ONNX Runtime on the CPU); on a GPU memory is the
    device's VRAM counter."""
    from ..adapters import ADAPTERS_DIR, resolve_adapter
    from ..errors import PrefixportError
    from ..runtime.settings import BackendSettings
    from .report import write
    from .suite import Suite

    export_dir = Path(export_dir)
    paths = [resolve_adapter(export_dir, a) for a in adapters] if adapters else \
        sorted((export_dir / ADAPTERS_DIR).glob("*.safetensors"))
    if not paths:
        raise PrefixportError(f"no adapters to benchmark: convert some into {export_dir / ADAPTERS_DIR} "
                              "or pass --adapters")
    suite = Suite(export_dir, paths, [Path(p) for p in peft_dirs or []], quick, say,
                  settings if settings is not None else BackendSettings())
    results = suite.run()
    return results, write(results, out or export_dir / "bench")
