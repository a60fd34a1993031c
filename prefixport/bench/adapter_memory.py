"""Memory per registered adapter, measured in a fresh process.

The bench's own process has loaded and freed PyTorch models and sessions by then, and the heap
it keeps absorbs new allocations: 1,000 prefix adapters of 460 KB grew its RSS by 201 MB, where a
fresh process grows by 496 MB against the store's exact 461 MB. So the child loads the engine
alone (no torch), registers copies of one bundle and reports, at each count, the growth of its
RSS (VRAM on a GPU: the driver's counter) and the store's exact bytes; and the footprint of the
loaded model itself, what each of N naive per-adapter models would take.

Run by `Suite.memory` as `python -m prefixport.bench.adapter_memory` with a JSON request on
stdin; it prints a JSON answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import PrefixportError


def used_bytes(device: str) -> int:
    """Bytes in use: VRAM on a GPU (the driver's counter), else this process's RSS."""
    if device == "cuda":
        from ..runtime.backends import gpu_memory

        used = gpu_memory().get("device_used_bytes")
        if used is None:
            raise PrefixportError("no GPU memory counter: install cuda-python or nvidia-ml-py")
        return used
    from .measure import rss_bytes

    return rss_bytes()


def measure(export_dir: str, bundle: str, counts: list[int], backend: str, options: dict[str, Any],
            device: str) -> dict[str, Any]:
    """In this process: the model's footprint, then the growth at each count of registered copies."""
    from ..runtime import Engine

    before = used_bytes(device)
    engine = Engine.load(export_dir, backend=backend, **options)
    engine.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=1)
    base = used_bytes(device)
    points, registered = [], 0
    for count in counts:
        while registered < count:
            engine.add_adapter(f"copy{registered}", bundle)
            registered += 1
        points.append({"adapters": count, "rss_bytes": used_bytes(device) - base,
                       "store_resident_bytes": engine.stats().adapters.resident_bytes})
    engine.close()
    return {"model_bytes": base - before, "points": points}


def in_fresh_process(export_dir: Path, bundle: Path, counts: list[int], backend: str, options: dict[str, Any],
                     device: str) -> dict[str, Any]:
    """`measure` in a child Python process (the same interpreter)."""
    request = {"export_dir": str(export_dir), "bundle": str(bundle), "counts": counts, "backend": backend,
               "options": options, "device": device}
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise PrefixportError(f"the adapter memory probe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.stdin.read()))))
