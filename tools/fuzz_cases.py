"""The fuzzer's cases (tools/fuzz_adapters.py runs them): mutations of real seeds, the bundles
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
  bundle_lora         lora bundles: ranks above the export's max (or lowered consistently: acceptable), A
                      and B ranks that disagree, rank 0, a module's A or B missing, target modules and
                      layers the export lacks (also non-canonical layer numbers), in/out dims wrong or 0 in
                      one layer or all, `scalings` that lie (missing, extra, NaN, Inf, negative, strings,
                      10**400, beyond float32, nesting), NaN/Inf in A or B, s·B overflowing float32,
                      dtypes, kind swapped, stray tensors, informational metadata (acceptable), and a valid
                      one against the plain export (plain_export: refused)
  bundle_ia3          ia3 bundles: vectors of the wrong length (one layer or all), not 1-d, on modules the
                      export takes no IA3 on or lacks, `feedforward` moving a side or lying (not JSON, not
                      a list, unknown paths, 100,000 deep), layers, NaN/Inf and extremes, dtypes, kind
                      swapped, vectors dropped, stray tensors, plain_export
  peft_lora           LORA checkpoints: use_dora (with magnitude vectors) / lora_bias (with B biases) and
                      the other variants set (refused) or falsy (acceptable), rewriting inits, r lying or
                      changed with the weights (0, above the max rank), rank_pattern / alpha_pattern
                      (consistent, disagreeing, wrong types, invalid and catastrophically backtracking
                      regexes), lora_alpha lies (0, negative, 1e300, 10**400, NaN), use_rslora,
                      target_modules lying or weights on modules the export does not take (or outside
                      the layers), fan_in_fan_out, layers out of range or aliased ("00" beside "0"),
                      lora_A / lora_B missing or misshapen, NaN/Inf, extra tensors, trained biases,
                      modules_to_save, dtypes, plain_export
  peft_ia3            IA3 checkpoints: feedforward_modules a superset of target_modules, dropping or adding
                      a target, as a regex (valid, invalid, catastrophic) or of a wrong type;
                      target_modules lying; a vector on a module the export takes no IA3 on; vectors
                      misshapen, missing, NaN/Inf or extreme; LoRA keys; modules_to_save; layers; dtypes;
                      plain_export

Cases made from a LoRA or IA3 seed (in any family) are checked against the seeds' --lora export
(`Case.lora_export`); the others against the plain export.

Also here: the seeds (`load_seeds`: a folder of bundles with the PEFT checkpoints they came from
under peft/<variant>/, and the export made with --lora the LoRA and IA3 ones belong to), a safetensors byte codec (st_*: headers the safetensors library would not
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tools import interleaved
from prefixport import manifest as mf

BUNDLE = "adapter.safetensors"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# --- seeds ---------------------------------------------------------------------------------------

@dataclass
class Seeds:
    """What the cases are made from: an export (and its `--lora` twin, which the LoRA and IA3 seeds
    are checked against), its seed bundles and PEFT checkpoints (bytes)."""

    export: Path
    seeds_dir: Path
    manifest: mf.Manifest
    bundles: dict[str, bytes]  # name -> file bytes
    peft: dict[str, dict[str, bytes]]  # variant -> {file name: bytes} (top-level regular files)
    references: dict[str, tuple[str, int | None]]  # variant -> (bundle file, task) of its conversion
    lora_export: Path | None = None  # the same model exported with --lora (None: no LoRA/IA3 seeds)
    lora_manifest: mf.Manifest | None = None
    kinds: dict[str, str] = field(default_factory=dict)  # bundle name -> its kind (metadata)
    peft_types: dict[str, str] = field(default_factory=dict)  # variant -> its peft_type (config)

    def is_weight_bundle(self, name: str) -> bool:
        """A lora or ia3 seed bundle (checked against the --lora export)."""
        return self.kinds.get(name) in WEIGHT_KINDS

    def is_weight_peft(self, variant: str) -> bool:
        """A LORA or IA3 seed checkpoint (converted against the --lora export)."""
        return self.peft_types.get(variant) in WEIGHT_TYPES

    def of_kind(self, *kinds: str) -> list[str]:
        """The seed bundles of these kinds, sorted."""
        return sorted(name for name, kind in self.kinds.items() if kind in kinds)

    def of_type(self, *types: str) -> list[str]:
        """The seed checkpoints of these peft_types, sorted."""
        return sorted(name for name, t in self.peft_types.items() if t in types)


WEIGHT_KINDS = ("lora", "ia3")
WEIGHT_TYPES = ("LORA", "IA3")


def load_seeds(export: Path, seeds_dir: Path, lora_export: Path | None = None) -> Seeds:
    """The seeds in `seeds_dir` for `export`: bundles *.safetensors, PEFT checkpoints under
    peft/<variant>/; a bundle named <variant>.safetensors or <variant>-task<T>.safetensors is the
    expected conversion of that checkpoint. LoRA and IA3 seeds (bundles of kind lora or ia3, LORA or
    IA3 checkpoints) belong to `lora_export`, the same model exported with --lora. Paths are made
    absolute (the worker runs elsewhere)."""
    export, seeds_dir = Path(export).resolve(), Path(seeds_dir).resolve()
    manifest = mf.Manifest.load(export)
    bundles = {p.stem: p.read_bytes() for p in sorted(seeds_dir.glob("*.safetensors"))}
    peft: dict[str, dict[str, bytes]] = {}
    for d in sorted((seeds_dir / "peft").glob("*")):
        if (d / CONFIG).is_file() and (d / WEIGHTS).is_file():
            peft[d.name] = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    if not bundles or not peft:
        raise SystemExit(f"{seeds_dir}: needs seed bundles (*.safetensors) and PEFT checkpoints under peft/<variant>/")
    kinds = {name: str((st_parse(raw)[0].get("__metadata__") or {}).get("kind")) for name, raw in bundles.items()}
    peft_types = {variant: str(json.loads(files[CONFIG]).get("peft_type")) for variant, files in peft.items()}
    weight_seeds = sorted(n for n, k in kinds.items() if k in WEIGHT_KINDS) + sorted(
        v for v, t in peft_types.items() if t in WEIGHT_TYPES)
    lora_manifest = None
    if lora_export is not None:
        lora_export = Path(lora_export).resolve()
        lora_manifest = mf.Manifest.load(lora_export)
        if lora_manifest.weights is None:
            raise SystemExit(f"{lora_export}: not an export made with --lora (its manifest has no weight_adapters)")
    elif weight_seeds:
        raise SystemExit(f"{seeds_dir}: the LoRA/IA3 seeds {weight_seeds[:4]} need the export made with --lora "
                         "(--lora-export DIR)")
    references: dict[str, tuple[str, int | None]] = {}
    for variant in peft:
        if variant in bundles:
            references[variant] = (str(seeds_dir / f"{variant}.safetensors"), None)
        else:
            tasks = [n for n in bundles if re.fullmatch(re.escape(variant) + r"-task\d+", n)]
            if tasks:
                references[variant] = (str(seeds_dir / f"{tasks[0]}.safetensors"), int(tasks[0].rsplit("task", 1)[1]))
    return Seeds(export, seeds_dir, manifest, bundles, peft, references, lora_export, lora_manifest, kinds, peft_types)



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
    lora_export: bool = False  # checked against the export made with --lora (else the plain one)


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
        axis = 0 if meta.get("kind") == "prompt" else 1  # lora, ia3: an A's or B's axis 1, a vector's only axis
        new_n = {"zero_virtual": 0, "big_virtual": c.pick([512, 4096])}.get(kind, r.randint(1, 12))
        tensors = {k: _resize_axis(v, min(axis, v.ndim - 1), new_n) for k, v in tensors.items()}
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


def _resize_axis(t: np.ndarray, axis: int, n: int) -> np.ndarray:
    """`t` with `n` entries along `axis` (its values repeated or cut)."""
    moved = np.moveaxis(t, axis, 0)
    return np.ascontiguousarray(np.moveaxis(np.resize(moved, (n, *moved.shape[1:])), 0, axis))


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
        case.lora_export = c.seeds.is_weight_bundle(seed)
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


def _peft_export(c: CaseContext, variant: str, files: dict[str, bytes]) -> bool:
    """Whether a case's checkpoint is converted against the --lora export: a LORA or IA3 seed, or a
    config that now says LORA or IA3 (read as convert reads it, where it can be)."""
    try:
        config = json.loads(files.get(CONFIG, b"").decode("utf-8"))
    except (ValueError, RecursionError):
        config = None
    relabelled = isinstance(config, dict) and config.get("peft_type") in WEIGHT_TYPES
    return c.seeds.lora_export is not None and (c.seeds.is_weight_peft(variant) or relabelled)


def _checkpoint_case(c: CaseContext, case: Case, variant: str, files: dict[str, bytes], config: Any, desc: str,
                     kind: str, path: Path | None = None) -> int | None:
    """Finish a PEFT checkpoint case: its task, `files` written as the checkpoint (or `path`, a folder
    the family laid out itself), whether it is converted against the --lora export, and its name;
    returns the task."""
    task = _task_for(c, config if isinstance(config, dict) else {})
    case.target, case.path, case.task = "peft", str(path if path is not None else _write_peft(c, files)), task
    case.lora_export = _peft_export(c, variant, files)
    case.desc, case.kind = f"{variant}: {desc}, task {task}", kind
    return task


def _task_for(c: CaseContext, config: dict[str, Any]) -> int | None:
    if config.get("peft_type") == "MULTITASK_PROMPT_TUNING":
        tasks = config.get("num_tasks")  # the seed's, or a mutated value
        tasks = tasks if isinstance(tasks, int) and not isinstance(tasks, bool) and 0 <= tasks < 10**6 else 3
        return c.pick([None, 0, 1, 2, 1, tasks, -1, 10**9])
    return c.pick([None] * 9 + [0])


def fam_peft_valid(c: CaseContext, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    task = _checkpoint_case(c, case, variant, files, config, "unchanged", "unchanged")
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
    _checkpoint_case(c, case, variant, files, config, desc, kind)


def fam_peft_weights_raw(c: CaseContext, case: Case) -> None:
    variant, files, config = _peft_seed(c)
    mname = c.pick(sorted(RAW_MUTATORS))
    files[WEIGHTS], desc = RAW_MUTATORS[mname](c, files[WEIGHTS])
    _checkpoint_case(c, case, variant, files, config, f"weights {mname}: {desc}", mname)


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
    elif kind == "consistent_n" and "prompt_embeddings" in tensors:  # in the config and the tensors: acceptable
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
        kind, desc = "empty", f"{name} empty"
    if tensors is not None:
        files[WEIGHTS] = st_encode(tensors, meta)
    _checkpoint_case(c, case, variant, files, config, f"{kind}: {desc}", kind)


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
    _checkpoint_case(c, case, variant, files, config, f"pickle ({how}) {kind} as {name}", kind)


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
    _checkpoint_case(c, case, variant, files, config, kind, kind, path)


# --- LoRA and IA3 cases ----------------------------------------------------------------------------
# Mutations the weight adapters' own checks are about (prefixport/adapters/lora.py, bundle.py), made on
# the lora and ia3 seed bundles and the LORA and IA3 seed checkpoints, checked against the --lora export.

LORA_TENSOR = re.compile(r"lora\.([0-9]+)\.(.+)\.([ab])")
IA3_TENSOR = re.compile(r"ia3\.([0-9]+)\.(.+)")
PEFT_LEAF = re.compile(r"base_model\.model\.(.+?)\.([0-9]+)\.(.+)\.(lora_A\.weight|lora_B\.weight|ia3_l)")
# LoraConfig fields of variants that change the forward (a true value must be refused), with values
SERVED_NOT: dict[str, list[Any]] = {"use_dora": [True], "lora_bias": [True], "use_qalora": [True], "alora_invocation_tokens": [[5, 6]],
              "use_bdlora": [True, {"nblocks": 2}], "arrow_config": [{"top_k": 2}], "kasa_config": [{"r": 2}],
              "layer_replication": [[[0, 2], [1, 2]]], "target_parameters": [["mlp.experts.gate_up_proj"]]}
REWRITING = ["pissa", "pissa_niter_16", "PiSSA", "olora", "corda", "lora_ga", "loftq"]
BENIGN_INITS = [True, False, "gaussian", "orthogonal", "eva", "mica"]
SLOW_REGEXES = ["(.*)*x", "(.|.)+x", "(?:.*)*zz", "(.*?)*y", r"(\w+\.?)+q", "((a|.)*)*b"]  # catastrophic backtracking
BAD_REGEXES = ["(", "[q", "*", "q_proj)", "(?P<x", "\\", "a{2,1}", "(?i)q_proj"]  # the last: flags not first once wrapped
NUMBER_LIES = [0, -16, 1e-30, 3e38, 1e39, 1e300, "16", True, None, 10**400, float("nan"), float("inf"), [16], 2**31]
OTHER_PATHS = ["self_attn.x_proj", "mlp.fc1", "attn.c_attn", "self_attn.rotary_emb", "input_layernorm", "mlp",
               "lm_head", "self_attn.q_proj.base_layer"]
BAD_LAYERS = ["00", "01", "+1", "-1", " 1", "1.0", "\u0663", "0x1", ""]


def _weights(c: CaseContext) -> mf.WeightAdapters:
    """The --lora export's LoRA and IA3 inputs (the seeds' export)."""
    manifest = c.seeds.lora_manifest
    if manifest is None or manifest.weights is None:
        raise SystemExit("the LoRA/IA3 families need seeds made with an export made with --lora (--lora-export)")
    return manifest.weights


def _weight_seed(names: list[str], what: str, c: CaseContext) -> str:
    if not names:
        raise SystemExit(f"no {what} seeds in {c.seeds.seeds_dir}: build them (python -m tools.fuzz_adapters "
                         "--work DIR) or add some")
    name: str = c.pick(names)
    return name


def _bundle_modules(tensors: dict[str, np.ndarray], pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    return sorted({(int(m.group(1)), m.group(2)) for m in map(pattern.fullmatch, tensors) if m})


def _weight_bundle(c: CaseContext, kind: str, pattern: re.Pattern[str]
                   ) -> tuple[str, dict[str, np.ndarray], dict[str, str], list[tuple[int, str]]]:
    """A seed bundle of `kind` (lora, ia3) picked for the case: its name, tensors, metadata (a copy)
    and (layer, module path) pairs."""
    seed = _weight_seed(c.seeds.of_kind(kind), f"{kind} bundle", c)
    tensors, meta = st_decode(c.seeds.bundles[seed])
    return seed, tensors, dict(meta or {}), _bundle_modules(tensors, pattern)


def _resized(t: np.ndarray, axis: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`t` cut or padded (small random values) to `n` entries along `axis`."""
    if n <= t.shape[axis]:
        return np.ascontiguousarray(np.take(t, range(n), axis=axis))
    shape = list(t.shape)
    shape[axis] = n - t.shape[axis]
    return np.ascontiguousarray(np.concatenate([t, (0.01 * rng.standard_normal(shape)).astype(t.dtype)], axis=axis))


def _poke(c: CaseContext, t: np.ndarray, value: float) -> np.ndarray:
    """A copy of `t` with one value set (NaN, Inf, an extreme)."""
    out = t.copy()
    out.reshape(-1)[c.rng.randrange(out.size)] = value
    return out


def _renamed(tensors: dict[str, np.ndarray], old: str, new: str) -> dict[str, np.ndarray]:
    """The tensors with the substring `old` of every name replaced by `new`."""
    return {k.replace(old, new): v for k, v in tensors.items()}


def _bundle_case(c: CaseContext, case: Case, seed: str, blob: bytes, kind: str, desc: str,
                 manifest: bool | None = None, lora_export: bool = True) -> None:
    path = c.dir / BUNDLE
    path.write_bytes(blob)
    case.target, case.path, case.kind, case.desc = "bundle", str(path), kind, f"{seed}: {kind}: {desc}"
    case.manifest = c.rng.random() >= 0.15 if manifest is None else manifest
    case.lora_export = lora_export


def _scalings_lie(c: CaseContext, scalings: dict[str, Any], key: str) -> tuple[str | None, str]:
    """The `scalings` metadata text of a lie (None: the key removed), and what the lie is."""
    how = c.pick(["missing_key", "extra_key", "absent", "not_json", "nan", "inf", "negative", "zero", "string",
                  "bool", "null", "list", "object", "huge_int", "over_float32", "huge", "large", "subnormal", "deep",
                  "duplicate_key", "padded"])
    s = dict(scalings)
    if how == "absent":
        return None, how
    if how == "not_json":
        text = c.pick(["", "{", "nope", "[1, 2]", "null", "1.5", "{'a': 1}"])
        return text, f"{how} {text!r}"
    if how == "deep":
        return "[" * 100_000 + "]" * 100_000, how
    if how == "duplicate_key":
        body = json.dumps(s)[1:-1]
        value = c.pick(["NaN", "\"2\"", "-1.5", "1e400"])
        return "{" + body + f", {json.dumps(key)}: {value}" + "}", f"{how} {key} again as {value}"
    if how == "padded":
        return " " * 100_000 + json.dumps(s) + "\n", how
    if how == "missing_key":
        del s[key]
    elif how == "extra_key":
        s[c.pick(["9.self_attn.q_proj", "0.mlp.fc1", "x", ""])] = 1.0
    else:
        s[key] = {"nan": float("nan"), "inf": c.pick([float("inf"), float("-inf")]), "negative": -abs(s[key]) - 1.0,
                  "zero": 0, "string": str(s[key]), "bool": True, "null": None, "list": [s[key]], "object": {"v": 1},
                  "huge_int": 10**400, "over_float32": c.pick([3.5e38, 1e39, -1e39]), "huge": 1e300,
                  "large": c.pick([1e30, 3e37]), "subnormal": 1e-320}[how]
    return json.dumps(s), f"{how}: {key} = {json.dumps(s.get(key))[:30]}"


def fam_bundle_lora(c: CaseContext, case: Case) -> None:
    r, w, man = c.rng, _weights(c), c.seeds.lora_manifest
    assert man is not None
    seed, tensors, meta, modules = _weight_bundle(c, "lora", LORA_TENSOR)
    layer, path = c.pick(modules)
    an, bn = mf.lora_a_name(layer, path), mf.lora_b_name(layer, path)
    rank = tensors[an].shape[0]
    scalings = json.loads(meta["scalings"])
    key = f"{layer}.{path}"
    same_path = [m for m in modules if m[1] == path]
    kind = c.pick(["rank_over_max", "rank_lower", "rank_metadata", "ab_disagree", "missing_half", "unknown_target",
                   "layer_out_of_range", "noncanonical_layer", "wrong_dims", "zero_dims", "scalings", "scalings",
                   "nonfinite", "overflow", "dtype", "kind_swap", "plain_export", "informational", "stray",
                   "transposed", "rank_zero"])
    manifest, lora_export = None, True
    if kind in ("rank_over_max", "rank_lower"):
        new_r = (c.pick([w.max_rank + 1, w.max_rank + 2, 2 * w.max_rank, 64]) if kind == "rank_over_max"
                 else r.randint(1, max(rank - 1, 1)))
        chosen = modules if kind == "rank_lower" or r.random() < 0.5 else [(layer, path)]
        for lay, p in chosen:
            a_n, b_n = mf.lora_a_name(lay, p), mf.lora_b_name(lay, p)
            tensors[a_n], tensors[b_n] = (_resized(tensors[a_n], 0, new_r, c.np_rng),
                                          _resized(tensors[b_n], 1, new_r, c.np_rng))
        meta["rank"] = str(max(t.shape[0] for n, t in tensors.items() if n.endswith(".a")))
        desc = f"{len(chosen)} module(s) at rank {new_r} (export max {w.max_rank}), metadata rank {meta['rank']}"
    elif kind == "rank_metadata":
        meta["rank"] = value = c.pick([str(rank + 1), str(rank - 1), "0", "-1", "", "abc", f"{rank}.0", f" {rank}",
                                       "\u0664", "1e1", "9" * 5000, str(2**64), str(w.max_rank + 1), f"{rank}\x00"])
        desc = f"rank {value[:20]!r} (true {rank})"
    elif kind == "ab_disagree":
        how = c.pick(["a_more", "b_more", "a_less", "b_less"])
        if how.startswith("a"):
            tensors[an] = _resized(tensors[an], 0, rank + (1 if how == "a_more" else -1), c.np_rng)
        else:
            tensors[bn] = _resized(tensors[bn], 1, rank + (1 if how == "b_more" else -1), c.np_rng)
        meta["rank"] = str(max(t.shape[0] for n, t in tensors.items() if n.endswith(".a")))
        desc = f"{key}: A {list(tensors[an].shape)}, B {list(tensors[bn].shape)} ({how})"
    elif kind == "missing_half":
        gone = c.pick([an, bn])
        del tensors[gone]
        desc = f"without {gone}"
    elif kind == "unknown_target":
        new = c.pick(OTHER_PATHS)
        for lay, p in same_path:
            for n in (mf.lora_a_name(lay, p), mf.lora_b_name(lay, p)):
                tensors[n.replace(f".{p}.", f".{new}.")] = tensors.pop(n)
            scalings[f"{lay}.{new}"] = scalings.pop(f"{lay}.{p}")
        meta["scalings"] = json.dumps(scalings)
        desc = f"{path} renamed {new} in every layer"
    elif kind in ("layer_out_of_range", "noncanonical_layer"):
        new_layer = str(c.pick([man.num_layers, man.num_layers + 1, 99, 10**25])
                        if kind == "layer_out_of_range" else c.pick(BAD_LAYERS))
        tensors[f"lora.{new_layer}.{path}.a"], tensors[f"lora.{new_layer}.{path}.b"] = tensors.pop(an), tensors.pop(bn)
        scalings[f"{new_layer}.{path}"] = scalings.pop(key)
        meta["scalings"] = json.dumps(scalings)
        desc = f"{key} moved to layer {new_layer!r}"
    elif kind in ("wrong_dims", "zero_dims"):
        which = c.pick(["in", "out"])
        features = w.shapes[path][0 if which == "in" else 1]
        new = 0 if kind == "zero_dims" else max(1, features + c.pick([-1, 1, 16, features]))
        chosen = same_path if r.random() < 0.5 else [(layer, path)]
        for lay, p in chosen:
            if which == "in":
                n = mf.lora_a_name(lay, p)
                tensors[n] = _resized(tensors[n], 1, new, c.np_rng)
            else:
                n = mf.lora_b_name(lay, p)
                tensors[n] = _resized(tensors[n], 0, new, c.np_rng)
        desc = f"{which} features {new} (export {features}) in {len(chosen)} of {len(same_path)} layer(s) of {path}"
    elif kind == "scalings":
        text, desc = _scalings_lie(c, scalings, key)
        if text is None:
            del meta["scalings"]
        else:
            meta["scalings"] = text
    elif kind == "nonfinite":
        name, value = c.pick([an, bn]), c.pick([float("nan"), float("inf"), float("-inf")])
        tensors[name] = _poke(c, tensors[name], value)
        desc = f"{value} in {name}"
    elif kind == "overflow":  # finite tensors and scaling whose product s·B is not finite in float32
        how = c.pick(["big_b", "big_scaling"])
        if how == "big_b":
            b = tensors[bn]
            tensors[bn] = (b / np.abs(b).max() * c.pick([1e37, 3e38])).astype(b.dtype)
            desc = f"{how}: |{bn}| up to {np.abs(tensors[bn]).max():.3g}, scaling {scalings[key]:g}"
        else:
            scalings[key] = c.pick([1e37, 1e38, 3.4e38])
            meta["scalings"] = json.dumps(scalings)
            desc = f"{how}: scaling {scalings[key]:g} of {key}, |B| up to {np.abs(tensors[bn]).max():.3g}"
    elif kind == "dtype":
        how = c.pick(["mixed", "all_float16", "float64", "int8"])
        if how == "mixed":
            tensors[an] = tensors[an].astype(np.float16)
        else:
            dt = {"all_float16": np.float16, "float64": np.float64, "int8": np.int8}[how]
            tensors = {n: t.astype(dt) for n, t in tensors.items()}
            meta["dtype"] = np.dtype(dt).name
        desc = how
    elif kind == "kind_swap":
        meta["kind"] = new_kind = c.pick(["ia3", "prompt", "prefix"])
        if new_kind == "ia3":
            meta["feedforward"] = "[]"
        desc = f"lora tensors under kind {new_kind}"
    elif kind == "plain_export":
        manifest, lora_export, desc = True, False, "unchanged, against the export made without --lora"
    elif kind == "informational":
        field_ = c.pick(["target_modules", "lora_alpha", "use_rslora", "fan_in_fan_out", "peft_type", "source"])
        meta[field_] = value = c.pick(['["self_attn.x_proj"]', "not json", "NaN", "", "IA3", "yes"])
        desc = f"{field_} = {value!r} (not read back)"
    elif kind == "stray":
        extra = c.pick([f"lora.{layer}.{path}.c", f"ia3.{layer}.{path}", f"lora.{layer}.{path}", "prompt_embeds",
                        f"lora.{layer}.{path}.a.b", "past_key_values.0.key"])
        tensors[extra] = tensors[an].copy()
        desc = f"plus {extra}"
    elif kind == "transposed":
        name = c.pick([an, bn])
        tensors[name] = np.ascontiguousarray(tensors[name].T)
        desc = f"{name} transposed"
    else:  # rank_zero
        tensors[an], tensors[bn] = tensors[an][:0].copy(), tensors[bn][:, :0].copy()
        desc = f"{key}: A {list(tensors[an].shape)}, B {list(tensors[bn].shape)}"
    _bundle_case(c, case, seed, st_encode(tensors, meta), kind, desc, manifest, lora_export)


def fam_bundle_ia3(c: CaseContext, case: Case) -> None:
    r, w, man = c.rng, _weights(c), c.seeds.lora_manifest
    assert man is not None
    seed, tensors, meta, modules = _weight_bundle(c, "ia3", IA3_TENSOR)
    layer, path = c.pick(modules)
    name = mf.ia3_name(layer, path)
    v = tensors[name]
    feedforward = json.loads(meta["feedforward"])
    same_path = [m for m in modules if m[1] == path]
    kind = c.pick(["length", "not_1d", "non_ia3_target", "unknown_path", "side", "feedforward", "feedforward",
                   "layer", "nonfinite", "extremes", "kind_swap", "plain_export", "dtype", "drop", "stray"])
    manifest, lora_export = None, True
    if kind == "length":
        new = max(0, v.size + c.pick([-1, 1, v.size, -v.size]))
        chosen = same_path if r.random() < 0.5 else [(layer, path)]
        for lay, p in chosen:
            tensors[mf.ia3_name(lay, p)] = _resized(tensors[mf.ia3_name(lay, p)], 0, new, c.np_rng)
        desc = f"{path}: [{new}] (export [{w.ia3_dim(path)}]) in {len(chosen)} of {len(same_path)} layer(s)"
    elif kind == "not_1d":
        how = c.pick(["row", "column", "scalar"])
        tensors[name] = {"row": v[None], "column": v[:, None], "scalar": np.array(v[0])}[how].copy()
        desc = f"{name} as a {how} {list(tensors[name].shape)}"
    elif kind == "non_ia3_target":
        other = c.pick([p for p in w.lora if p not in w.ia3])
        side = c.pick(["input", "output"])
        dim = w.shapes[other][0 if side == "input" else 1]
        layers = sorted({lay for lay, _ in modules}) if r.random() < 0.5 else [layer]
        for lay in layers:
            tensors[mf.ia3_name(lay, other)] = (1 + 0.01 * c.np_rng.standard_normal(dim)).astype(v.dtype)
        if side == "input":
            meta["feedforward"] = json.dumps(sorted({*feedforward, other}))
        desc = f"vectors [{dim}] on {other} ({side}) in layer(s) {layers}"
    elif kind == "unknown_path":
        new = c.pick(OTHER_PATHS)
        tensors = _renamed(tensors, f".{path}", f".{new}") if r.random() < 0.5 else {
            **{k: t for k, t in tensors.items() if k != name}, mf.ia3_name(layer, new): v}
        if path in feedforward:
            meta["feedforward"] = json.dumps([new if p == path else p for p in feedforward])
        desc = f"{path} renamed {new}"
    elif kind == "side":
        non_ff = [p for p in w.ia3 if p not in feedforward]
        if feedforward and (r.random() < 0.5 or not non_ff):
            gone = c.pick(feedforward)
            meta["feedforward"] = json.dumps([p for p in feedforward if p != gone])
            desc = f"{gone} left out of feedforward (it scales the output)"
        else:
            added = c.pick(non_ff)
            meta["feedforward"] = json.dumps(sorted({*feedforward, added}))
            desc = f"{added} added to feedforward (it scales the input)"
    elif kind == "feedforward":
        if r.random() < 0.1:
            del meta["feedforward"]
            desc = "no feedforward metadata"
        else:
            meta["feedforward"] = text = c.pick(["", "nope", "{}", "[1]", "null", '"mlp.down_proj"', '["mlp.up_proj"]',
                                                 json.dumps(feedforward * 2), "[" * 100_000 + "]" * 100_000,
                                                 json.dumps(feedforward + ["x"] * 10_000), "[null]", " [] ",
                                                 json.dumps(feedforward)[:-1]])
            desc = f"feedforward {text[:40]!r}{'...' if len(text) > 40 else ''}"
    elif kind == "layer":
        new_layer = str(c.pick([man.num_layers, 99, 10**25, *BAD_LAYERS]))
        tensors[f"ia3.{new_layer}.{path}"] = tensors.pop(name)
        desc = f"{name} moved to layer {new_layer!r}"
    elif kind in ("nonfinite", "extremes"):
        value = c.pick([float("nan"), float("inf"), float("-inf")] if kind == "nonfinite" else
                       [3e38, -3e38, 0.0, -1.0, 1e-45, 65504.0])
        tensors[name] = _poke(c, v, value)
        desc = f"{value} in {name}"
    elif kind == "kind_swap":
        meta["kind"] = new_kind = c.pick(["lora", "prompt", "prefix"])
        if new_kind == "lora":
            meta.update(rank="1", scalings="{}")
        desc = f"ia3 vectors under kind {new_kind}"
    elif kind == "plain_export":
        manifest, lora_export, desc = True, False, "unchanged, against the export made without --lora"
    elif kind == "dtype":
        how = c.pick(["mixed", "all_float16", "float64"])
        if how == "mixed":
            tensors[name] = v.astype(np.float16)
        else:
            dt = np.float16 if how == "all_float16" else np.float64
            tensors = {n: t.astype(dt) for n, t in tensors.items()}
            meta["dtype"] = np.dtype(dt).name
        desc = how
    elif kind == "drop":
        gone = [name] if r.random() < 0.6 else [mf.ia3_name(lay, p) for lay, p in same_path]
        tensors = {k: t for k, t in tensors.items() if k not in gone}
        desc = f"without {', '.join(gone)}"
    else:  # stray
        extra = c.pick([f"lora.{layer}.{path}.a", f"ia3.{layer}.{path}.x", "prompt_embeds", f"ia3.{layer}",
                        f"ia3.{layer}.{path}.weight"])
        tensors[extra] = v.copy()
        desc = f"plus {extra}"
    if not tensors:
        tensors = {"ia3": v}
    _bundle_case(c, case, seed, st_encode(tensors, meta), kind, desc, manifest, lora_export)


def _peft_weight_seed(c: CaseContext, peft_type: str) -> tuple[str, dict[str, bytes], dict[str, Any],
                                                                 dict[str, np.ndarray], Any]:
    variant = _weight_seed(c.seeds.of_type(peft_type), f"{peft_type} checkpoint", c)
    files = dict(c.seeds.peft[variant])
    tensors, meta = st_decode(files[WEIGHTS])
    return variant, files, json.loads(files[CONFIG]), tensors, meta


def _peft_modules(tensors: dict[str, np.ndarray]) -> list[tuple[str, int, str]]:
    """(layers path, layer, module path) of each adapted module of a checkpoint, sorted."""
    found = {(m.group(1), int(m.group(2)), m.group(3)) for m in map(PEFT_LEAF.fullmatch, tensors) if m}
    return sorted(found)


def _peft_case(c: CaseContext, case: Case, variant: str, files: dict[str, bytes], config: dict[str, Any] | None,
               tensors: dict[str, np.ndarray] | None, meta: Any, kind: str, desc: str, lora_export: bool = True) -> None:
    if config is not None:
        files[CONFIG] = json.dumps(config, indent=2).encode()
    if tensors is not None:
        files[WEIGHTS] = st_encode(tensors, meta)
    case.target, case.path, case.task = "peft", str(_write_peft(c, files)), None
    case.kind, case.desc, case.lora_export = kind, f"{variant}: {kind}: {desc}", lora_export


def _peft_dtype(c: CaseContext, files: dict[str, bytes], tensors: dict[str, np.ndarray], name: str
                ) -> tuple[dict[str, np.ndarray] | None, str]:
    """A checkpoint's tensors in other dtypes (None: the weights file is already rewritten: bfloat16)."""
    how = c.pick(["float16", "mixed", "bfloat16", "float64", "int32"])
    if how == "bfloat16":
        meta_, entries = st_entries(files[WEIGHTS])
        files[WEIGHTS] = st_join(meta_, [(n, {**i, "dtype": "BF16"}, (np.frombuffer(b, np.float32).view(np.uint32) >> 16)
                                          .astype(np.uint16).tobytes()) if n == name else (n, i, b)
                                         for n, i, b in entries])
        return None, f"{name} as bfloat16"
    if how == "mixed":
        tensors[name] = tensors[name].astype(np.float16)
        return tensors, f"{name} alone as float16"
    return {n: t.astype(how) for n, t in tensors.items()}, f"every tensor {how}"


def fam_peft_lora(c: CaseContext, case: Case) -> None:
    r, w, man = c.rng, _weights(c), c.seeds.lora_manifest
    assert man is not None
    variant, files, config, tensors, meta = _peft_weight_seed(c, "LORA")
    modules = _peft_modules(tensors)
    lp, layer, path = c.pick(modules)
    head = f"base_model.model.{lp}.{layer}.{path}"
    ka, kb = f"{head}.lora_A.weight", f"{head}.lora_B.weight"
    rank, out = tensors[ka].shape[0], tensors[kb].shape[0]
    suffix = path.rsplit(".", 1)[-1]  # a target_modules / pattern key PEFT would write, e.g. "q_proj"
    every = [(f"base_model.model.{lp_}.{lay}.{p}.lora_A.weight", f"base_model.model.{lp_}.{lay}.{p}.lora_B.weight")
             for lp_, lay, p in modules]
    kind = c.pick(["variant", "variant_off", "dora_tensors", "init", "rank_config", "rank_consistent", "rank_pattern",
                   "rank_pattern", "alpha", "alpha_pattern", "rslora", "target_modules", "fan_in_fan_out", "layers",
                   "layers", "missing", "shape", "nonfinite", "extra", "bias", "saved_modules", "dtype",
                   "plain_export"])
    weights_changed, lora_export = True, True
    if kind in ("variant", "variant_off"):
        fld = c.pick(sorted(SERVED_NOT))
        config[fld] = value = c.pick(SERVED_NOT[fld]) if kind == "variant" else c.pick([False, None, 0, [], {}])
        if kind == "variant" and fld == "use_dora" and r.random() < 0.7:  # as PEFT saves DoRA
            for a, _ in every:
                tensors[a.replace("lora_A.weight", "lora_magnitude_vector")] = np.ones(out, np.float32)
        if kind == "variant" and fld == "lora_bias" and r.random() < 0.7:
            for _, b in every:
                tensors[b.replace(".weight", ".bias")] = np.zeros(tensors[b].shape[0], np.float32)
        desc = f"{fld} = {json.dumps(value)}"
    elif kind == "dora_tensors":
        tensors[f"{head}.lora_magnitude_vector"] = np.ones(out, np.float32)
        desc = "a DoRA magnitude vector, use_dora unset"
    elif kind == "init":
        config["init_lora_weights"] = value = c.pick(REWRITING + BENIGN_INITS)
        desc = f"init_lora_weights = {json.dumps(value)}"
    elif kind == "rank_config":
        config["r"] = value = c.pick([rank + 1, rank - 1, 0, -1, 2**63, float(rank), str(rank), True, None,
                                      w.max_rank + 1])
        desc = f"r = {json.dumps(value)} (weights rank {rank})"
    elif kind == "rank_consistent":
        new_r = c.pick([1, max(1, rank - 1), 0, w.max_rank, w.max_rank + 1, 2 * w.max_rank])
        for a, b in every:
            tensors[a], tensors[b] = _resized(tensors[a], 0, new_r, c.np_rng), _resized(tensors[b], 1, new_r, c.np_rng)
        config["r"] = new_r
        desc = f"r = {new_r} in config and weights (export max {w.max_rank})"
    elif kind == "rank_pattern":
        how = c.pick(["consistent", "layer", "disagree", "not_object", "bad_value", "bad_regex", "slow_regex",
                      "many_keys", "long_key"])
        new_r = r.randint(1, w.max_rank)
        if how == "consistent":  # every layer's `path` at new_r, by its suffix
            for lp_, lay, p in modules:
                if p == path:
                    a, b = f"base_model.model.{lp_}.{lay}.{p}.lora_A.weight", f"base_model.model.{lp_}.{lay}.{p}.lora_B.weight"
                    tensors[a], tensors[b] = (_resized(tensors[a], 0, new_r, c.np_rng),
                                              _resized(tensors[b], 1, new_r, c.np_rng))
            pattern: Any = {suffix: new_r}
        elif how == "layer":  # one layer's module, by a key naming its layer
            tensors[ka], tensors[kb] = _resized(tensors[ka], 0, new_r, c.np_rng), _resized(tensors[kb], 1, new_r, c.np_rng)
            pattern = {f"{lp.rsplit('.', 1)[-1]}.{layer}.{path}": new_r}
        elif how == "disagree":
            pattern, weights_changed = {suffix: rank + c.pick([1, -1])}, False
        elif how == "not_object":
            pattern, weights_changed = c.pick([[], "x", 7, [[suffix, rank]]]), False
        elif how == "bad_value":
            pattern, weights_changed = {suffix: c.pick([4.5, str(rank), True, None, -1, 0, 2**70])}, False
        elif how == "many_keys":  # 5,000 keys that match no module (PEFT would look each up per module)
            pattern, weights_changed = {f"x{i}_proj": rank for i in range(5000)}, False
        elif how == "long_key":
            pattern, weights_changed = {"q" * c.pick([2000, 100_000]) + suffix: rank}, False
        else:
            pattern = {c.pick(BAD_REGEXES if how == "bad_regex" else SLOW_REGEXES): rank}
            weights_changed = False
        config["rank_pattern"] = pattern
        desc = f"{how}: rank_pattern {json.dumps(pattern)[:60]}"
    elif kind == "alpha":
        config["lora_alpha"] = value = c.pick(NUMBER_LIES)
        desc, weights_changed = f"lora_alpha = {json.dumps(value)[:30]}", False
    elif kind == "alpha_pattern":
        how = c.pick(["value", "value", "bad_regex", "slow_regex", "not_object"])
        pattern = ({suffix: c.pick(NUMBER_LIES)} if how == "value" else
                   {c.pick(BAD_REGEXES if how == "bad_regex" else SLOW_REGEXES): 8} if how != "not_object" else
                   c.pick([[], "x", 7]))
        config["alpha_pattern"] = pattern
        desc, weights_changed = f"{how}: alpha_pattern {json.dumps(pattern)[:60]}", False
    elif kind == "rslora":
        config["use_rslora"] = value = c.pick([True, False, "false", 1, 0, None])
        desc, weights_changed = f"use_rslora = {json.dumps(value)}", False
    elif kind == "target_modules":
        how = c.pick(["config_only", "weights", "outside"])
        if how == "config_only":
            config["target_modules"] = value = c.pick([["x_proj"], "all-linear", ".*", 7, None, ["lm_head"]])
            desc, weights_changed = f"{how}: target_modules = {json.dumps(value)}", False
        elif how == "weights":
            new = c.pick(OTHER_PATHS)
            tensors = _renamed(tensors, f".{path}.lora_", f".{new}.lora_")
            config["target_modules"] = [*(t for t in config.get("target_modules") or [] if t != suffix),
                                        new.rsplit(".", 1)[-1]]
            desc = f"{how}: {path} renamed {new} in every layer"
        else:
            where = c.pick(["lm_head", "model.embed_tokens", "model.norm", lp, f"{lp}.{layer}"])
            stem = f"base_model.model.{where}"
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = tensors[ka].copy(), tensors[kb].copy()
            desc = f"{how}: a LoRA on {where}"
    elif kind == "fan_in_fan_out":
        config["fan_in_fan_out"] = True
        if r.random() < 0.5:  # stored as a Conv1D's [in, out] would be: not what PEFT saves for a LoRA
            tensors = {k: np.ascontiguousarray(t.T) for k, t in tensors.items()}
            desc = "fan_in_fan_out true, A and B transposed"
        else:
            desc, weights_changed = "fan_in_fan_out true (a Llama's nn.Linear: weights as saved)", False
    elif kind == "layers":
        how = c.pick(["config_only", "out_of_range", "alias", "noncanonical"])
        if how == "config_only":
            config["layers_to_transform"] = value = c.pick([[5], [0], 7, "x", None])
            desc, weights_changed = f"{how}: layers_to_transform = {json.dumps(value)}", False
        else:
            new_layer = (str(c.pick([man.num_layers, 99, 10**20])) if how == "out_of_range" else
                         "0" + str(layer) if how == "alias" else c.pick(["+0", " 0", "0x0", "\u0660", "-0", "1.0"]))
            new_head = f"base_model.model.{lp}.{new_layer}.{path}"
            if how == "alias":  # beside the original, other values: which one would convert?
                tensors[f"{new_head}.lora_A.weight"] = (tensors[ka] * 2).astype(tensors[ka].dtype)
                tensors[f"{new_head}.lora_B.weight"] = (tensors[kb] * 2).astype(tensors[kb].dtype)
            else:
                tensors = _renamed(tensors, f"{head}.", f"{new_head}.")
            desc = f"{how}: {lp}.{layer}.{path} {'copied' if how == 'alias' else 'moved'} to layer {new_layer!r}"
    elif kind == "missing":
        how = c.pick(["one_b", "one_a", "every_b"])
        gone = [kb] if how == "one_b" else [ka] if how == "one_a" else [b for _, b in every]
        tensors = {k: t for k, t in tensors.items() if k not in gone}
        desc = f"{how}: without {gone[0]}{' ...' if len(gone) > 1 else ''}"
    elif kind == "shape":
        how = c.pick(["b_rank", "a_in", "b_out", "transposed", "flat", "batch"])
        name = kb if how in ("b_rank", "b_out") else c.pick([ka, kb])
        t = tensors[name]
        if how in ("b_rank", "a_in"):
            tensors[name] = _resized(t, 1, (rank if how == "b_rank" else t.shape[1]) + 1, c.np_rng)
        elif how == "b_out":
            tensors[name] = _resized(t, 0, t.shape[0] + 1, c.np_rng)
        else:
            tensors[name] = {"transposed": t.T, "flat": t.reshape(-1), "batch": t[None]}[how].copy()
        desc = f"{how}: {name} {list(tensors[name].shape)}"
    elif kind == "nonfinite":
        name, value = c.pick([ka, kb]), c.pick([float("nan"), float("inf"), float("-inf")])
        tensors[name] = _poke(c, tensors[name], value)
        desc = f"{value} in {name}"
    elif kind == "extra":
        leaf = c.pick(["lora_embedding_A", "lora_magnitude_vector", "base_layer.weight", "lora_A.bias", "lora_dropout",
                       "lora_A.default.weight", "ia3_l"])
        tensors[f"{head}.{leaf}"] = tensors[ka].copy()
        desc = f"plus {head}.{leaf}"
    elif kind == "bias":
        config["bias"] = value = c.pick(["all", "lora_only", "none"])
        if r.random() < 0.6:
            tensors[f"{head}.bias"] = np.zeros(out, np.float32)
            desc = f"bias = {value!r}, a trained bias of {path}"
        else:
            desc, weights_changed = f"bias = {value!r}, no bias tensor", False
    elif kind == "saved_modules":
        fld = c.pick(["modules_to_save", "trainable_token_indices"])
        config[fld] = value = c.pick([["lm_head"], [1, 2], [], None, {"embed_tokens": [1]}])
        desc, weights_changed = f"{fld} = {json.dumps(value)}", False
    elif kind == "dtype":
        new_tensors, desc = _peft_dtype(c, files, tensors, c.pick([ka, kb]))
        tensors, weights_changed = new_tensors or tensors, new_tensors is not None
    else:  # plain_export
        desc, weights_changed, lora_export = "unchanged, against the export made without --lora", False, False
    _peft_case(c, case, variant, files, config, tensors if weights_changed else None, meta, kind, desc, lora_export)


def fam_peft_ia3(c: CaseContext, case: Case) -> None:
    r, w, man = c.rng, _weights(c), c.seeds.lora_manifest
    assert man is not None
    variant, files, config, tensors, meta = _peft_weight_seed(c, "IA3")
    modules = _peft_modules(tensors)
    lp, layer, path = c.pick(modules)
    head = f"base_model.model.{lp}.{layer}.{path}"
    key = f"{head}.ia3_l"
    v = tensors[key]
    ff = config.get("feedforward_modules") or []
    targets = config.get("target_modules") or []
    kind = c.pick(["ff_superset", "ff_drop", "ff_add_target", "ff_regex", "ff_type", "target_config", "non_target",
                   "vector_shape", "missing", "nonfinite", "extremes", "lora_keys", "saved_modules", "layers",
                   "dtype", "plain_export", "init"])
    weights_changed, lora_export = False, True
    if kind == "ff_superset":  # a feedforward module that is no target (PEFT's config refuses it)
        config["feedforward_modules"] = value = [*ff, c.pick(["up_proj", "gate_proj", "q_proj"])]
        desc = f"feedforward_modules {value}, target_modules {targets}"
    elif kind == "ff_drop":
        config["feedforward_modules"] = value = [] if r.random() < 0.4 else [m for m in ff if m != c.pick(ff or [""])]
        desc = f"feedforward_modules {value} (was {ff})"
    elif kind == "ff_add_target":
        added = c.pick([t for t in targets if t not in ff] or ["k_proj"])
        config["feedforward_modules"] = value = [*ff, added]
        desc = f"feedforward_modules {value}: {added} too"
    elif kind == "ff_regex":
        config["feedforward_modules"] = value = c.pick([".*down_proj", r".*\.mlp\..*", r"model\.layers\.\d+\.mlp\.down_proj",
                                                        ".*", *BAD_REGEXES[:3], *SLOW_REGEXES])
        desc = f"feedforward_modules regex {value!r}"
    elif kind == "ff_type":
        config["feedforward_modules"] = value = c.pick([7, {"down_proj": 1}, [1], [None], True, None, 1.5])
        desc = f"feedforward_modules = {json.dumps(value)}"
    elif kind == "target_config":
        config["target_modules"] = value = c.pick([["x_proj"], "all-linear", 7, None, ["q_proj"]])
        desc = f"target_modules = {json.dumps(value)} (weights unchanged)"
    elif kind == "non_target":
        other = c.pick([p for p in w.lora if p not in w.ia3])
        tensors[f"base_model.model.{lp}.{layer}.{other}.ia3_l"] = np.ones((w.shapes[other][1], 1), v.dtype)
        config["target_modules"] = [*targets, other.rsplit(".", 1)[-1]]
        desc, weights_changed = f"an IA3 vector on {other}, which the export takes no IA3 on", True
    elif kind == "vector_shape":
        how = c.pick(["flat", "longer", "transposed", "one"])
        longer = (v.shape[0], v.shape[1] + 1) if v.shape[0] == 1 else (v.shape[0] + 1, 1)
        tensors[key] = {"flat": v.reshape(-1), "longer": np.ones(longer, v.dtype), "transposed": v.T,
                        "one": np.ones((1, 1), v.dtype)}[how].copy()
        desc, weights_changed = f"{how}: {key} {list(tensors[key].shape)}", True
    elif kind == "missing":
        gone = [key] if r.random() < 0.7 else list(tensors)
        tensors = {k: t for k, t in tensors.items() if k not in gone}
        desc, weights_changed = f"without {len(gone)} vector(s)", True
    elif kind in ("nonfinite", "extremes"):
        value = c.pick([float("nan"), float("inf"), float("-inf")] if kind == "nonfinite" else
                       [3e38, -3e38, 0.0, -1.0, 1e-45])
        tensors[key] = _poke(c, v, value)
        desc, weights_changed = f"{value} in {key}", True
    elif kind == "lora_keys":
        tensors[f"{head}.lora_A.weight"] = np.ones((2, max(v.shape)), v.dtype)
        desc, weights_changed = "a lora_A weight in an IA3 checkpoint", True
    elif kind == "saved_modules":
        config["modules_to_save"] = value = c.pick([["lm_head"], [], None])
        desc = f"modules_to_save = {json.dumps(value)}"
    elif kind == "layers":
        how = c.pick(["out_of_range", "alias", "noncanonical"])
        new_layer = (str(c.pick([man.num_layers, 99, 10**20])) if how == "out_of_range" else
                     "0" + str(layer) if how == "alias" else c.pick(["+0", " 0", "\u0660", "1.0"]))
        new_key = f"base_model.model.{lp}.{new_layer}.{path}.ia3_l"
        if how == "alias":
            tensors[new_key] = (v * 2).astype(v.dtype)
        else:
            tensors[new_key] = tensors.pop(key)
        desc, weights_changed = f"{how}: {key} {'copied' if how == 'alias' else 'moved'} to layer {new_layer!r}", True
    elif kind == "dtype":
        new_tensors, desc = _peft_dtype(c, files, tensors, key)
        tensors, weights_changed = new_tensors or tensors, new_tensors is not None
    elif kind == "plain_export":
        desc, lora_export = "unchanged, against the export made without --lora", False
    else:  # init
        config["init_ia3_weights"] = value = c.pick([False, "x", None])
        desc = f"init_ia3_weights = {json.dumps(value)}"
    _peft_case(c, case, variant, files, config, tensors if weights_changed else None, meta, kind, desc, lora_export)


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
    "bundle_lora": (4, fam_bundle_lora, "LoRA bundles: ranks, modules, dims, scalings that lie"),
    "bundle_ia3": (2, fam_bundle_ia3, "IA3 bundles: vector lengths, targets, sides, feedforward"),
    "peft_lora": (5, fam_peft_lora, "LoRA checkpoints: variants, ranks, patterns, targets, layers"),
    "peft_ia3": (2, fam_peft_ia3, "IA3 checkpoints: feedforward_modules, targets, vector shapes"),
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
