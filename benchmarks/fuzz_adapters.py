"""Fuzzing of the adapter readers: `load_bundle` (bundle files) and `convert` (PEFT checkpoint
folders) fed malformed, lying and hostile inputs, every outcome counted.

Cases are mutations of real seeds: the bundles and PEFT checkpoints of a tiny random Llama export
(built here unless given, see below). Case i of seed S is made from `random.Random(f"{S}:{i}")`
alone, so `--replay S:i` rebuilds and reruns it. Its family is fixed by i (a weighted round robin),
so every family gets cases in a short run too. The families:

  bundle_valid        a seed bundle unchanged (must be accepted)
  bundle_header_len   the 8-byte header length lies: 0, short, one off, the file size, 2**32, 2**63, 2**64-1, ...
  bundle_header_json  header JSON truncated, non-UTF-8, lone surrogates, not an object, wrong field
                      types, missing/extra fields, duplicate keys (also a second __metadata__ that lies),
                      nesting 100,000 deep, 5,000-digit numbers, NaN literals, BOM, padding
  bundle_offsets      data_offsets inverted, past the end, overlapping, wrapping at 2**64, negative, swapped
  bundle_shape        declared shapes huge ([2**40, 2**40], [2**63], [2**62, 0]) over small data, rank
                      changed, product kept or not, 65-100 dimensions; data extended to match or not
  bundle_dtype        dtype strings wrong or unsupported (F64, BF16, F8_*, F6_*, F4, I8, BOOL, C64,
                      "float32", "", ...): bytes kept (length mismatch) or re-encoded to match
  bundle_values       NaN/Inf (also signalling NaN, overflow on a float16 cast), and finite extremes
  bundle_truncate     cut inside the length field, the header or the data; bytes appended
  bundle_metadata     metadata lies: kind, n_virtual, fingerprint of another base, format version,
                      missing keys, non-string values, dtype, name
  bundle_tensors      valid files whose tensors disagree: missing/extra/renamed tensors, prompt tensors
                      under prefix metadata and back, n_virtual changed consistently (acceptable), batch
                      dims, transposes, float16/float64/int8/bool, mixed dtypes, 0-d and empty tensors
  bundle_random       random bytes, empty file, zeros, text, JSON, other formats' magic
  bundle_byteflip     1-16 random byte edits (flip, set, insert, delete, duplicate), mostly in the header
  bundle_pickle       a real pickle (protocols 0-5, or a torch-style zip) under .safetensors, .bin, .pt, ...
  peft_valid          a seed checkpoint unchanged (must convert to exactly its seed bundle), task ids varied
  peft_config         adapter_config.json malformed, wrong encodings, not an object, nesting, NaN/Infinity
                      and huge literals, missing fields, wrong types, unknown/swapped peft_type,
                      num_virtual_tokens / token_dim / num_layers / num_tasks lying, duplicate keys
  peft_weights_raw    adapter_model.safetensors mutated as in the bundle_* families above
  peft_weights        valid weights files that disagree with the config: renamed, missing, extra,
                      reshaped, bfloat16/float64/int/float16 tensors, multitask factors wrong
  peft_pickle         a pickle instead of the safetensors (each name PEFT/torch use, and others), a pickle
                      named adapter_model.safetensors or adapter_config.json, a pickle beside valid weights
  peft_layout         files missing, directories instead of files, symlinks to /dev/zero, FIFOs, dangling
                      links, the folder a file

Each case runs `load_bundle(path, manifest)` (15% without the manifest) or `convert(dir, manifest,
task=...)` in a worker subprocess and is classified:

  ok          accepted; then checked independently of the reader: complete string metadata, known
              kind/version/dtype, n_virtual >= 1 and equal to the tensors' dimension, tensor names
              and shapes of the kind (and of this export, with the manifest), one float dtype, all
              finite, `check_bundle`/`check_fits` pass, a save/load round trip is identical; a
              converted unchanged seed equals its seed bundle. A failed check: `bad_accept`.
  error       a PrefixportError with a non-empty message (the wanted outcome for a broken input)
  crash       any other exception, an empty message, or the worker died (reproducer kept)
  hang        no answer within --timeout seconds: the worker is killed and restarted
  memory      MemoryError (also as the cause of a project error), or the worker aborted on a failed
              allocation, under the worker's address-space cap (RLIMIT_AS, --memory-gb): a giant
              allocation fails there instead of taking the machine down

Every pickle written embeds a payload whose unpickling creates a marker file (checked at start with
pickle.loads on a canary path: the payload works); the marker is checked after every case and must
never appear. Recorded per family: outcomes, the sub-kinds of mutation, the slowest case, the most
common error messages; overall: the worker's peak RSS, restarts, and for every crash, hang, memory
or bad_accept case a reproducer (seed:index, description, traceback) with its files copied under
OUT/reproducers/.

Seeds: `--export DIR --seeds DIR` reuse an export and a folder of bundles (*.safetensors) with the
PEFT checkpoints they came from under peft/<variant>/ (the layout of the tests' tiny_adapters
fixture; a bundle named <variant>.safetensors or <variant>-task<T>.safetensors is the expected
conversion of that checkpoint). Otherwise the seeds are built into --work (default: a temp folder,
removed after): a tiny random Llama (tests/tiny_models.py) exported with `export_model`, every PEFT
variant of tests/peft_helpers.py trained two steps and converted, and the soft prompt baked into a
prefix. Building needs the `export` extra (torch, transformers, peft) and about a minute; the fuzzing
itself needs only numpy and safetensors.

    python benchmarks/fuzz_adapters.py [--cases 10000] [--seed 0] [--timeout 5] [--memory-gb 3] \\
        [--export DIR --seeds DIR | --work DIR] [--out benchmarks/results/fuzz_adapters]
    python benchmarks/fuzz_adapters.py --replay SEED:INDEX --export DIR --seeds DIR   # in this process

Writes OUT/fuzz_adapters.json and OUT/fuzz_adapters.md (runs of fewer than 10,000 cases:
fuzz_adapters_short.*, so a smoke run never overwrites the figures); prints the table, then one
JSON line. The tests (tests/test_fuzz_adapters.py) run a few hundred cases through `run_fuzz`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pickle
import random
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefixport import manifest as mf  # noqa: E402

OUTCOMES = ("ok", "error", "crash", "hang", "memory", "bad_accept")
FAILURES = ("crash", "hang", "memory", "bad_accept")
FULL_RUN = 10_000
KEEP_REPRODUCERS = 50  # case folders copied; all failures are listed in the JSON
BUNDLE = "adapter.safetensors"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# --- seeds ---------------------------------------------------------------------------------------

@dataclass
class Seeds:
    export: Path
    seeds_dir: Path
    manifest: mf.Manifest
    bundles: dict[str, bytes]  # name -> file bytes
    peft: dict[str, dict[str, bytes]]  # variant -> {file name: bytes} (top-level regular files)
    references: dict[str, tuple[str, int | None]]  # variant -> (bundle file, task) of its conversion


def load_seeds(export: Path, seeds_dir: Path) -> Seeds:
    manifest = mf.Manifest.load(export)
    bundles = {p.stem: p.read_bytes() for p in sorted(seeds_dir.glob("*.safetensors"))}
    peft: dict[str, dict[str, bytes]] = {}
    for d in sorted((seeds_dir / "peft").glob("*")):
        if (d / CONFIG).is_file() and (d / WEIGHTS).is_file():
            peft[d.name] = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    if not bundles or not peft:
        raise SystemExit(f"{seeds_dir}: needs seed bundles (*.safetensors) and PEFT checkpoints under peft/<variant>/")
    references: dict[str, tuple[str, int | None]] = {}
    for variant in peft:
        if variant in bundles:
            references[variant] = (str(seeds_dir / f"{variant}.safetensors"), None)
        else:
            tasks = [n for n in bundles if re.fullmatch(re.escape(variant) + r"-task\d+", n)]
            if tasks:
                references[variant] = (str(seeds_dir / f"{tasks[0]}.safetensors"), int(tasks[0].rsplit("task", 1)[1]))
    return Seeds(export, seeds_dir, manifest, bundles, peft, references)


def build_seeds(work: Path, arch: str = "llama", say: Callable[[str], None] = print) -> tuple[Path, Path]:
    """A tiny random `arch` model, exported; every PEFT variant trained two steps and converted."""
    export, seeds = work / "export", work / "seeds"
    if (export / mf.MANIFEST_NAME).is_file() and (seeds / "peft").is_dir():
        say(f"reusing the seeds in {work}")
        return export, seeds
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.adapters import convert_checkpoint, convert_for_export, save_bundle
    from prefixport.exporter import export_model
    from prefixport.runtime import Engine
    from tests import peft_helpers as ph
    from tests import tiny_models

    say(f"building seeds in {work}: a tiny random {arch}, exported ...")
    model_dir = tiny_models.build(arch, work / "model")
    export_model(export, model=str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    for variant in ph.VARIANTS:
        say(f"  PEFT {variant}: training two steps, converting ...")
        ph.train(AutoModelForCausalLM.from_pretrained(model_dir), variant, tok, seeds / "peft" / variant, steps=2)
        task = 1 if variant == "multitask" else None
        name = variant + (f"-task{task}" if task is not None else "")
        convert_checkpoint(seeds / "peft" / variant, export, name=name, task=task, out=seeds / f"{name}.safetensors")
    engine = Engine.load(export)  # the soft prompt baked into a prefix: the runtime runs the graph over it
    try:
        baked = engine.bake_prefix(convert_for_export(seeds / "peft" / "prompt", export, name="prompt-baked"))
    finally:
        engine.close()
    save_bundle(baked, seeds / "prompt-baked.safetensors")
    return export, seeds


# --- safetensors bytes -----------------------------------------------------------------------------

ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
           "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
           "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
ST_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
            "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
            "F64": np.float64, "C64": np.complex64}


def st_parse(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_pack(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def st_entries(raw: bytes) -> tuple[Any, list[tuple[str, dict[str, Any], bytes]]]:
    """(metadata, [(name, info, data)] in data order) of a well-formed file."""
    header, data = st_parse(raw)
    meta = header.pop("__metadata__", None)
    entries = [(k, dict(v), data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()]
    return meta, sorted(entries, key=lambda e: e[1]["data_offsets"][0])


def st_join(meta: Any, entries: list[tuple[str, dict[str, Any], bytes]], fix_offsets: bool = True) -> bytes:
    header: dict[str, Any] = {} if meta is None else {"__metadata__": meta}
    data, pos = b"", 0
    for name, info, blob in entries:
        info = dict(info)
        if fix_offsets:
            info["data_offsets"] = [pos, pos + len(blob)]
        header[name] = info
        data += blob
        pos += len(blob)
    return st_pack(header, data)


def st_decode(raw: bytes) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    header, _ = st_parse(raw)
    return {k: v.copy() for k, v in st_load(raw).items()}, header.get("__metadata__")


def st_encode(tensors: dict[str, np.ndarray], meta: dict[str, str] | None) -> bytes:
    return st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


# --- the pickle payload ----------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls open(path, "w"): the marker file appears if anything ever unpickles it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(marker: Path, protocol: int) -> bytes:
    return pickle.dumps({"prompt_embeddings": _Payload(str(marker)), "note": "prefixport must never unpickle this"},
                        protocol=protocol)


def pickle_blob(marker: Path, r: random.Random) -> tuple[bytes, str]:
    if r.random() < 0.25:  # torch.save's zip layout: archive/data.pkl
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", _payload(marker, 2))
            z.writestr("archive/version", "3\n")
        return buf.getvalue(), "torch-style zip"
    protocol = r.randint(0, pickle.HIGHEST_PROTOCOL)
    return _payload(marker, protocol), f"protocol {protocol}"


def check_payload(work: Path) -> bool:
    """The payload works: pickle.loads (here, on purpose) creates its marker, for every protocol and for
    the data.pkl inside the zip."""
    canary = work / "canary-pickle-executed"
    blobs = [_payload(canary, p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    zipped, _ = pickle_blob(canary, random.Random(1))  # Random(1) draws the zip
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        blobs.append(z.read("archive/data.pkl"))
    ok = True
    for blob in blobs:
        canary.unlink(missing_ok=True)
        pickle.loads(blob)["prompt_embeddings"].close()  # noqa: S301 - our own payload, to prove it fires
        ok = ok and canary.exists()
    canary.unlink(missing_ok=True)
    return ok


# --- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    family: str
    target: str  # "bundle" | "peft"
    path: str
    desc: str
    kind: str = ""  # the sub-kind of mutation, counted per family
    manifest: bool = True
    task: int | None = None
    reference: str | None = None  # a bundle the conversion must equal


@dataclass
class Ctx:
    r: random.Random
    g: np.random.Generator
    seeds: Seeds
    dir: Path
    marker: Path

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.r.randrange(len(options))]


def _u64(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def mut_header_len(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    n, size, r = _u64(raw), len(raw), c.r
    if r.random() < 0.1:
        cut = r.randint(0, 7)
        return raw[:cut], f"short_file: {cut} bytes, less than the length field"
    value = c.pick([0, 1, 2, 7, 8, max(n - 1, 0), n + 1, max(n - r.randint(2, 64), 0), n + r.randint(2, 64),
                    size - 8, size - 7, size, size + 1, 2 * size, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + n,
                    100_000_000, 100_000_001, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, r.getrandbits(64),
                    r.getrandbits(32), r.getrandbits(16)])
    return struct.pack("<Q", value) + raw[8:], f"length: {value} (true {n}, file {size})"


WRONG = {
    "dtype": [1, None, ["F32"], {"F32": 1}, "f32", "float32", "F32 ", "", True, 3.5],
    "shape": ["3,4", [3.5, 4], None, {}, [True, 4], [-1, 4], [2**64, 1], [2**64], "[]", 7, [[3], [4]], [None],
              [1e400], [-2**63]],
    "data_offsets": [[0], [0, 1, 2], "0-48", None, [-1, 48], [0.0, 48.0], [], {"begin": 0}, [2**64, 2**64 + 4],
                     [True, False], [0, 2**65]],
    "info": [[], "x", 1, None, True, {}, [1, 2, 3]],
}
META_WRONG = [[], "x", 1, None, True, {"a": {"b": "c"}}, [["kind", "prompt"]]]
META_VALUE_WRONG = [7, None, True, ["prompt"], {"v": "1"}, 1.5, -1]


def mut_header_json(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    header, data = st_parse(raw)
    names = _tensor_names(header)
    name = c.pick(names)
    text = json.dumps(header, separators=(",", ":")).encode()
    kind = c.pick(["truncated", "garbage_byte", "non_utf8", "surrogate", "not_object", "wrong_type", "wrong_type",
                   "missing_field", "extra_field", "metadata_type", "metadata_value_type", "duplicate_tensor",
                   "duplicate_metadata", "deep_nesting", "huge_number", "float_literal", "padding", "bom",
                   "trailing", "empty_key", "big_metadata", "escaped_key"])
    if kind == "truncated":
        cut = r.randrange(len(text))
        return st_pack(text[:cut], data), f"{kind}: header text cut at {cut}/{len(text)}"
    if kind == "garbage_byte":
        pos, b = r.randrange(len(text) + 1), bytes([r.randrange(256)])
        return st_pack(text[:pos] + b + text[pos:], data), f"{kind}: {b!r} inserted at {pos}"
    if kind == "non_utf8":
        seq = c.pick([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xfe\xff"])
        target = c.pick([json.dumps(name).encode(), b'"__metadata__"', b'"dtype"'])
        text = text.replace(target, target[:-1] + seq + b'"', 1)
        return st_pack(text, data), f"{kind}: {seq!r} inside {target.decode(errors='replace')}"
    if kind == "surrogate":
        text = text.replace(json.dumps(name).encode(), c.pick([b'"\\ud800"', b'"a\\udfff"', b'"\\u0000"']), 1)
        return st_pack(text, data), f"{kind}: tensor {name} renamed to an escaped lone surrogate or NUL"
    if kind == "not_object":
        text = c.pick([b"[]", b"null", b"1", b'"x"', b"true", b"[{}]", b"", b" ", b"{}", b"{", b"}", b"[" + text + b"]"])
        return st_pack(text, data), f"{kind}: header {text[:20]!r}"
    if kind == "wrong_type":
        fld = c.pick(list(WRONG))
        value = c.pick(WRONG[fld])
        if fld == "info":
            header[name] = value
        else:
            header[name][fld] = value
        return st_pack(header, data), f"{kind}: {name}.{fld} = {json.dumps(value)[:40]}"
    if kind == "missing_field":
        fld = c.pick(["dtype", "shape", "data_offsets"])
        del header[name][fld]
        return st_pack(header, data), f"{kind}: {name} without {fld}"
    if kind == "extra_field":
        header[name][c.pick(["extra", "layout", "dtype2"])] = c.pick([1, "x", None, [1]])
        return st_pack(header, data), f"{kind}: {name} with an unknown field"
    if kind == "metadata_type":
        header["__metadata__"] = value = c.pick(META_WRONG)
        return st_pack(header, data), f"{kind}: __metadata__ = {json.dumps(value)[:40]}"
    if kind == "metadata_value_type":
        meta = header.get("__metadata__") or {}
        key = c.pick(sorted(meta) or ["kind"])
        meta[key] = value = c.pick(META_VALUE_WRONG)
        header["__metadata__"] = meta
        return st_pack(header, data), f"{kind}: metadata {key} = {json.dumps(value)}"
    if kind == "duplicate_tensor":
        other = dict(header[name])
        other["shape"] = c.pick([[1], list(reversed(other["shape"])), [2**40, 2**40]])
        dup = json.dumps(name).encode() + b":" + json.dumps(other, separators=(",", ":")).encode()
        text = (b"{" + dup + b"," + text[1:]) if r.random() < 0.5 else (text[:-1] + b"," + dup + b"}")
        return st_pack(text, data), f"{kind}: {name} twice, the other with shape {other['shape']}"
    if kind == "duplicate_metadata":
        meta = dict(header.get("__metadata__") or {})
        meta["kind"] = {"prompt": "prefix", "prefix": "prompt"}.get(meta.get("kind", ""), "prompt")
        meta["n_virtual"] = str(r.randint(1, 99))
        dup = b'"__metadata__":' + json.dumps(meta, separators=(",", ":")).encode()
        text = (b"{" + dup + b"," + text[1:]) if r.random() < 0.5 else (text[:-1] + b"," + dup + b"}")
        return st_pack(text, data), f"{kind}: a second __metadata__ with kind {meta['kind']}, n_virtual {meta['n_virtual']}"
    if kind == "deep_nesting":
        depth = c.pick([200, 10_000, 100_000])
        where = c.pick(["root", "shape", "metadata"])
        nest = b"[" * depth + b"]" * depth
        if where == "root":
            text = nest
        elif where == "shape":
            text = text.replace(json.dumps(header[name]["shape"], separators=(",", ":")).encode(), nest, 1)
        else:
            text = b'{"__metadata__":{"k":' + nest + b"}," + text[1:]
        return st_pack(text, data), f"{kind}: {depth} levels in the {where}"
    if kind == "huge_number":
        digits = c.pick([20, 400, 5000])
        text = text.replace(json.dumps(header[name]["shape"], separators=(",", ":")).encode(),
                            b"[" + b"9" * digits + b"]", 1)
        return st_pack(text, data), f"{kind}: {name} shape [{digits} nines]"
    if kind == "float_literal":
        lit = c.pick([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"3e0", b"-0"])
        text = text.replace(json.dumps(header[name]["shape"], separators=(",", ":")).encode(), b"[" + lit + b"]", 1)
        return st_pack(text, data), f"{kind}: {name} shape [{lit.decode()}]"
    if kind == "padding":
        pad = c.pick([b" ", b"\n", b"\t", b"\x00"]) * r.randint(1, 64)
        return st_pack(text + pad, data), f"{kind}: {len(pad)} x {pad[:1]!r} after the JSON"
    if kind == "bom":
        return st_pack(b"\xef\xbb\xbf" + text, data), f"{kind}: UTF-8 BOM before the JSON"
    if kind == "trailing":
        tail = c.pick([b"xyz", b"{}", b",", b"}", b"]"])
        return st_pack(text + tail, data), f"{kind}: {tail!r} after the JSON"
    if kind == "empty_key":
        header[""] = header.pop(name)
        return st_pack(header, data), f"{kind}: tensor {name} renamed to ''"
    if kind == "big_metadata":
        meta = dict(header.get("__metadata__") or {})
        key = c.pick(["name", "source", "extra"])
        meta[key] = "x" * c.pick([100_000, 1_000_000])
        header["__metadata__"] = meta
        return st_pack(header, data), f"{kind}: metadata {key} of {len(meta[key]):,} characters"
    # escaped_key: the same name written with JSON escapes (the same string once decoded)
    escaped = "".join(f"\\u{ord(ch):04x}" for ch in name).encode()
    text = text.replace(json.dumps(name).encode(), b'"' + escaped + b'"', 1)
    return st_pack(text, data), f"{kind}: {name} spelled with \\u escapes"


def mut_offsets(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    header, data = st_parse(raw)
    names = _tensor_names(header)
    name = c.pick(names)
    b, e = header[name]["data_offsets"]
    size, k = len(data), r.randint(1, 64)
    kind = c.pick(["inverted", "past_end", "both_past_end", "huge_end", "huge_both", "wraps", "overlap", "shift",
                   "prefix_gap", "swap", "short", "zero", "empty", "negative"])
    if kind == "overlap" and len(names) > 1:
        other = c.pick([n for n in names if n != name])
        header[name]["data_offsets"] = list(header[other]["data_offsets"])
        return st_pack(header, data), f"{kind}: {name} uses {other}'s bytes"
    if kind == "swap" and len(names) > 1:
        other = c.pick([n for n in names if n != name])
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [b, e]
        return st_pack(header, data), f"{kind}: {name} and {other} swap bytes"
    if kind == "prefix_gap":
        for n in names:
            header[n]["data_offsets"] = [x + k for x in header[n]["data_offsets"]]
        return st_pack(header, bytes(k) + data), f"{kind}: {k} unused bytes before the first tensor"
    new = {"inverted": [e, b], "past_end": [b, size + k], "both_past_end": [size + k, size + k + e - b],
           "huge_end": [b, 2**64 - 1], "huge_both": [2**63, 2**63 + e - b], "wraps": [2**64 - (e - b), 2**64],
           "shift": [b + k, e + k], "short": [b, max(e - k, b)], "zero": [0, 0], "empty": [b, b],
           "negative": [-1, e], "overlap": [0, e - b], "swap": [e, b]}[kind]
    header[name]["data_offsets"] = new
    return st_pack(header, data), f"{kind}: {name} data_offsets {new} (was {[b, e]}, data {size} bytes)"


def mut_shape(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    meta, entries = st_entries(raw)
    i = r.randrange(len(entries))
    name, info, blob = entries[i]
    shape = list(info["shape"])
    numel = int(np.prod(shape)) if shape else 1
    kind = c.pick(["huge_2d", "huge_1d", "max_u64", "huge_zero", "zero", "empty_dims", "flat", "transposed",
                   "extra_one", "leading_one", "same_numel", "random", "many_dims", "too_many_dims", "one_off"])
    if kind == "same_numel" and len(shape) >= 2 and shape[0] % 2 == 0:
        new = [shape[0] // 2, *shape[1:-1], shape[-1] * 2]
    else:
        new = {"huge_2d": [2**40, 2**40], "huge_1d": [2**63], "max_u64": [2**64 - 1], "huge_zero": [2**62, 0],
               "zero": [0], "empty_dims": [], "flat": [numel], "transposed": list(reversed(shape)),
               "extra_one": [*shape, 1], "leading_one": [1, *shape], "same_numel": [numel, 1],
               "random": [r.randint(0, 40) for _ in range(r.randint(1, 4))], "many_dims": [1] * 65 + [numel],
               "too_many_dims": [1] * 100, "one_off": [shape[0] + c.pick([-1, 1]), *shape[1:]]}[kind]
    info["shape"] = new
    try:
        declared = int(np.prod(new, dtype=object)) * ST_BITS[info["dtype"]] // 8 if new else ST_BITS[info["dtype"]] // 8
    except Exception:
        declared = None
    fixed = False
    if declared is not None and declared != len(blob) and declared <= 1 << 20 and r.random() < 0.5:
        blob = (blob + bytes(declared))[:declared]  # data resized to match the declared shape
        fixed = True
    entries[i] = (name, info, blob)
    return st_join(meta, entries), (f"{kind}: {name} shape {new if len(new) < 8 else f'[{len(new)} dims]'} "
                                    f"(was {shape}){', data resized to match' if fixed else ''}")


DTYPES_ANY = ["F64", "BF16", "F16", "I8", "U8", "I16", "I32", "I64", "U16", "U32", "U64", "BOOL", "F8_E4M3",
              "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "F32"]


def mut_dtype(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    meta, entries = st_entries(raw)
    kind = c.pick(["keep_bytes", "reencode", "reencode_all", "bad_string"])
    if kind == "bad_string":
        header, data = st_parse(raw)
        name = c.pick(_tensor_names(header))
        header[name]["dtype"] = value = c.pick(["float32", "f32", "", "XYZ", "F32 ", "f16", "FP8", "Q4_0", "F128"])
        return st_pack(header, data), f"{kind}: {name} dtype {value!r}"
    targets = range(len(entries)) if kind == "reencode_all" else [r.randrange(len(entries))]
    dtype = c.pick(DTYPES_ANY)
    for i in targets:
        name, info, blob = entries[i]
        if kind != "keep_bytes":
            values = np.frombuffer(blob, dtype=ST_NUMPY[info["dtype"]])
            numel = values.size
            if dtype in ST_NUMPY:
                with np.errstate(all="ignore"):
                    blob = values.astype(ST_NUMPY[dtype]).tobytes()
            elif dtype == "BF16":
                blob = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            else:
                blob = c.g.integers(0, 256, -(-numel * ST_BITS[dtype] // 8), dtype=np.uint8).tobytes()
        info["dtype"] = dtype
        entries[i] = (name, info, blob)
    if kind == "reencode_all" and isinstance(meta, dict) and "dtype" in meta and r.random() < 0.7:
        meta["dtype"] = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16"}.get(dtype, dtype.lower())
    return st_join(meta, entries), f"{kind}: {'all tensors' if kind == 'reencode_all' else entries[targets[0]][0]} as {dtype}"


SPECIALS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "max32": 3.4e38, "-max32": -3.4e38,
            "subnormal": 1e-45, "-0": -0.0, "max16": 65504.0, "over16": 65520.0, "big": 1e30}


def mut_values(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    tensors, meta = st_decode(raw)
    name = c.pick(sorted(tensors))
    special = c.pick(list(SPECIALS) + ["nan", "inf", "signalling_nan"])
    half = r.random() < 0.25 and isinstance(meta, dict)
    t = tensors[name].astype(np.float32)
    flat = t.reshape(-1)
    count = c.pick([1, 1, 2, flat.size])
    where = c.g.choice(flat.size, size=min(count, flat.size), replace=False)
    if special == "signalling_nan":
        flat.view(np.uint32)[where] = 0x7F800001
    else:
        flat[where] = SPECIALS[special]
    tensors[name] = t
    if half:  # the whole file as float16 (values over 65504 become inf)
        with np.errstate(all="ignore"):
            tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
        if "dtype" in meta:
            meta["dtype"] = "float16"
    return st_encode(tensors, meta), f"{special}: {len(where)} value(s) of {name}{' (file cast to float16)' if half else ''}"


def mut_truncate(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    n, size = _u64(raw), len(raw)
    if r.random() < 0.2:
        tail = c.pick([bytes(r.randint(1, 64)), bytes(r.randrange(256) for _ in range(r.randint(1, 64))), raw[8:40]])
        return raw + tail, f"appended: {len(tail)} bytes after the data"
    cut = c.pick([0, r.randint(1, 7), 8, r.randint(9, 8 + n - 1), 8 + n - 1, 8 + n, 8 + n + 1,
                  r.randint(8 + n, size - 1), size - 1, r.randrange(size)])
    where = "length field" if cut < 8 else "header" if cut < 8 + n else "data"
    return raw[:cut], f"cut in the {where}: {cut} of {size} bytes"


def mut_byteflip(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    buf = bytearray(raw)
    header_end = min(8 + _u64(raw), len(raw))
    ops = []
    for _ in range(c.pick([1, 1, 2, 3, 4, 8, 16])):
        if not buf:
            break
        pos = r.randrange(header_end if r.random() < 0.7 and header_end > 0 else len(buf))
        pos = min(pos, len(buf) - 1)
        op = c.pick(["flip", "set", "interesting", "insert", "delete", "duplicate"])
        if op == "flip":
            buf[pos] ^= 1 << r.randrange(8)
        elif op == "set":
            buf[pos] = r.randrange(256)
        elif op == "interesting":
            buf[pos] = c.pick(b'\x00\xff\x7f\x80"{}[],:-e019 \\')
        elif op == "insert":
            buf[pos:pos] = bytes([r.randrange(256)])
        elif op == "delete":
            del buf[pos]
        else:
            k = r.randint(1, 32)
            buf[pos:pos] = buf[pos:pos + k]
        ops.append(f"{op}@{pos}")
    return bytes(buf), f"{len(ops)} edits: {' '.join(ops[:8])}"


def mut_random(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r = c.r
    kind = c.pick(["random", "random", "empty", "zeros", "text", "json", "magic", "length_then_random",
                   "empty_header", "header_only", "many_tensors"])
    if kind == "random":
        size = c.pick([r.randint(1, 7), r.randint(8, 64), r.randint(64, 4096)])
        return bytes(r.randrange(256) for _ in range(size)), f"{kind}: {size} bytes"
    if kind == "empty":
        return b"", "empty file"
    if kind == "zeros":
        size = r.randint(1, 1024)
        return bytes(size), f"{kind}: {size} zero bytes"
    if kind == "text":
        return b"hello, this is not an adapter\n" * r.randint(1, 10), "text"
    if kind == "json":
        return json.dumps({"prompt_embeds": [[0.1] * 4]}).encode(), "a JSON file"
    if kind == "magic":
        magic = c.pick([b"\x89PNG\r\n\x1a\n", b"PK\x03\x04", b"GGUF", b"\x08\x07\x12\x04onnx", b"\x93NUMPY",
                        b"\x89HDF\r\n\x1a\n", b"\x7fELF"])
        return magic + bytes(r.randrange(256) for _ in range(r.randint(0, 256))), f"{kind}: {magic[:8]!r}"
    if kind == "length_then_random":
        body = bytes(r.randrange(256) for _ in range(r.randint(0, 512)))
        return struct.pack("<Q", len(body)) + body, f"{kind}: a right length over {len(body)} random bytes"
    if kind == "many_tensors":  # a valid file of many one-value tensors, under the seed's metadata
        count = c.pick([1000, 5000, 20_000, 100_000, 150_000])  # 150,000: an 11 MB header
        meta, _ = st_entries(raw)
        names = [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(count)]
        header = {"__metadata__": meta} if meta else {}
        header.update({n: {"dtype": "F32", "shape": [1, 1, 1], "data_offsets": [4 * i, 4 * i + 4]}
                       for i, n in enumerate(names)})
        return st_pack(header, bytes(4 * count)), f"{kind}: {count:,} tensors of one value"
    if kind == "empty_header":
        return st_pack(c.pick([b"{}", b"{}" + b" " * 6])), f"{kind}: a valid safetensors file with nothing in it"
    meta, _ = st_entries(raw)  # header_only: the seed's metadata, and no tensors
    return st_pack({"__metadata__": meta} if meta else {}), f"{kind}: metadata and no tensors"


def mut_metadata(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r, man = c.r, c.seeds.manifest
    tensors, meta = st_decode(raw)
    meta = dict(meta or {})
    n = int(meta.get("n_virtual", "1"))
    kind = c.pick(["kind", "kind", "n_virtual", "n_virtual", "fingerprint", "format_version", "format", "missing",
                   "none", "dtype", "name", "peft_type", "extra", "non_string", "prompt_format"])
    if kind == "non_string":  # only reachable by writing the header by hand
        header, data = st_parse(raw)
        key = c.pick(sorted(header.get("__metadata__") or {"kind": ""}))
        header.setdefault("__metadata__", {})[key] = value = c.pick(META_VALUE_WRONG)
        return st_pack(header, data), f"{kind}: {key} = {json.dumps(value)}"
    if kind == "missing":
        gone = r.sample(sorted(meta), r.randint(1, min(3, len(meta))))
        for k in gone:
            del meta[k]
        desc = f"without {', '.join(gone)}"
    elif kind == "none":
        meta, desc = None, "no metadata at all"
    else:
        key = {"extra": f"x-{r.randrange(100)}"}.get(kind, kind)
        if kind == "kind":
            value = c.pick([{"prompt": "prefix", "prefix": "prompt"}.get(meta.get("kind"), "prompt"), "Prompt", "",
                            "lora", "prompt ", "prefix\x00", "PREFIX"])
        elif kind == "n_virtual":
            value = c.pick([str(n + 1), str(n - 1), "0", "-1", "", "abc", f"{n}.0", f" {n}", f"{n}\n", "٧", "²",
                            "1e3", str(10**30), "9" * 5000, "1" * 4000, f"0x{n}", f"+{n}", f"{n}_0", str(2**63)])
        elif kind == "fingerprint":
            value = c.pick(["sha256:" + "%064x" % r.getrandbits(256), "", man.fingerprint[:19],
                            man.fingerprint.upper(), man.fingerprint + " ", "%064x" % r.getrandbits(256)])
        elif kind == "format_version":
            value = c.pick(["0", "2", "1.0", "", "01", " 1", "999999999999999999999", "v1"])
        elif kind == "format":
            value = c.pick(["", "prefixport-adapter2", "pt", "PREFIXPORT-ADAPTER", "np"])
        elif kind == "dtype":
            value = c.pick(["float16" if meta.get("dtype") == "float32" else "float32", "bfloat16", "float64", "",
                            "F32", "int8"])
        elif kind == "name":
            value = c.pick(["", "x" * 10_000, "../../etc/passwd", "a/b", "nul\x00name", "émoji 🙂", " "])
        elif kind == "peft_type":
            value = c.pick(["LORA", "", "PREFIX_TUNING", "PROMPT_TUNING", "x" * 1000])
        elif kind == "prompt_format":
            value = c.pick(["raw", "chat", "Q: {prompt}\nA:", "", "RAW", "{prompt", "prompt}", "{x}", "{}", "{0}",
                            "{prompt}{prompt}", "{{prompt}}", "{{{prompt}}}", "}{prompt}", "{prompt!r}",
                            "{prompt:>9}", "{prompt.x}", "{prompt[0]}", "x" * 5000 + "{prompt}", "{prompt\x00}"])
        else:
            value = c.pick(["", "1", "x" * 1000])
        meta[key] = value
        desc = f"{key} = {value[:40]!r}{'...' if len(value) > 40 else ''}"
    return st_encode(tensors, meta), f"{kind}: {desc}"


def mut_tensors(c: Ctx, raw: bytes) -> tuple[bytes, str]:
    r, man = c.r, c.seeds.manifest
    tensors, meta = st_decode(raw)
    meta = dict(meta or {})
    names = sorted(tensors)
    name = c.pick(names)
    kind = c.pick(["drop", "extra", "rename", "other_kind", "n_virtual_consistent", "n_virtual_tensors_only",
                   "batch_dim", "transpose", "float16", "float64", "int8", "bool", "mixed_dtype", "scalar", "empty",
                   "fewer_layers", "more_layers", "kv_heads", "head_dim", "zero_virtual", "big_virtual"])
    desc = kind
    if kind == "drop":
        del tensors[name]
        desc += f": without {name}"
    elif kind == "extra":
        extra = c.pick(["prompt_embeddings", "past_key_values.99.key", "extra", "prompt_embeds",
                        "past_key_values.0.key"])
        tensors[extra] = c.g.standard_normal(c.pick([(3,), (1, man.hidden_size), tensors[name].shape])).astype(
            tensors[name].dtype)
        desc += f": plus {extra}"
    elif kind == "rename":
        new = c.pick(["prompt_embeddings", "Prompt_embeds", name + " ", name.replace(".key", ".k"),
                      "past_key_values.9.key", "base_model." + name, ""])
        tensors[new] = tensors.pop(name)
        desc += f": {name} -> {new!r}"
    elif kind == "other_kind":  # another seed's tensors under this metadata
        others = [k for k, v in c.seeds.bundles.items() if st_parse(v)[0].get("__metadata__", {}).get("kind")
                  != meta.get("kind")]
        if others:
            other = c.pick(sorted(others))
            tensors = st_decode(c.seeds.bundles[other])[0]
            desc += f": tensors of {other} under {meta.get('kind')} metadata"
    elif kind in ("n_virtual_consistent", "n_virtual_tensors_only", "zero_virtual", "big_virtual"):
        axis = 0 if meta.get("kind") == "prompt" else 1
        new_n = {"zero_virtual": 0, "big_virtual": c.pick([512, 4096])}.get(kind, r.randint(1, 12))
        tensors = {k: np.resize(np.moveaxis(v, axis, 0), (new_n, *np.moveaxis(v, axis, 0).shape[1:])) for k, v in
                   tensors.items()}
        tensors = {k: np.ascontiguousarray(np.moveaxis(v, 0, axis)) for k, v in tensors.items()}
        if kind != "n_virtual_tensors_only":
            meta["n_virtual"] = str(new_n)
        desc += f": {new_n} virtual tokens (metadata says {meta.get('n_virtual')})"
    elif kind == "batch_dim":
        tensors[name] = tensors[name][None]
        desc += f": {name} with a leading batch dimension"
    elif kind == "transpose":
        tensors[name] = np.ascontiguousarray(tensors[name].T)
        desc += f": {name} transposed"
    elif kind in ("float16", "float64", "int8", "bool"):
        dt = {"float16": np.float16, "float64": np.float64, "int8": np.int8, "bool": np.bool_}[kind]
        with np.errstate(all="ignore"):
            tensors = {k: v.astype(dt) for k, v in tensors.items()}
        if r.random() < 0.7:
            meta["dtype"] = np.dtype(dt).name
        desc += f": all tensors {np.dtype(dt).name} (metadata dtype {meta.get('dtype')})"
    elif kind == "mixed_dtype":
        tensors[name] = tensors[name].astype(np.float16 if tensors[name].dtype == np.float32 else np.float32)
        desc += f": {name} alone as {tensors[name].dtype}"
    elif kind == "scalar":
        tensors[name] = np.array(1.5, dtype=tensors[name].dtype)
        desc += f": {name} a 0-d tensor"
    elif kind == "empty":
        tensors[name] = np.zeros((0,) * tensors[name].ndim, dtype=tensors[name].dtype)
        desc += f": {name} empty"
    elif kind in ("fewer_layers", "more_layers"):
        layers = man.num_layers + (-1 if kind == "fewer_layers" else 1)
        template = tensors[name]
        tensors = {n: template.copy() for n in mf.past_names(max(layers, 1))}
        meta["kind"] = "prefix"
        meta["n_virtual"] = str(template.shape[1] if template.ndim == 3 else template.shape[0])
        desc += f": a prefix of {layers} layers"
    elif kind == "kv_heads" or kind == "head_dim":
        t = tensors[name]
        shape = list(t.shape)
        shape[0 if kind == "kv_heads" else -1] += c.pick([-1, 1])
        tensors = {n: np.resize(v, shape).astype(v.dtype) for n, v in tensors.items()} if shape[0] > 0 else tensors
        desc += f": every tensor {shape}"
    return st_encode(tensors, meta), desc


RAW_MUTATORS = {"header_len": mut_header_len, "header_json": mut_header_json, "offsets": mut_offsets,
                "shape": mut_shape, "dtype": mut_dtype, "values": mut_values, "truncate": mut_truncate,
                "byteflip": mut_byteflip, "random": mut_random}


def _bundle_family(mutator: Callable[[Ctx, bytes], tuple[bytes, str]] | None):
    def make(c: Ctx, case: Case) -> None:
        seed = c.pick(sorted(c.seeds.bundles))
        raw = c.seeds.bundles[seed]
        blob, desc = mutator(c, raw) if mutator else (raw, "unchanged")
        path = c.dir / BUNDLE
        path.write_bytes(blob)
        case.target, case.path, case.desc = "bundle", str(path), f"{seed}: {desc}"
        case.kind = desc.split(":", 1)[0]
        case.manifest = mutator is None or c.r.random() >= 0.15
    return make


def fam_bundle_pickle(c: Ctx, case: Case) -> None:
    blob, how = pickle_blob(c.marker, c.r)
    name = c.pick(["adapter.safetensors", "adapter.safetensors", "adapter.bin", "adapter.pt", "adapter.pth",
                   "adapter.pkl", "adapter", "adapter.ckpt", "adapter_model.safetensors"])
    path = c.dir / name
    path.write_bytes(blob)
    case.target, case.path, case.desc = "bundle", str(path), f"pickle: {how} named {name}"
    case.kind = "zip" if how.startswith("torch") else "pickle"
    case.manifest = c.r.random() >= 0.15


# --- PEFT checkpoint cases -----------------------------------------------------------------------

def _peft_seed(c: Ctx) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    variant = c.pick(sorted(c.seeds.peft))
    files = dict(c.seeds.peft[variant])
    return variant, files, json.loads(files[CONFIG])


def _write_peft(c: Ctx, files: dict[str, bytes]) -> Path:
    folder = c.dir / "checkpoint"
    folder.mkdir()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def _task_for(c: Ctx, config: dict[str, Any]) -> int | None:
    if config.get("peft_type") == "MULTITASK_PROMPT_TUNING":
        tasks = config.get("num_tasks")  # the seed's, or a mutated value
        tasks = tasks if isinstance(tasks, int) and not isinstance(tasks, bool) and 0 <= tasks < 10**6 else 3
        return c.pick([None, 0, 1, 2, 1, tasks, -1, 10**9])
    return c.pick([None] * 9 + [0])


def fam_peft_valid(c: Ctx, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: unchanged, task {task}", "unchanged"
    ref = c.seeds.references.get(variant)
    if ref and ref[1] == task:
        case.reference = ref[0]


CONFIG_FIELDS = ["peft_type", "num_virtual_tokens", "num_virtual_tokens", "token_dim", "token_dim", "num_layers",
                 "num_layers", "num_transformer_submodules", "num_tasks", "num_ranks", "base_model_name_or_path",
                 "task_type", "num_attention_heads", "prefix_projection", "encoder_hidden_size"]
WRONG_VALUES = ["7", "abc", "", 7.5, 7.0, True, False, None, [], {}, [7], -1, 0, 10**12, 2**63, -2**63, 2**64 + 1,
                1e308, "PROMPT_TUNING", "\x00", "٧", 6.0000001]


def fam_peft_config(c: Ctx, case: Case) -> None:
    r = c.r
    variant, files, config = _peft_seed(c)
    text = json.dumps(config, indent=2)
    kind = c.pick(["invalid_json", "encoding", "not_object", "deep", "literal", "literal", "missing", "missing",
                   "wrong_type", "wrong_type", "wrong_type", "unknown_type", "swapped_type", "lying_n", "lying_n",
                   "lying_dims", "lying_tasks", "duplicate", "extra", "huge"])
    blob: bytes | None = None
    fld = c.pick(CONFIG_FIELDS)
    if kind == "invalid_json":
        how = c.pick(["cut", "equals", "trailing_comma", "single_quotes", "python_repr", "garbage", "brace", "comment"])
        blob = {"cut": text[:r.randrange(len(text))], "equals": text.replace(":", "=", 1),
                "trailing_comma": text[:-2] + ",\n}", "single_quotes": text.replace('"', "'"),
                "python_repr": repr(config), "garbage": text + " garbage", "brace": "{",
                "comment": "// a comment\n" + text}[how].encode()
        desc = f"{kind}: {how}"
    elif kind == "encoding":
        how = c.pick(["ff_byte", "latin1", "utf16", "utf8_bom", "nul"])
        if how == "ff_byte":
            pos = r.randrange(len(text))
            blob = text[:pos].encode() + b"\xff" + text[pos:].encode()
        elif how == "latin1":
            blob = json.dumps({**config, "base_model_name_or_path": "modèle"}, ensure_ascii=False).encode("latin-1")
        elif how == "utf16":
            blob = text.encode("utf-16")
        elif how == "utf8_bom":
            blob = b"\xef\xbb\xbf" + text.encode()
        else:
            blob = text.encode().replace(b",", b"\x00,", 1)
        desc = f"{kind}: {how}"
    elif kind == "not_object":
        blob = c.pick([b"[]", b"null", b"42", b'"PROMPT_TUNING"', b"[" + text.encode() + b"]", b"", b"   \n", b"true"])
        desc = f"{kind}: {blob[:20]!r}"
    elif kind == "deep":
        depth = c.pick([1000, 100_000])
        nest = "[" * depth + "]" * depth
        blob = (nest if r.random() < 0.5 else text.replace('"peft_type"', f'"deep": {nest}, "peft_type"', 1)).encode()
        desc = f"{kind}: {depth} nested arrays"
    elif kind == "literal":
        fld = c.pick(["num_virtual_tokens", "token_dim", "num_layers", "num_tasks", "num_ranks"])
        lit = c.pick(["NaN", "Infinity", "-Infinity", "9" * 5000, "9" * 100, "1e400", "-0", "1E2", "7.0"])
        config[fld] = "@@LITERAL@@"
        blob = json.dumps(config).replace('"@@LITERAL@@"', lit).encode()
        desc = f"{kind}: {fld} = {lit[:20]}"
    elif kind == "missing":
        gone = r.sample(sorted(config), r.randint(1, 2)) if r.random() < 0.3 else [fld]
        for k in gone:
            config.pop(k, None)
        desc = f"{kind}: without {', '.join(gone)}"
    elif kind == "wrong_type":
        config[fld] = value = c.pick(WRONG_VALUES)
        desc = f"{kind}: {fld} = {json.dumps(value)[:30]}"
    elif kind == "unknown_type":
        config["peft_type"] = value = c.pick(["LORA", "prompt_tuning", "PROMPT_TUNING ", "", "ADAPTION_PROMPT", "IA3",
                                              "P_TUNING_V2", "BOFT", "prefix_tuning", 7, None, ["PREFIX_TUNING"],
                                              {"x": 1}, "x" * 100_000])
        desc = f"{kind}: peft_type = {json.dumps(value)[:30]}"
    elif kind == "swapped_type":
        config["peft_type"] = value = c.pick(["PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "PREFIX_TUNING"])
        desc = f"{kind}: {variant} checkpoint labelled {value}"
    elif kind == "lying_n":
        n = config.get("num_virtual_tokens", 1)
        config["num_virtual_tokens"] = value = c.pick([n + 1, n - 1, 2 * n, 1, 0, -n, 10**9, n * 2**20, 2**62])
        desc = f"{kind}: num_virtual_tokens {value} (true {n})"
    elif kind == "lying_dims":
        fld = c.pick(["token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"])
        true = config.get(fld)
        config[fld] = value = c.pick([(true or 1) + 1, (true or 2) - 1, 0, 2, (true or 1) * 2, 10**6])
        desc = f"{kind}: {fld} {value} (true {true})"
    elif kind == "lying_tasks":
        fld = c.pick(["num_tasks", "num_ranks"])
        true = config.get(fld)
        config[fld] = value = c.pick([1, 2, 4, 0, -1, 10**6, None])
        desc = f"{kind}: {fld} {value} (true {true})"
    elif kind == "duplicate":
        fld = c.pick(["num_virtual_tokens", "peft_type", "token_dim", "num_layers"])
        value = c.pick([99, 1, "LORA", "PREFIX_TUNING", None])
        dup = f'"{fld}": {json.dumps(value)}'
        blob = (("{" + dup + "," + text[1:]) if r.random() < 0.5 else (text[:-2] + ",\n" + dup + "\n}")).encode()
        desc = f"{kind}: {fld} twice, once {json.dumps(value)}"
    elif kind == "extra":
        config[c.pick(["x_unknown", "modules_to_save", "inference_mode", "revision"])] = c.pick([None, [1, {"a": []}],
                                                                                               "x", 3])
        desc = f"{kind}: an unknown field"
    else:  # huge
        how = c.pick(["whitespace", "field"])
        blob = (text[:-1] + " " * 5_000_000 + "}").encode() if how == "whitespace" else None
        if how == "field":
            config["base_model_name_or_path"] = "m" * 5_000_000
        desc = f"{kind}: 5 MB of {how}"
    files[CONFIG] = blob if blob is not None else json.dumps(config, indent=2).encode()
    task = _task_for(c, config if isinstance(config, dict) else {})
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: {desc}, task {task}", kind


def fam_peft_weights_raw(c: Ctx, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    mname = c.pick(sorted(RAW_MUTATORS))
    files[WEIGHTS], desc = RAW_MUTATORS[mname](c, files[WEIGHTS])
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: weights {mname}: {desc}, task {task}", mname


def fam_peft_weights(c: Ctx, case: Case) -> None:
    r = c.r
    variant, files, config = _peft_seed(c)
    tensors, meta = st_decode(files[WEIGHTS])
    name = c.pick(sorted(tensors))
    t = tensors[name]
    kind = c.pick(["rename", "drop", "extra", "reshape", "transpose", "batch_dim", "float16", "float64", "int32",
                   "bfloat16", "consistent_n", "factor_shapes", "empty"])
    if kind == "rename":
        new = c.pick(["base_model.prompt_embeddings", "prompt_embeddings.weight", "embedding.weight", "",
                      "prompt_embeds", name.upper()])
        tensors[new] = tensors.pop(name)
        desc = f"{name} -> {new!r}"
    elif kind == "drop":
        del tensors[name]
        desc = f"without {name}"
    elif kind == "extra":
        tensors["prompt_encoder.default.embedding.weight"] = c.g.standard_normal((3, 4)).astype(np.float32)
        desc = "an extra tensor"
    elif kind == "reshape":
        shape = list(t.shape)
        shape[r.randrange(len(shape))] += c.pick([-1, 1, 3])
        tensors[name] = np.resize(t, [max(s, 0) for s in shape])
        desc = f"{name} {shape}"
    elif kind == "transpose":
        tensors[name] = np.ascontiguousarray(t.T)
        desc = f"{name} transposed"
    elif kind == "batch_dim":
        tensors[name] = t[None]
        desc = f"{name} with a batch dimension"
    elif kind in ("float16", "float64", "int32"):
        with np.errstate(all="ignore"):
            tensors[name] = t.astype(kind)
        desc = f"{name} as {kind}"
    elif kind == "bfloat16":
        meta_, entries = st_entries(files[WEIGHTS])
        entries = [(n, {**i, "dtype": "BF16"}, (np.frombuffer(b, np.float32).view(np.uint32) >> 16).astype(np.uint16)
                    .tobytes()) if n == name else (n, i, b) for n, i, b in entries]
        files[WEIGHTS] = st_join(meta_, entries)
        tensors = None
        desc = f"{name} as bfloat16"
    elif kind == "consistent_n":  # n_virtual changed in the config and the tensors alike: acceptable
        new_n = r.randint(1, 12)
        pe = tensors["prompt_embeddings"]
        tensors["prompt_embeddings"] = np.resize(pe, (new_n, pe.shape[1]))
        if "prefix_task_cols" in tensors:
            cols = tensors["prefix_task_cols"]
            tensors["prefix_task_cols"] = np.resize(cols, (cols.shape[0], new_n, cols.shape[2]))
        config["num_virtual_tokens"] = new_n
        files[CONFIG] = json.dumps(config).encode()
        desc = f"{new_n} virtual tokens in config and weights"
    elif kind == "factor_shapes" and "prefix_task_rows" in tensors:
        which = c.pick(["prefix_task_cols", "prefix_task_rows"])
        tensors[which] = tensors[which][:, :, :-1].copy() if r.random() < 0.5 else tensors[which][:-1].copy()
        desc = f"{which} {list(tensors[which].shape)}"
    else:
        tensors[name] = np.zeros((0,) * t.ndim, t.dtype)
        desc = f"{name} empty"
    if tensors is not None:
        files[WEIGHTS] = st_encode(tensors, meta)
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: {kind}: {desc}, task {task}", kind


def fam_peft_pickle(c: Ctx, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    blob, how = pickle_blob(c.marker, c.r)
    kind = c.pick(["instead", "instead", "named_safetensors", "beside", "named_config", "unlisted_name"])
    if kind == "instead":
        del files[WEIGHTS]
        name = c.pick(PICKLE_NAMES)
    elif kind == "named_safetensors":
        name = WEIGHTS
    elif kind == "beside":
        name = c.pick(PICKLE_NAMES)
    elif kind == "named_config":
        name = CONFIG
    else:
        del files[WEIGHTS]
        name = c.pick(["adapter_model.ckpt", "model.pkl", "pytorch_model.pt", "training_args.bin", "optimizer.pt"])
    files[name] = blob
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: pickle ({how}) {kind} as {name}, task {task}", kind


def fam_peft_layout(c: Ctx, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    kind = c.pick(["no_config", "config_dir", "weights_dir", "config_devzero", "weights_devzero", "config_fifo",
                   "weights_fifo", "dangling_config", "dangling_weights", "empty_folder", "folder_is_file",
                   "no_folder", "no_weights", "weights_symlink_ok"])
    folder = c.dir / "checkpoint"
    path = folder
    if kind == "folder_is_file":
        c.dir.joinpath("checkpoint").write_bytes(files[CONFIG])
    elif kind == "no_folder":
        pass
    elif kind == "empty_folder":
        folder.mkdir()
    else:
        target = CONFIG if "config" in kind else WEIGHTS
        keep = {k: v for k, v in files.items() if k != target}
        folder = _write_peft(c, keep)
        p = folder / target
        if kind.endswith("_dir"):
            p.mkdir()
        elif kind.endswith("_devzero"):
            p.symlink_to("/dev/zero")
        elif kind.endswith("_fifo"):
            os.mkfifo(p)
        elif kind.startswith("dangling"):
            p.symlink_to(c.dir / "nowhere")
        elif kind == "weights_symlink_ok":
            real = c.dir / "elsewhere.safetensors"
            real.write_bytes(files[WEIGHTS])
            p.symlink_to(real)
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(path), task
    case.desc, case.kind = f"{variant}: {kind}, task {task}", kind


FAMILIES: dict[str, tuple[int, Callable[[Ctx, Case], None], str]] = {  # name -> (weight, maker, what)
    "bundle_valid": (1, _bundle_family(None), "seed bundles unchanged"),
    "bundle_header_len": (3, _bundle_family(mut_header_len), "header length field lies"),
    "bundle_header_json": (4, _bundle_family(mut_header_json), "header JSON malformed, wrong types, duplicates"),
    "bundle_offsets": (3, _bundle_family(mut_offsets), "data_offsets out of range, overlapping, inverted"),
    "bundle_shape": (3, _bundle_family(mut_shape), "declared shapes huge or wrong"),
    "bundle_dtype": (3, _bundle_family(mut_dtype), "dtypes wrong or unsupported"),
    "bundle_values": (2, _bundle_family(mut_values), "NaN, Inf, extremes"),
    "bundle_truncate": (2, _bundle_family(mut_truncate), "truncated or padded files"),
    "bundle_metadata": (4, _bundle_family(mut_metadata), "metadata lies (kind, n_virtual, base, version, ...)"),
    "bundle_tensors": (4, _bundle_family(mut_tensors), "tensors disagree with metadata or export"),
    "bundle_random": (2, _bundle_family(mut_random), "random bytes, empty, other formats"),
    "bundle_byteflip": (4, _bundle_family(mut_byteflip), "random byte edits"),
    "bundle_pickle": (2, fam_bundle_pickle, "a pickle under any name"),
    "peft_valid": (1, fam_peft_valid, "seed checkpoints unchanged"),
    "peft_config": (6, fam_peft_config, "adapter_config.json malformed or lying"),
    "peft_weights_raw": (4, fam_peft_weights_raw, "weights file mutated as the bundle families"),
    "peft_weights": (3, fam_peft_weights, "weights disagree with the config"),
    "peft_pickle": (2, fam_peft_pickle, "pickles instead of / beside / named as safetensors"),
    "peft_layout": (1, fam_peft_layout, "missing files, dirs, /dev/zero, FIFOs, links"),
}


@functools.lru_cache(maxsize=1)
def schedule() -> tuple[str, ...]:
    """Families interleaved by weight: index i gets schedule()[i % len]."""
    slots = []
    for name, (weight, _, _) in FAMILIES.items():
        slots += [((k + 0.5) / weight, name) for k in range(weight)]
    return tuple(name for _, name in sorted(slots))


def make_case(seed: int, index: int, seeds: Seeds, case_dir: Path, marker: Path) -> Case:
    """Case `index` of run `seed`, its files written into the (empty) `case_dir`."""
    order = schedule()
    family = order[index % len(order)]
    c = Ctx(random.Random(f"{seed}:{index}"), np.random.default_rng([seed, index]), seeds, case_dir, marker)
    case = Case(index, family, "", "", "")
    FAMILIES[family][1](c, case)
    return case


# --- the worker ----------------------------------------------------------------------------------

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
    if meta["format"] != "prefixport-adapter" or meta["format_version"] not in ("1", "2"):
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
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker_main(export: str, memory_gb: float) -> None:
    """Read cases (JSON lines) on stdin, answer results (JSON lines) on the original stdout."""
    import resource

    from prefixport.adapters import bundle as _b  # noqa: F401 - imports done before the cap
    from prefixport.adapters import peft as _p  # noqa: F401

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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONFAULTHANDLER": "1"}
        if hasattr(self, "log_file"):
            self.log_file.close()
        self.log_file = open(self.log, "ab")
        self.log_offset = self.log_file.tell()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(self.export),
             "--memory-gb", str(self.memory_gb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, env=env, start_new_session=True)
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
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
        if hasattr(self, "log_file"):
            self.log_file.close()


# --- the run ---------------------------------------------------------------------------------------

def _normalize(message: str, case_dir: Path) -> str:
    message = message.replace(str(case_dir), "CASE")
    message = re.sub(r"\d+", "N", message)
    return message[:160]


def run_fuzz(seeds: Seeds, cases: int, seed: int = 0, timeout: float = 5.0, memory_gb: float = 3.0,
             work: Path | None = None, reproducers: Path | None = None,
             say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run `cases` cases; the counts, figures and failures as a dict (see the module docstring)."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="fuzz-adapters-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "PICKLE-WAS-EXECUTED"
    marker.unlink(missing_ok=True)
    payload_ok = check_payload(work)
    harness = selftest(seeds.export, memory_gb, work / "selftest.log")
    case_dir = work / "case"
    worker = Worker(seeds.export, memory_gb, work / "worker.log")
    families: dict[str, dict[str, Any]] = {
        name: {"what": what, "cases": 0, **{o: 0 for o in OUTCOMES}, "slowest_s": 0.0, "slowest": None,
               "kinds": Counter(), "messages": Counter()} for name, (_, _, what) in FAMILIES.items()}
    failures: list[dict[str, Any]] = []
    peak_kb, peak_case, pickle_cases, marker_cases = 0, None, 0, []
    began = time.perf_counter()
    last_say = began
    try:
        worker.start()
        baseline_kb = worker.ready_rss_kb
        for index in range(cases):
            if case_dir.exists():
                shutil.rmtree(case_dir)
            case_dir.mkdir()
            case = make_case(seed, index, seeds, case_dir, marker)
            fam = families[case.family]
            pickle_cases += case.family.endswith("_pickle")
            res = worker.run(case, timeout)
            if res is None:
                res = {"outcome": "hang", "seconds": timeout, "message": f"no answer within {timeout} s"}
            outcome = res["outcome"]
            fam["cases"] += 1
            fam[outcome] += 1
            fam["kinds"][(case.kind, outcome)] += 1
            if res.get("seconds") and res["seconds"] > fam["slowest_s"]:
                fam["slowest_s"], fam["slowest"] = res["seconds"], f"{seed}:{index} {case.desc}"[:200]
            if outcome == "error":
                fam["messages"][_normalize(res["message"], case_dir)] += 1
            if res.get("rss_kb", 0) > peak_kb:
                peak_kb, peak_case = res["rss_kb"], f"{seed}:{index} {case.family} {case.desc}"[:200]
            if marker.exists():
                marker_cases.append(f"{seed}:{index} {case.desc}")
                marker.unlink()
            if outcome in FAILURES:
                failure = {"case": f"{seed}:{index}", "family": case.family, "desc": case.desc,
                           "target": case.target, "manifest": case.manifest, "task": case.task, "outcome": outcome,
                           **{k: res.get(k) for k in ("error_type", "message", "problems", "traceback")}}
                failures.append(failure)
                if reproducers is not None and len(failures) <= KEEP_REPRODUCERS:
                    dest = reproducers / f"{index:06d}-{case.family}"
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(case_dir, dest, symlinks=True,
                                    ignore=lambda d, names: [n for n in names if Path(d, n).is_fifo()])
                    (dest / "case.json").write_text(json.dumps(failure, indent=2) + "\n")
                if outcome == "memory":
                    worker.kill()  # a fresh worker for the next case
            if time.perf_counter() - last_say > 15:
                last_say = time.perf_counter()
                say(f"  {index + 1}/{cases} cases, {sum(f['error'] for f in families.values())} errors, "
                    f"{len(failures)} failures ({last_say - began:.0f} s)")
    finally:
        worker.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    totals = {o: sum(f[o] for f in families.values()) for o in ("cases", *OUTCOMES)}
    slowest = max(families.values(), key=lambda f: f["slowest_s"])
    for f in families.values():
        kinds: dict[str, dict[str, int]] = {}
        for (kind, outcome), count in sorted(f["kinds"].items()):
            kinds.setdefault(kind, {})[outcome] = count
        f["kinds"] = kinds  # sub-kind of mutation -> outcome -> cases
        f["messages"] = [{"count": n, "message": m} for m, n in f["messages"].most_common(5)]
    return {
        "cases": cases, "seed": seed, "timeout_s": timeout, "memory_cap_gb": memory_gb,
        "families": families, "totals": totals, "failures": failures,
        "slowest_case": {"seconds": slowest["slowest_s"], "case": slowest["slowest"]},
        "worker": {"peak_rss_mb": peak_kb / 1024, "after_start_rss_mb": baseline_kb / 1024,
                   "rss_note": "VmHWM: the peak of a case, reset before each case (Linux clear_refs)",
                   "peak_case": peak_case, "starts": worker.starts},
        "harness_selftest": harness,
        "pickle": {"cases_with_a_payload": pickle_cases, "payload_fires_when_unpickled": payload_ok,
                   "marker_written": bool(marker_cases), "marker_cases": marker_cases},
        "seeds": {"bundles": sorted(seeds.bundles), "peft": sorted(seeds.peft),
                  "references": {k: Path(v[0]).name for k, v in seeds.references.items()}},
        "manifest": {k: getattr(seeds.manifest, k) for k in ("architecture", "num_layers", "num_kv_heads", "head_dim",
                                                              "hidden_size", "dtype")},
        "seconds_fuzzing": time.perf_counter() - began,
    }


def markdown(result: dict[str, Any]) -> str:
    m, t, w, p = result["machine"], result["totals"], result["worker"], result["pickle"]
    man = result["manifest"]
    lines = [
        f"# Fuzzing the adapter readers: {t['cases']:,} cases", "",
        f"Mutations of real seeds ({len(result['seeds']['bundles'])} bundles, {len(result['seeds']['peft'])} PEFT "
        f"checkpoints of a tiny {man['architecture']} export: {man['num_layers']} layers, {man['num_kv_heads']} KV "
        f"heads, head dim {man['head_dim']}, hidden {man['hidden_size']}) fed to `load_bundle(path, manifest)` and "
        f"`convert(dir, manifest)`, each case in a worker process capped at {result['memory_cap_gb']:g} GiB of "
        f"address space (RLIMIT_AS) with a {result['timeout_s']:g} s watchdog. ok: accepted, then checked "
        "independently (metadata, shapes of the kind and the export, finite, round trip, a converted seed equals its "
        "bundle); error: a PrefixportError with a message; crash: any other exception or an empty message; "
        "bad accept: accepted but failing those checks. A case is named seed:index: `--replay seed:index` rebuilds it "
        "from the same seeds (a failing case's files are also kept under reproducers/).", "",
        "| family | what | cases | ok | error | crash | hang | memory | bad accept | slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in result["families"].items():
        lines.append(f"| {name} | {f['what']} | {f['cases']} | {f['ok']} | {f['error']} | {f['crash']} | {f['hang']} | "
                     f"{f['memory']} | {f['bad_accept']} | {1000 * f['slowest_s']:.1f} |")
    lines.append(f"| **all** | | **{t['cases']}** | **{t['ok']}** | **{t['error']}** | **{t['crash']}** | "
                 f"**{t['hang']}** | **{t['memory']}** | **{t['bad_accept']}** | "
                 f"{1000 * result['slowest_case']['seconds']:.1f} |")
    lines += ["", f"Pickles: {p['cases_with_a_payload']} cases carried a pickle whose unpickling writes a marker file "
              f"(the payload fires under pickle.loads: {'yes' if p['payload_fires_when_unpickled'] else 'NO'}); "
              f"marker written: {'**yes**, ' + ', '.join(p['marker_cases'][:5]) if p['marker_written'] else 'never'}.",
              f"Worker: peak RSS {w['peak_rss_mb']:.0f} MB ({w['after_start_rss_mb']:.0f} MB after start-up), "
              f"{w['starts']} start(s). Harness self-test (a non-project exception, an empty message, a 1 TiB "
              f"allocation, an abort, a hang, each caused on purpose in a worker): "
              f"{'all classified right' if result['harness_selftest']['ok'] else result['harness_selftest']['seen']}. "
              f"Slowest case: {1000 * result['slowest_case']['seconds']:.1f} ms "
              f"({result['slowest_case']['case']})."]
    if result["failures"]:
        lines += ["", f"**{len(result['failures'])} failures** (reproducers under `reproducers/`):", ""]
        lines += [f"- `{f['case']}` {f['family']} {f['outcome']}: {f['desc']} -> {f.get('error_type')}: "
                  f"{(f.get('message') or '; '.join(f.get('problems') or []))[:200]}" for f in result["failures"][:30]]
    else:
        lines += ["", "No crash, hang, memory blow-up or bad accept."]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; Python {m['python']}, "
              f"numpy {m['versions'].get('numpy')}, safetensors {result['safetensors']}, "
              f"prefixport {m['versions'].get('prefixport')}.", "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all, "
              f"{result['seconds_fuzzing']:.0f} s fuzzing)", ""]
    # a message may quote a tensor name with a lone surrogate: keep the text writable
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


def replay(spec: str, seeds: Seeds) -> None:
    seed, index = (int(x) for x in spec.split(":"))
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-") as tmp:
        case_dir = Path(tmp) / "case"
        case_dir.mkdir()
        marker = Path(tmp) / "PICKLE-WAS-EXECUTED"
        case = make_case(seed, index, seeds, case_dir, marker)
        print(f"case {spec}: {case.family}: {case.desc} ({case.target} {case.path}, manifest {case.manifest}, "
              f"task {case.task})")
        out = run_one(asdict(case), seeds.manifest)
        print(json.dumps({k: v for k, v in out.items() if k != "traceback"}, indent=2))
        if out.get("traceback"):
            print(out["traceback"])
        print(f"pickle marker written: {marker.exists()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=FULL_RUN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="the worker's address-space cap (0: none)")
    parser.add_argument("--export", type=Path, help="an export folder (with --seeds)")
    parser.add_argument("--seeds", type=Path, help="seed bundles *.safetensors and PEFT checkpoints peft/<variant>/")
    parser.add_argument("--work", type=Path, help="build the seeds here and keep them (reused when present)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_adapters")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="rebuild one case and run it in this process")
    parser.add_argument("--worker", metavar="EXPORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.memory_gb)
        return
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    began = time.perf_counter()
    tmp = None
    if (args.export is None) != (args.seeds is None):
        parser.error("--export and --seeds go together")
    if args.export is not None:
        export, seeds_dir = args.export, args.seeds
    else:
        work = args.work or Path(tmp := tempfile.mkdtemp(prefix="fuzz-seeds-"))
        export, seeds_dir = build_seeds(work, say=say)
    try:
        seeds = load_seeds(export, seeds_dir)
        if args.replay:
            replay(args.replay, seeds)
            return
        stem = "fuzz_adapters" + ("" if args.cases >= FULL_RUN else "_short")
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        repro = out / "reproducers" if stem == "fuzz_adapters" else out / "reproducers_short"
        shutil.rmtree(repro, ignore_errors=True)
        say(f"fuzzing: {args.cases} cases, seed {args.seed}, seeds from {seeds_dir} ...")
        result = run_fuzz(seeds, args.cases, args.seed, args.timeout, args.memory_gb, reproducers=repro, say=say)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    from importlib import metadata

    from prefixport.bench.machine import describe

    if not result["failures"]:
        shutil.rmtree(repro, ignore_errors=True)
    result = {"benchmark": "fuzz_adapters",
              "command": ("python benchmarks/fuzz_adapters.py " + shlex.join(sys.argv[1:])).strip(),
              **result, "safetensors": metadata.version("safetensors"), "machine": describe(),
              "seconds": time.perf_counter() - began}
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    md_path.write_text(table)
    print(table)
    t = result["totals"]
    print(json.dumps({"benchmark": "fuzz_adapters", "cases": t["cases"], "seed": args.seed,
                      "seconds": round(result["seconds"], 1), **{o: t[o] for o in OUTCOMES},
                      "pickle_marker_written": result["pickle"]["marker_written"],
                      "peak_rss_mb": round(result["worker"]["peak_rss_mb"]),
                      "slowest_case_ms": round(1000 * result["slowest_case"]["seconds"], 1),
                      "wrote": [str(json_path), str(md_path)]}))


if __name__ == "__main__":
    main()
