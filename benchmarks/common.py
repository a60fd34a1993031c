"""What the benchmark scripts share: the checkout's paths, how a run is recorded (its command line,
the machine, the JSON and Markdown written), the one interleaved loop of repeated measurements
(`alternate`) and their summaries (`median`, `percentile`, `distribution`), and process figures read
from /proc (RSS, CPU seconds, the rest of the machine's load). The test tools (tools/) use it too.

The standard library alone at import, and prefixport.bench.measure (standard library only too: the
one percentile definition): a script run in a scratch venv that lacks prefixport's dependencies
(grammar_cost) can use it too.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from prefixport.bench import measure

percentile = measure.percentile  # the one percentile definition, re-exported
median = measure.median  # percentile(values, 0.5)
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent  # the checkout
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_EXPORT = ROOT / "exports" / "smollm2-135m-instruct"


# --- recording a run -----------------------------------------------------------------------------

def say(message: str) -> None:
    """A progress line on stderr, timestamped (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rel(path: Path | str) -> str:
    """`path` relative to the checkout when it lies inside it (results name no home folder)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def command(script: str, package: str = "benchmarks") -> str:
    """This run's command line as the results record it: `python -m PACKAGE.SCRIPT ARGS` (PACKAGE:
    benchmarks, or tools for the test tools)."""
    return f"python -m {package}.{script} {shlex.join(sys.argv[1:])}".strip()


def machine(*packages: str) -> dict[str, Any]:
    """The machine and library versions (`prefixport.bench.machine.describe`), with the versions of
    `packages` added where installed. Where prefixport's bench package does not import (a scratch
    venv without its dependencies): the CPU, cores, Python and those versions alone."""
    try:
        from prefixport.bench.machine import describe

        info = describe()
    except ImportError:
        info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "python": platform.python_version(), "versions": {}}
    for package in packages:
        try:
            info["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def machine_line(info: Mapping[str, Any], packages: Sequence[str] = ("onnxruntime", "prefixport")) -> str:
    """A report's footer line: `Machine: CPU, N cores, M GiB; Python X, PACKAGE VERSION, ...`."""
    versions = info.get("versions") or {}
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']:.0f} GiB; Python {info['python']}, "
            + ", ".join(f"{p} {versions.get(p)}" for p in packages) + ".")


def write_report(folder: Path, stem: str, result: Mapping[str, Any], markdown: str | None = None) -> list[Path]:
    """FOLDER/STEM.json (and FOLDER/STEM.md when `markdown` is given); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    if markdown is not None:
        paths.append(folder / f"{stem}.md")
        paths[1].write_text(markdown)
    return paths


def cell(value: float | None, spec: str = ".1f") -> str:
    """A Markdown table cell: `value` formatted by `spec`, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


# --- repeated measurements and their summaries ----------------------------------------------------

def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float] | None:
    """n, mean, min, median (p50), p95, p99 and max of `values` times `scale` (1000: seconds to ms),
    percentiles by `percentile` (prefixport.bench.measure's, linear between the nearest ranks, as
    `spread` takes them). None without values."""
    return measure.summary(values, scale, (0.5, 0.95, 0.99))


def alternate(sides: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """The benchmarks' one interleaved loop: `rounds` rounds, each measuring every side once (a call
    returning its figure: a step's ms, a run's tokens/s), the sides' order rotated by one each round
    (two sides alternate) so that a shared machine's drift falls on all alike. Each side's figures
    in round order; summarise them with `median` or `distribution`."""
    names = list(sides)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(sides[name]())
    return out


def slope_per_min(samples: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) pairs, per minute; None under 3 samples."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    den = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / den if den else None


# --- processes, from /proc (Linux; None elsewhere) -------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A size line of /proc/PID/status (VmRSS: resident now, VmHWM: its peak, ...) in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def vm_rss(pid: int | str = "self") -> int | None:
    """The resident set size of a process in bytes (this one by default)."""
    return proc_status_bytes("VmRSS", pid)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, all its threads (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, less idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def processes() -> dict[int, tuple[float, str]]:
    """Every process: its CPU seconds so far and its command line (cut short)."""
    out = {}
    for folder in Path("/proc").iterdir():
        if folder.name.isdigit():
            cpu = process_cpu_s(int(folder.name))
            try:
                cmd = (folder / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cpu is not None:
                out[int(folder.name)] = (cpu, cmd[:90] or f"[{folder.name}]")
    return out


class CpuMeter:
    """CPU seconds over a `with` block: this process (the client), a server process if given, and
    every other process on the machine (other people's work: the noise in the figures). With
    `watch`, /proc is also read every 2 s to name the busiest other processes, those started
    meanwhile included.

    After the block, `result`: wall_s, client_s, server_s (None without a server), others_s,
    others_share (of all the cores) and busiest_others (the top 5 watched, each at least 1% of the
    wall time)."""

    def __init__(self, server_pid: int | None = None, watch: bool = False) -> None:
        self.server_pid, self.watch = server_pid, watch
        self.result: dict[str, Any] = {}

    def _counters(self) -> tuple[float | None, ...]:
        server = process_cpu_s(self.server_pid) if self.server_pid else 0.0
        return time.process_time(), server, machine_busy_s()

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._seen.update(processes())

    def __enter__(self) -> CpuMeter:
        self._began = time.perf_counter()
        self._start = self._counters()
        self._before = processes() if self.watch else {}
        self._seen: dict[int, tuple[float, str]] = {}  # last CPU seconds and command of every process seen
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True) if self.watch else None
        if self._poller is not None:
            self._poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._poller is not None:
            self._stop.set()
            self._poller.join()
            self._seen.update(processes())
        wall = time.perf_counter() - self._began
        d = [None if a is None or b is None else b - a for a, b in zip(self._start, self._counters())]
        others = None if None in d else max(0.0, d[2] - d[0] - d[1])  # type: ignore[operator]
        mine = {os.getpid(), self.server_pid}
        busiest = []
        for pid, (cpu, cmd) in self._seen.items():  # a process started meanwhile: all its CPU (to its last poll)
            used = cpu - (self._before[pid][0] if pid in self._before else 0.0)
            if pid not in mine and used >= 0.01 * wall:
                busiest.append({"pid": pid, "cpu_s": round(used, 1), "command": cmd})
        busiest.sort(key=lambda p: -p["cpu_s"])
        self.result = {"wall_s": wall, "client_s": d[0], "server_s": d[1] if self.server_pid else None,
                       "others_s": others,
                       "others_share": None if others is None else others / (wall * (os.cpu_count() or 1)),
                       "busiest_others": busiest[:5]}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server this run starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

