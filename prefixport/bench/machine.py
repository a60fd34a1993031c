"""A description of the machine and library versions, for benchmark results."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def describe() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("prefixport", "onnxruntime", "torch", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "python": platform.python_version(),
            "system": platform.platform(), "versions": versions}
