"""The fuzzer's cases (benchmarks/fuzz_adapters.py runs them): mutations of real seeds, the bundles
and PEFT checkpoints of a tiny export, written into a case folder.

Case i of seed S is made from `random.Random(f"{S}:{i}")` (and numpy's `default_rng([S, i])`)
alone: `make_case(S, i, ...)` rebuilds it (the same files, but for the order of the metadata the
safetensors library writes and a zip's timestamps). Its family is fixed by i (a weighted round
robin, `schedule`), so every family gets cases in a short run too. The families:

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

Also here: the seeds (`load_seeds`: a folder of bundles with the PEFT checkpoints they came from
under peft/<variant>/), a safetensors byte codec (st_*: headers the safetensors library would not
write), and a pickle whose unpickling writes a marker file (`check_payload` proves it fires).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import random
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from benchmarks.common import interleaved
from prefixport import manifest as mf

BUNDLE = "adapter.safetensors"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# --- seeds ---------------------------------------------------------------------------------------

@dataclass
class Seeds:
    """What the cases are made from: an export, its seed bundles and PEFT checkpoints (bytes)."""

    export: Path
    seeds_dir: Path
    manifest: mf.Manifest
    bundles: dict[str, bytes]  # name -> file bytes
    peft: dict[str, dict[str, bytes]]  # variant -> {file name: bytes} (top-level regular files)
    references: dict[str, tuple[str, int | None]]  # variant -> (bundle file, task) of its conversion


def load_seeds(export: Path, seeds_dir: Path) -> Seeds:
    """The seeds in `seeds_dir` for `export`: bundles *.safetensors, PEFT checkpoints under
    peft/<variant>/; a bundle named <variant>.safetensors or <variant>-task<T>.safetensors is the
    expected conversion of that checkpoint. Paths are made absolute (the worker runs elsewhere)."""
    export, seeds_dir = Path(export).resolve(), Path(seeds_dir).resolve()
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



# --- safetensors bytes -----------------------------------------------------------------------------

ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
           "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
           "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
ST_NUMPY = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
            "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
            "F64": np.float64, "C64": np.complex64}


def st_parse(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a safetensors file."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_pack(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A file of `header` (a dict, or its text as it is) and `data`; `length`: the length field, if it must lie."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def st_entries(raw: bytes) -> tuple[Any, list[tuple[str, dict[str, Any], bytes]]]:
    """(metadata, [(name, info, data)] in data order) of a well-formed file."""
    header, data = st_parse(raw)
    meta = header.pop("__metadata__", None)
    entries = [(k, dict(v), data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()]
    return meta, sorted(entries, key=lambda e: e[1]["data_offsets"][0])


def st_join(meta: Any, entries: list[tuple[str, dict[str, Any], bytes]], fix_offsets: bool = True) -> bytes:
    """A file of these entries, their data in this order (offsets recomputed unless `fix_offsets` is False)."""
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
    """(tensors, metadata) of a valid file, read by the safetensors library."""
    header, _ = st_parse(raw)
    return {k: v.copy() for k, v in st_load(raw).items()}, header.get("__metadata__")


def st_encode(tensors: dict[str, np.ndarray], meta: dict[str, str] | None) -> bytes:
    """A valid file of `tensors` and `meta`, written by the safetensors library."""
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
    """A pickle (a torch-style zip a quarter of the time) that writes `marker` if loaded; and how it was made."""
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
    """One case: what the worker runs (`load_bundle` on a bundle, `convert` on a PEFT folder) and how
    it was made."""

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
class CaseContext:
    """Where one case draws from and writes to: its random streams, the seeds, its (empty) folder,
    and the marker path its pickles would create."""

    rng: random.Random
    np_rng: np.random.Generator
    seeds: Seeds
    dir: Path
    marker: Path

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        """One of `options`, drawn with `rng`."""
        return options[self.rng.randrange(len(options))]


def _u64(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# Mutators of a safetensors file: mut_X(c, raw) -> (the mutated bytes, "sub-kind: description").

def mut_header_len(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    n, size, r = _u64(raw), len(raw), c.rng
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


def mut_header_json(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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


def mut_offsets(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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


def mut_shape(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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


def mut_dtype(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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
                blob = c.np_rng.integers(0, 256, -(-numel * ST_BITS[dtype] // 8), dtype=np.uint8).tobytes()
        info["dtype"] = dtype
        entries[i] = (name, info, blob)
    if kind == "reencode_all" and isinstance(meta, dict) and "dtype" in meta and r.random() < 0.7:
        meta["dtype"] = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16"}.get(dtype, dtype.lower())
    return st_join(meta, entries), f"{kind}: {'all tensors' if kind == 'reencode_all' else entries[targets[0]][0]} as {dtype}"


SPECIALS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "max32": 3.4e38, "-max32": -3.4e38,
            "subnormal": 1e-45, "-0": -0.0, "max16": 65504.0, "over16": 65520.0, "big": 1e30}


def mut_values(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
    tensors, meta = st_decode(raw)
    name = c.pick(sorted(tensors))
    special = c.pick(list(SPECIALS) + ["nan", "inf", "signalling_nan"])
    half = r.random() < 0.25 and isinstance(meta, dict)
    t = tensors[name].astype(np.float32)
    flat = t.reshape(-1)
    count = c.pick([1, 1, 2, flat.size])
    where = c.np_rng.choice(flat.size, size=min(count, flat.size), replace=False)
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


def mut_truncate(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
    n, size = _u64(raw), len(raw)
    if r.random() < 0.2:
        tail = c.pick([bytes(r.randint(1, 64)), bytes(r.randrange(256) for _ in range(r.randint(1, 64))), raw[8:40]])
        return raw + tail, f"appended: {len(tail)} bytes after the data"
    cut = c.pick([0, r.randint(1, 7), 8, r.randint(9, 8 + n - 1), 8 + n - 1, 8 + n, 8 + n + 1,
                  r.randint(8 + n, size - 1), size - 1, r.randrange(size)])
    where = "length field" if cut < 8 else "header" if cut < 8 + n else "data"
    return raw[:cut], f"cut in the {where}: {cut} of {size} bytes"


def mut_byteflip(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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


def mut_random(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r = c.rng
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


def mut_metadata(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r, man = c.rng, c.seeds.manifest
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


def mut_tensors(c: CaseContext, raw: bytes) -> tuple[bytes, str]:
    r, man = c.rng, c.seeds.manifest
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
        tensors[extra] = c.np_rng.standard_normal(c.pick([(3,), (1, man.hidden_size), tensors[name].shape])).astype(
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


# Families: each writes a case's files into c.dir and fills in the case (target, path, desc, kind, ...).

RAW_MUTATORS = {"header_len": mut_header_len, "header_json": mut_header_json, "offsets": mut_offsets,
                "shape": mut_shape, "dtype": mut_dtype, "values": mut_values, "truncate": mut_truncate,
                "byteflip": mut_byteflip, "random": mut_random}


def _bundle_family(mutator: Callable[[CaseContext, bytes], tuple[bytes, str]] | None):
    def make(c: CaseContext, case: Case) -> None:
        seed = c.pick(sorted(c.seeds.bundles))
        raw = c.seeds.bundles[seed]
        blob, desc = mutator(c, raw) if mutator else (raw, "unchanged")
        path = c.dir / BUNDLE
        path.write_bytes(blob)
        case.target, case.path, case.desc = "bundle", str(path), f"{seed}: {desc}"
        case.kind = desc.split(":", 1)[0]
        case.manifest = mutator is None or c.rng.random() >= 0.15
    return make


def fam_bundle_pickle(c: CaseContext, case: Case) -> None:
    blob, how = pickle_blob(c.marker, c.rng)
    name = c.pick(["adapter.safetensors", "adapter.safetensors", "adapter.bin", "adapter.pt", "adapter.pth",
                   "adapter.pkl", "adapter", "adapter.ckpt", "adapter_model.safetensors"])
    path = c.dir / name
    path.write_bytes(blob)
    case.target, case.path, case.desc = "bundle", str(path), f"pickle: {how} named {name}"
    case.kind = "zip" if how.startswith("torch") else "pickle"
    case.manifest = c.rng.random() >= 0.15


# --- PEFT checkpoint cases -----------------------------------------------------------------------

def _peft_seed(c: CaseContext) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    variant = c.pick(sorted(c.seeds.peft))
    files = dict(c.seeds.peft[variant])
    return variant, files, json.loads(files[CONFIG])


def _write_peft(c: CaseContext, files: dict[str, bytes]) -> Path:
    folder = c.dir / "checkpoint"
    folder.mkdir()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def _task_for(c: CaseContext, config: dict[str, Any]) -> int | None:
    if config.get("peft_type") == "MULTITASK_PROMPT_TUNING":
        tasks = config.get("num_tasks")  # the seed's, or a mutated value
        tasks = tasks if isinstance(tasks, int) and not isinstance(tasks, bool) and 0 <= tasks < 10**6 else 3
        return c.pick([None, 0, 1, 2, 1, tasks, -1, 10**9])
    return c.pick([None] * 9 + [0])


def fam_peft_valid(c: CaseContext, case: Case) -> None:
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


def fam_peft_config(c: CaseContext, case: Case) -> None:
    r = c.rng
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


def fam_peft_weights_raw(c: CaseContext, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    mname = c.pick(sorted(RAW_MUTATORS))
    files[WEIGHTS], desc = RAW_MUTATORS[mname](c, files[WEIGHTS])
    task = _task_for(c, config)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), task
    case.desc, case.kind = f"{variant}: weights {mname}: {desc}, task {task}", mname


def fam_peft_weights(c: CaseContext, case: Case) -> None:
    r = c.rng
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
        tensors["prompt_encoder.default.embedding.weight"] = c.np_rng.standard_normal((3, 4)).astype(np.float32)
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


def fam_peft_pickle(c: CaseContext, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    blob, how = pickle_blob(c.marker, c.rng)
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


def fam_peft_layout(c: CaseContext, case: Case) -> None:
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


FAMILIES: dict[str, tuple[int, Callable[[CaseContext, Case], None], str]] = {  # name -> (weight, maker, what)
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
    return interleaved({name: weight for name, (weight, _, _) in FAMILIES.items()})


def make_case(seed: int, index: int, seeds: Seeds, case_dir: Path, marker: Path) -> Case:
    """Case `index` of run `seed`, its files written into the (empty) `case_dir`."""
    order = schedule()
    family = order[index % len(order)]
    c = CaseContext(random.Random(f"{seed}:{index}"), np.random.default_rng([seed, index]), seeds, case_dir, marker)
    case = Case(index, family, "", "", "")
    FAMILIES[family][1](c, case)
    return case
