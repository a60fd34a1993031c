"""The fuzzer's worker: a subprocess that runs cases one at a time (JSON lines in on stdin, answers
out on stdout) under an address-space cap (RLIMIT_AS), so that a giant allocation fails there
instead of taking the machine down. Each case is classified (ok, error, crash, memory; the parent
adds hang) and an accepted adapter is checked by an oracle that does not trust the reader
(bad_accept). `Worker` is the parent's side, with a watchdog; `selftest` makes each failure happen
on purpose and checks that it is told apart.

    python -m benchmarks.fuzz_worker EXPORT [--memory-gb 3]    # as `Worker` starts it
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, proc_status_bytes
from benchmarks.fuzz_cases import Case
from prefixport import manifest as mf


def _oracle(bundle: Any, manifest: mf.Manifest | None, case: dict[str, Any], scratch: Path) -> list[str]:
    """What an accepted bundle must satisfy, checked here without trusting the reader."""
    from prefixport.adapters.bundle import check_bundle, check_fits, load_bundle, save_bundle
    from prefixport.errors import PrefixportError

    problems: list[str] = []
    meta, tensors = bundle.metadata, bundle.tensors
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return ["metadata is not a string map"]
    missing = [k for k in ("format", "format_version", "kind", "name", "n_virtual", "dtype", "fingerprint",
                           "peft_type") if k not in meta]
    if missing:
        return [f"metadata lacks {missing}"]
    if meta["format"] != "prefixport-adapter" or meta["format_version"] not in ("1", "2", "3"):
        problems.append(f"format {meta['format']!r} version {meta['format_version']!r}")
    if "prompt_format" in meta and not _prompt_format_ok(meta["prompt_format"]):
        problems.append(f"prompt_format {meta['prompt_format'][:40]!r}")
    kind, dtype = meta["kind"], meta["dtype"]
    if kind not in ("prompt", "prefix"):
        problems.append(f"kind {kind!r}")
    if dtype not in ("float32", "float16"):
        problems.append(f"dtype {dtype!r}")
    try:
        n = int(meta["n_virtual"])
    except ValueError:
        return problems + [f"n_virtual {meta['n_virtual'][:20]!r}"]
    if n < 1:
        problems.append(f"n_virtual {n}")
    if not tensors:
        problems.append("no tensors")
    for name, t in tensors.items():
        if not isinstance(t, np.ndarray) or str(t.dtype) != dtype:
            problems.append(f"{name}: {getattr(t, 'dtype', type(t))} under dtype {dtype}")
        elif not np.isfinite(t).all():
            problems.append(f"{name}: not finite")
    if kind == "prompt":
        t = tensors.get("prompt_embeds")
        if set(tensors) != {"prompt_embeds"} or t is None or t.ndim != 2 or t.shape[0] != n:
            problems.append(f"prompt tensors {[(k, v.shape) for k, v in tensors.items()][:3]} for n_virtual {n}")
    elif kind == "prefix":
        layers = len(tensors) // 2  # without a manifest: every layer's key and value, [heads, n_virtual, dim]
        shapes = {v.shape for v in tensors.values()}
        if (set(tensors) != set(mf.past_names(layers)) or layers < 1
                or any(len(s) != 3 or s[1] != n for s in shapes)):
            problems.append(f"prefix tensors {sorted(tensors)[:3]} shapes {sorted(shapes)[:2]} for n_virtual {n}")
    if manifest is not None:
        if meta["fingerprint"] != manifest.fingerprint:
            problems.append("fingerprint of another base")
        if kind == "prompt" and tensors.get("prompt_embeds") is not None:
            if tensors["prompt_embeds"].shape != (n, manifest.hidden_size):
                problems.append(f"prompt_embeds {tensors['prompt_embeds'].shape}")
        if kind == "prefix":
            want = (manifest.num_kv_heads, n, manifest.head_dim)
            if set(tensors) != set(mf.past_names(manifest.num_layers)) or any(v.shape != want for v in tensors.values()):
                problems.append(f"prefix does not fit the export ({len(tensors)} tensors)")
    if problems:
        return problems
    try:
        check_bundle(bundle)
        if manifest is not None:
            check_fits(bundle, manifest)
        back = load_bundle(save_bundle(bundle, scratch / "roundtrip.safetensors"), manifest)
    except PrefixportError as e:
        return [f"accepted, then refused by its own checks or round trip: {e}"]
    if back.metadata != meta or set(back.tensors) != set(tensors) or not all(
            np.array_equal(back.tensors[k], tensors[k]) for k in tensors):
        problems.append("save/load round trip differs")
    if case["target"] == "peft":
        want_kind = "prefix" if meta["peft_type"] == "PREFIX_TUNING" else "prompt"
        if kind != want_kind:
            problems.append(f"{meta['peft_type']} converted to kind {kind}")
        if case.get("reference"):
            ref = load_bundle(case["reference"], manifest)
            if set(ref.tensors) != set(tensors) or not all(np.array_equal(ref.tensors[k], tensors[k]) for k in tensors):
                problems.append(f"conversion differs from the seed bundle {Path(case['reference']).name}")
    return problems


def _prompt_format_ok(spec: str) -> bool:
    """raw, chat, or a template with exactly one {prompt}, every other brace doubled (read left to right)."""
    if spec in ("raw", "chat"):
        return True
    tokens = re.findall(r"\{\{|\}\}|\{prompt\}|[{}]", spec)
    return tokens.count("{prompt}") == 1 and not any(t in ("{", "}") for t in tokens)


def _has_memory_error(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, MemoryError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


SELFTEST = {"raise": "crash", "empty_message": "crash", "allocate": "memory", "abort": "crash", "hang": "hang"}


def _misbehave(what: str) -> None:
    """What a broken reader could do, done on purpose: the harness must classify each (see selftest)."""
    from prefixport.errors import AdapterError

    if what == "raise":
        raise ValueError("a non-project exception")
    if what == "empty_message":
        raise AdapterError("")
    if what == "allocate":
        np.ones(1 << 40, np.uint8)  # 1 TiB: over the worker's address-space cap
    if what == "abort":
        os.abort()
    if what == "hang":
        time.sleep(3600)


def selftest(export: Path, memory_gb: float, log: Path, hang_s: float = 1.0) -> dict[str, Any]:
    """Each outcome the harness must tell apart, caused on purpose in a worker: what was seen."""
    worker = Worker(export, memory_gb, log)
    seen: dict[str, str] = {}
    try:
        for what, want in SELFTEST.items():
            res = worker.run(Case(-1, "selftest", "selftest", what, what), hang_s if want == "hang" else 60)
            seen[what] = "hang" if res is None else res["outcome"]
            if res is not None and res["outcome"] == "memory":
                worker.kill()
    finally:
        worker.close()
    return {"expected": SELFTEST, "seen": seen, "ok": seen == SELFTEST}


def run_one(case: dict[str, Any], manifest: mf.Manifest) -> dict[str, Any]:
    """Run one case in this process and classify it (the worker's body; --replay uses it too)."""
    from prefixport.adapters.bundle import load_bundle
    from prefixport.adapters.peft import convert
    from prefixport.errors import PrefixportError

    began = time.perf_counter()
    out: dict[str, Any] = {"index": case["index"]}
    result = None
    try:
        if case["target"] == "selftest":
            _misbehave(case["path"])
        elif case["target"] == "bundle":
            result = load_bundle(case["path"], manifest if case["manifest"] else None)
        else:
            result = convert(case["path"], manifest, task=case["task"])
        out["outcome"] = "ok"
    except PrefixportError as e:
        message = str(e)
        out["error_type"], out["message"] = type(e).__name__, message[:2000]
        out["message_chars"] = len(message)
        if _has_memory_error(e):
            out["outcome"] = "memory"
        else:
            out["outcome"] = "error" if message.strip() else "crash"
        if out["outcome"] != "error":
            out["traceback"] = traceback.format_exc()[-4000:]
    except MemoryError:
        out["outcome"], out["error_type"], out["traceback"] = "memory", "MemoryError", traceback.format_exc()[-4000:]
    except BaseException as e:  # noqa: BLE001 - a pyo3 PanicException is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        out["outcome"], out["error_type"], out["message"] = "crash", type(e).__name__, str(e)[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
    out["seconds"] = time.perf_counter() - began
    if result is not None:
        scratch = Path(case["path"]).parent
        try:
            problems = _oracle(result, manifest if (case["manifest"] or case["target"] == "peft") else None, case,
                               scratch)
        except Exception as e:  # noqa: BLE001
            problems = [f"the oracle failed: {type(e).__name__}: {e}"]
        if problems:
            out["outcome"], out["problems"] = "bad_accept", problems[:5]
    return out


def _reset_peak_rss() -> None:
    """Linux: the peak RSS (VmHWM) restarts from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_kb() -> int:
    """VmHWM: this process image's peak RSS. (ru_maxrss would carry the parent's peak over fork and exec.)"""
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak // 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker_main(export: str, memory_gb: float) -> None:
    """Read cases (JSON lines) on stdin, answer results (JSON lines) on the original stdout."""
    import importlib
    import resource

    for module in ("prefixport.adapters.bundle", "prefixport.adapters.peft"):  # imported before the cap
        importlib.import_module(module)

    manifest = mf.Manifest.load(export)
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the library prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    if memory_gb > 0:
        cap = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    answer.write(json.dumps({"ready": True, "rss_kb": _peak_rss_kb()}) + "\n")
    answer.flush()
    for line in sys.stdin:
        case = json.loads(line)
        _reset_peak_rss()
        out = run_one(case, manifest)
        out["rss_kb"] = _peak_rss_kb()  # this case's peak (Linux); else the worker's so far
        answer.write(json.dumps(out) + "\n")
        answer.flush()


class Worker:
    """A worker subprocess with a watchdog: `run` returns its answer, or None on a hang (then killed)."""

    def __init__(self, export: Path, memory_gb: float, log: Path):
        self.export, self.memory_gb, self.log = export, memory_gb, log
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.starts = 0
        self.ready_rss_kb = 0

    def start(self) -> None:
        """Start a worker and wait (at most 2 minutes) until it is ready."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONFAULTHANDLER": "1"}
        if hasattr(self, "log_file"):
            self.log_file.close()
        self.log_file = open(self.log, "ab")
        self.log_offset = self.log_file.tell()
        self.proc = subprocess.Popen(  # from the checkout's root: `-m benchmarks.fuzz_worker` imports from there
            [sys.executable, "-m", "benchmarks.fuzz_worker", str(Path(self.export).resolve()),
             "--memory-gb", str(self.memory_gb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, env=env, start_new_session=True,
            cwd=ROOT)
        self.buf = b""
        self.starts += 1
        line = self._readline(120)
        if line is None:
            self.kill()
            raise RuntimeError(f"the fuzz worker did not start; see {self.log}")
        self.ready_rss_kb = json.loads(line)["rss_kb"]

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def run(self, case: Case, timeout: float) -> dict[str, Any] | None:
        """The worker's answer to `case` (a worker is started if none runs), or None after `timeout`
        seconds without one (the worker is killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin
        try:
            self.proc.stdin.write((json.dumps(asdict(case)) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(timeout)
        except (EOFError, BrokenPipeError):
            return self._died()
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def _died(self) -> dict[str, Any]:
        assert self.proc
        code = self.proc.wait()
        self.proc = None
        self.log_file.flush()
        tail = self.log.read_bytes()[self.log_offset:][-3000:].decode(errors="replace")
        memory = "memory allocation of" in tail or "MemoryError" in tail or "std::bad_alloc" in tail
        return {"outcome": "memory" if memory else "crash", "error_type": f"worker died (exit {code})",
                "message": tail[-500:], "traceback": tail, "seconds": None}

    def kill(self) -> None:
        """SIGKILL the worker's process group."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """End the worker (EOF on its stdin; killed after 10 s) and close its log."""
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
        if hasattr(self, "log_file"):
            self.log_file.close()



def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_worker", description=__doc__.split("\n")[0])
    parser.add_argument("export", help="the export whose manifest the readers get")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="the address-space cap (0: none)")
    args = parser.parse_args()
    worker_main(args.export, args.memory_gb)


if __name__ == "__main__":
    main()
