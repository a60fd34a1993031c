"""The fuzzer's worker: a subprocess that runs cases one at a time (JSON lines in on stdin, answers
out on stdout) under an address-space cap (RLIMIT_AS), so that a giant allocation fails there
instead of taking the machine down. Each case is classified (ok, error, crash, memory; the parent
adds hang) and an accepted adapter is checked by an oracle that does not trust the reader
(bad_accept). `Worker` is the parent's side, with a watchdog; `selftest` makes each failure happen
on purpose and checks that it is told apart.

    python -m tools.fuzz_worker EXPORT [--lora-export DIR] [--memory-gb 3]    # as `Worker` starts it
"""

from __future__ import annotations

import argparse
import json
import math
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
from tools.fuzz_cases import Case
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
    if meta["kind"] in WEIGHT_KINDS and meta["format_version"] != "3":
        problems.append(f"kind {meta['kind']} in format version {meta['format_version']!r}")
    if "prompt_format" in meta and not _prompt_format_ok(meta["prompt_format"]):
        problems.append(f"prompt_format {meta['prompt_format'][:40]!r}")
    kind, dtype = meta["kind"], meta["dtype"]
    if kind not in ("prompt", "prefix", *WEIGHT_KINDS):
        problems.append(f"kind {kind!r}")
    if dtype not in ("float32", "float16"):
        problems.append(f"dtype {dtype!r}")
    try:
        n = int(meta["n_virtual"])
    except ValueError:
        return problems + [f"n_virtual {meta['n_virtual'][:20]!r}"]
    if (n != 0) if kind in WEIGHT_KINDS else (n < 1):
        problems.append(f"n_virtual {n} for kind {kind}")
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
    elif kind in WEIGHT_KINDS:
        problems += _weight_problems(bundle, manifest)
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
        want_kind = {"PREFIX_TUNING": "prefix", "LORA": "lora", "IA3": "ia3"}.get(meta["peft_type"], "prompt")
        if kind != want_kind:
            problems.append(f"{meta['peft_type']} converted to kind {kind}")
        elif kind in WEIGHT_KINDS and manifest is not None:
            problems += _checkpoint_problems(bundle, Path(case["path"]), manifest)
        if case.get("reference"):
            ref = load_bundle(case["reference"], manifest)
            if set(ref.tensors) != set(tensors) or not all(np.array_equal(ref.tensors[k], tensors[k]) for k in tensors):
                problems.append(f"conversion differs from the seed bundle {Path(case['reference']).name}")
            differ = [k for k in ("rank", "scalings", "feedforward") if ref.metadata.get(k) != meta.get(k)]
            if differ:
                problems.append(f"conversion's {differ} differ from the seed bundle {Path(case['reference']).name}")
    return problems


WEIGHT_KINDS = ("lora", "ia3")
# what a bundle of these kinds names its tensors (written here again, not taken from the reader)
LORA_NAMES = re.compile(r"lora\.(0|[1-9][0-9]*)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.([ab])")
IA3_NAMES = re.compile(r"ia3\.(0|[1-9][0-9]*)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _real(value: Any) -> bool:
    """A JSON number that is a finite float (not a bool, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _weight_problems(bundle: Any, manifest: mf.Manifest | None) -> list[str]:
    """A lora bundle: an A [r, in] and a B [out, r] per module (r >= 1, one in and out per path),
    `rank` the largest r, one finite scaling per module whose s·B the runtime computes in float32
    stays finite; an ia3 bundle: one vector [dim >= 1] per module (one dim per path), `feedforward`
    a list of its paths. With the --lora export's manifest: modules, layers, ranks and dims it takes."""
    meta, tensors, kind = bundle.metadata, bundle.tensors, bundle.metadata["kind"]
    problems: list[str] = []
    pattern = LORA_NAMES if kind == "lora" else IA3_NAMES
    parsed = {name: pattern.fullmatch(name) for name in tensors}
    strays = sorted(name for name, m in parsed.items() if m is None)
    if strays:
        return [f"{kind} bundle holds {strays[:3]}"]
    modules = sorted({(int(m.group(1)), m.group(2)) for m in parsed.values() if m})
    dims: dict[str, set[tuple[int, ...]]] = {}
    if kind == "lora":
        ranks = []
        for layer, path in modules:
            a, b = tensors.get(f"lora.{layer}.{path}.a"), tensors.get(f"lora.{layer}.{path}.b")
            if a is None or b is None:
                problems.append(f"{layer}.{path}: A or B missing")
                continue
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] < 1 or b.shape[1] != a.shape[0] or min(*a.shape, *b.shape) < 1:
                problems.append(f"{layer}.{path}: A {list(a.shape)}, B {list(b.shape)}")
                continue
            ranks.append(a.shape[0])
            dims.setdefault(path, set()).add((a.shape[1], b.shape[0]))
        try:
            if ranks and int(meta.get("rank", "")) != max(ranks):
                problems.append(f"rank {meta['rank']!r}, modules up to {max(ranks)}")
        except ValueError:
            problems.append(f"rank {meta.get('rank', '')[:20]!r}")
        scalings = _json_or_none(meta.get("scalings", ""))
        if not isinstance(scalings, dict) or set(scalings) != {f"{layer}.{path}" for layer, path in modules}:
            problems.append(f"scalings {meta.get('scalings', '')[:60]!r} for {len(modules)} modules")
        else:
            for layer, path in modules:
                s, b = scalings[f"{layer}.{path}"], tensors.get(f"lora.{layer}.{path}.b")
                if not _real(s) or abs(float(s)) > FLOAT32_MAX:
                    problems.append(f"scaling {s!r} of {layer}.{path}")
                elif b is not None and b.size and abs(float(s)) * float(np.abs(b.astype(np.float64)).max()) > FLOAT32_MAX:
                    problems.append(f"scaling {s!r} times B of {layer}.{path} is not finite in float32")
    else:
        for layer, path in modules:
            v = tensors[f"ia3.{layer}.{path}"]
            if v.ndim != 1 or v.shape[0] < 1:
                problems.append(f"ia3.{layer}.{path}: {list(v.shape)}")
            dims.setdefault(path, set()).add(v.shape)
        feedforward = _json_or_none(meta.get("feedforward", ""))
        if not isinstance(feedforward, list) or not all(isinstance(p, str) for p in feedforward) or not set(
                feedforward) <= {path for _, path in modules}:
            problems.append(f"feedforward {meta.get('feedforward', '')[:60]!r}")
            feedforward = []
    problems += [f"{path} has shapes {sorted(d)} in different layers" for path, d in dims.items() if len(d) > 1]
    if manifest is None or problems:
        return problems
    table = manifest.weight_adapters
    if not table:
        return [f"a {kind} bundle accepted for an export without --lora"]
    for layer, path in modules:
        if layer >= manifest.num_layers:
            problems.append(f"layer {layer} of {manifest.num_layers}")
        if kind == "lora":
            a, b = tensors[f"lora.{layer}.{path}.a"], tensors[f"lora.{layer}.{path}.b"]
            if path not in table["lora"]:
                problems.append(f"LoRA on {path}, which the export takes none on")
            elif (a.shape[1], b.shape[0]) != tuple(table["shapes"][path]) or a.shape[0] > table["max_rank"]:
                problems.append(f"{layer}.{path}: A {list(a.shape)}, B {list(b.shape)} for {table['shapes'][path]}, "
                                f"max rank {table['max_rank']}")
        else:
            side = "input" if path in feedforward else "output"
            if table["ia3"].get(path) != side:
                problems.append(f"IA3 on the {side} of {path}; the export: {table['ia3'].get(path)}")
            elif tensors[f"ia3.{layer}.{path}"].shape != (table["shapes"][path][0 if side == "input" else 1],):
                problems.append(f"ia3.{layer}.{path} {list(tensors[f'ia3.{layer}.{path}'].shape)}")
    return problems


TRAINING_ONLY = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler\.[A-Za-z_]+)$")  # PEFT's, skipped


def _values(patterns: Any) -> list[Any]:
    return list(patterns.values()) if isinstance(patterns, dict) else []


def _checkpoint_problems(bundle: Any, folder: Path, manifest: mf.Manifest) -> list[str]:
    """A converted LORA or IA3 checkpoint holds exactly the checkpoint's tensors, one for one: each
    lora_A / lora_B / ia3_l of `{layers_path}.{layer}.{path}` is the bundle's tensor of that layer
    and path (an IA3 vector flattened), on the side its shape says; each LoRA module's scaling is
    alpha / r (alpha / sqrt(r) with use_rslora), alpha being lora_alpha or an alpha_pattern value and
    r, its A's rows, being r or a rank_pattern value. Read here with safetensors, not the reader."""
    from safetensors.numpy import load_file

    table = manifest.weight_adapters or {}
    raw = {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
           if not TRAINING_ONLY.search(k)}
    config = _json_or_none((folder / "adapter_config.json").read_text(encoding="utf-8"))
    head = re.escape(f"base_model.model.{table.get('layers_path')}.")
    leaf = re.compile(head + r"([0-9]+)\.(.+)\.(lora_A\.weight|lora_B\.weight|ia3_l)")
    feedforward = _json_or_none(bundle.metadata.get("feedforward", "[]"))  # checked by _weight_problems
    mapped: dict[str, list[str]] = {}
    problems = []
    for key, t in raw.items():
        m = leaf.fullmatch(key)
        if m is None:
            problems.append(f"checkpoint tensor {key[:80]} has no place in the bundle")
            continue
        layer, path, kind = m.group(1), m.group(2), m.group(3)
        name = (f"ia3.{layer}.{path}" if kind == "ia3_l" else
                f"lora.{layer}.{path}.{'a' if kind.startswith('lora_A') else 'b'}")
        mapped.setdefault(name, []).append(key)
        got = bundle.tensors.get(name)
        want = t.reshape(-1) if kind == "ia3_l" else t
        if got is None or got.shape != want.shape or not np.array_equal(got, want.astype(got.dtype)):
            problems.append(f"{name} is not the checkpoint's {key[:80]}")
        if kind == "ia3_l" and (path in feedforward) != (t.ndim == 2 and t.shape[0] == 1 and t.shape[1] != 1):
            problems.append(f"{path} on the {'input' if path in feedforward else 'output'}, its vector {list(t.shape)}")
    problems += [f"{name} stands for {len(keys)} checkpoint tensors ({keys[1][:80]})" for name, keys in mapped.items()
                 if len(keys) > 1]
    problems += [f"{name} comes from no checkpoint tensor" for name in bundle.tensors if name not in mapped]
    if bundle.metadata["kind"] == "lora" and isinstance(config, dict) and not problems:
        alphas = [config.get("lora_alpha"), *_values(config.get("alpha_pattern"))]
        ranks = [config.get("r"), *_values(config.get("rank_pattern"))]
        rslora = bool(config.get("use_rslora", False))
        for key, s in _json_or_none(bundle.metadata["scalings"]).items():
            r = bundle.tensors[f"lora.{key}.a"].shape[0]
            wants = [float(a) / (math.sqrt(r) if rslora else r) for a in alphas if _real(a)]
            if r not in ranks or not any(math.isclose(s, want, rel_tol=1e-12) for want in wants):
                problems.append(f"scaling {s} of {key} (rank {r}) is none of alpha/{'sqrt(r)' if rslora else 'r'} "
                                f"for lora_alpha or alpha_pattern {alphas[:4]}, ranks {ranks[:4]}")
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


def run_one(case: dict[str, Any], manifest: mf.Manifest, lora_manifest: mf.Manifest | None = None) -> dict[str, Any]:
    """Run one case in this process and classify it (the worker's body; --replay uses it too): against
    `lora_manifest` (the export made with --lora) where the case says so, else `manifest`."""
    if case.get("lora_export"):
        if lora_manifest is None:
            raise ValueError(f"case {case['index']} needs the export made with --lora")
        manifest = lora_manifest
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


def worker_main(export: str, memory_gb: float, lora_export: str | None = None) -> None:
    """Read cases (JSON lines) on stdin, answer results (JSON lines) on the original stdout."""
    import importlib
    import resource

    for module in ("prefixport.adapters.bundle", "prefixport.adapters.peft"):  # imported before the cap
        importlib.import_module(module)

    manifest = mf.Manifest.load(export)
    lora_manifest = mf.Manifest.load(lora_export) if lora_export else None
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
        out = run_one(case, manifest, lora_manifest)
        out["rss_kb"] = _peak_rss_kb()  # this case's peak (Linux); else the worker's so far
        answer.write(json.dumps(out) + "\n")
        answer.flush()


class Worker:
    """A worker subprocess with a watchdog: `run` returns its answer, or None on a hang (then killed)."""

    def __init__(self, export: Path, memory_gb: float, log: Path, lora_export: Path | None = None):
        self.export, self.memory_gb, self.log, self.lora_export = export, memory_gb, log, lora_export
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
        self.proc = subprocess.Popen(  # from the checkout's root: `-m tools.fuzz_worker` imports from there
            [sys.executable, "-m", "tools.fuzz_worker", str(Path(self.export).resolve()),
             "--memory-gb", str(self.memory_gb),
             *(["--lora-export", str(Path(self.lora_export).resolve())] if self.lora_export else [])],
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
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz_worker", description=__doc__.split("\n")[0])
    parser.add_argument("export", help="the export whose manifest the readers get")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="the address-space cap (0: none)")
    parser.add_argument("--lora-export", help="the same model exported with --lora (the LoRA and IA3 cases')")
    args = parser.parse_args()
    worker_main(args.export, args.memory_gb, args.lora_export)


if __name__ == "__main__":
    main()
