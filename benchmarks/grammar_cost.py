"""Grammar engines for structured output (`response_format`), measured on the CPU with a real tokenizer:
llguidance, xgrammar and outlines-core, whichever are importable, plus prefixport's own
`runtime.grammar` (llguidance with prefixport's whitespace rule; its mask is the whole per-row step:
the bitmask, then a copy of a row of logits with the forbidden ones at -inf).

For a typical schema (an object with a string, an integer, an enum, an array of strings, a nested
object) and for json_object ({"type": "object"}): the tokenizer's one-off setup, the grammar's compile
time (cold, each library's cache off), the first mask after it, the cost of a new matcher, and the
per-token mask and advance costs (mean, p50, p99, max) while a known valid document's tokens are
forced through the matcher, which must accept each token and allow EOS at the end. Then which
schema features each engine compiles, and whether it enforces them. Prints Markdown and writes JSON
and Markdown.

    python -m benchmarks.grammar_cost [--tokenizer exports/smollm2-135m-instruct/tokenizer.json] [--eos 2]
                                      [--passes 10] [--compiles 5] [--out benchmarks/results/grammar_cost.json]

The comparison wants a scratch venv with all three (xgrammar pulls torch and transformers):
`pip install numpy tokenizers llguidance xgrammar outlines-core onnxruntime jinja2 safetensors torch==2.13.0`;
run from the checkout's root, prefixport is imported from there (the scratch venv does not install it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from benchmarks.common import DEFAULT_EXPORT, RESULTS, distribution, machine, median

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "status", "tags", "address"],
    "additionalProperties": False,
}
CASES: dict[str, tuple[dict[str, Any], Any]] = {  # case -> (schema, a valid document)
    "schema": (SCHEMA, {"name": "Ada Lovelace", "age": 36, "status": "active",
                        "tags": ["mathematics", "poetry", "analytical engines"],
                        "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}}),
    "json_object": ({"type": "object"}, {"id": 17, "title": "Weekly report", "done": False, "score": 0.75,
                                         "owner": {"name": "Ada", "email": "ada@example.com"},
                                         "labels": ["x", "y"], "note": None}),
}
FEATURES: dict[str, dict[str, Any]] = {  # feature -> schema; the last must be refused
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/node"},
    "anyOf + null (Optional)": {"type": "object",
                                "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
    "pattern + min/maxLength": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 8},
    "format date-time": {"type": "string", "format": "date-time"},
    "minItems / maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "minimum / maximum": {"type": "integer", "minimum": 1, "maximum": 120},
    "json_object 5 objects deep": {"type": "object"},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "invalid {type: nonsense}": {"type": "nonsense"},
}
VIOLATIONS = {"uniqueItems": "[1, 1]"}  # feature -> a document its schema forbids
VALID = {"json_object 5 objects deep": '{"a": {"b": {"c": {"d": {"e": 1}}}}}'}  # feature -> a document it allows


class Engine:
    """One library behind a common interface; `bits` is an int32 bitmask [(vocab + 31) // 32]."""

    name = ""
    package = ""

    def setup(self, tokenizer_path: Path, eos: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, m: Any, bits: np.ndarray) -> None: ...
    def advance(self, m: Any, token: int) -> bool: ...

    def timed_fill(self, m: Any, bits: np.ndarray) -> float:
        start = time.perf_counter()
        self.fill(m, bits)
        return time.perf_counter() - start

    def version(self) -> str:
        return metadata.version(self.package)

    def requires(self) -> list[str]:
        """What pip installs with it (unconditional requirements)."""
        return [r.split(";")[0].strip() for r in metadata.requires(self.package) or [] if "extra ==" not in r]


class LLGuidance(Engine):
    name, package = "llguidance", "llguidance"

    def setup(self, tokenizer_path: Path, eos: int) -> None:
        import llguidance as llg
        self.llg = llg
        self.tok = llg.LLTokenizer(tokenizer_path.read_text(), eos_token=[eos])

    def compile(self, schema: dict[str, Any]) -> Any:
        m = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, bits: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)

    def advance(self, m: Any, token: int) -> bool:
        return m.consume_token(token)


class XGrammar(Engine):
    name, package = "xgrammar", "xgrammar"

    def setup(self, tokenizer_path: Path, eos: int) -> None:
        import os

        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast  # xgrammar's own way in needs transformers
        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bits: np.ndarray) -> None:
        m.fill_next_token_bitmask(bits.reshape(1, -1))

    def advance(self, m: Any, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore(Engine):
    name, package = "outlines-core", "outlines_core"

    def setup(self, tokenizer_path: Path, eos: int) -> None:
        import outlines_core as oc
        self.oc = oc
        spec = json.loads(tokenizer_path.read_text())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise RuntimeError("this benchmark builds outlines-core's vocabulary for byte-level BPE only")
        byte_of = _byte_level_decoder()
        tok = Tokenizer.from_file(str(tokenizer_path))
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab(with_added_tokens=True).items():
            if i != eos and i not in special:
                tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
        self.vocab = oc.Vocabulary(eos, tokens)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema)), self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, bits: np.ndarray) -> None:
        m.write_mask_into(bits.ctypes.data, bits.size, 4)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False


class Prefixport(Engine):
    """prefixport.runtime.grammar end to end: `mask` is Matcher.mask(logits), what a row pays per step."""

    name, package = "prefixport.runtime.grammar (llguidance)", "llguidance"

    def setup(self, tokenizer_path: Path, eos: int) -> None:
        from prefixport.runtime.grammar import Grammar, GrammarVocab
        self.Grammar = Grammar
        self.vocab = GrammarVocab(tokenizer_path.read_text(), [eos], cache_size=0)  # every compile cold
        self.logits = np.random.default_rng(0).standard_normal(self.vocab.vocab_size).astype(np.float32)

    def compile(self, schema: dict[str, Any]) -> Any:
        rf = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
        return self.Grammar.from_response_format(rf, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return compiled.matcher()

    def timed_fill(self, m: Any, bits: np.ndarray) -> float:
        start = time.perf_counter()
        masked = m.mask(self.logits)
        elapsed = time.perf_counter() - start
        bits[:] = np.packbits(masked > -np.inf, bitorder="little").view(np.int32)  # for the check, not timed
        return elapsed

    def fill(self, m: Any, bits: np.ndarray) -> None:
        self.timed_fill(m, bits)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token)
            return True
        except Exception:
            return False


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _allowed(bits: np.ndarray, token: int) -> bool:
    return bool((int(bits[token // 32]) >> (token % 32)) & 1)


class Run:
    """One engine on one case; its steps are interleaved with the other engines' so that all see the
    same machine load."""

    def __init__(self, engine: Engine, ids: list[int], schema: dict[str, Any], eos: int, words: int) -> None:
        self.engine, self.ids, self.schema, self.eos = engine, ids, schema, eos
        self.bits = np.zeros(words, np.int32)
        self.compile_s: list[float] = []
        self.creates: list[float] = []
        self.masks: list[float] = []
        self.advances: list[float] = []
        self.first_mask = 0.0
        self.eos_only = False
        self.error: str | None = None

    def compile(self) -> None:
        start = time.perf_counter()
        self.compiled = self.engine.compile(self.schema)
        self.compile_s.append(time.perf_counter() - start)

    def first(self) -> None:
        """The first mask on the last fresh compile: lazily built state shows here."""
        self.first_mask = self.engine.timed_fill(self.engine.matcher(self.compiled), self.bits)

    def one_pass(self) -> None:
        engine, bits = self.engine, self.bits
        start = time.perf_counter()
        m = engine.matcher(self.compiled)
        self.creates.append(time.perf_counter() - start)
        for step, token in enumerate(self.ids):
            self.masks.append(engine.timed_fill(m, bits))
            if not _allowed(bits, token):
                raise ValueError(f"the mask forbids token {step} ({token}) of the valid document")
            start = time.perf_counter()
            ok = engine.advance(m, token)
            self.advances.append(time.perf_counter() - start)
            if not ok:
                raise ValueError(f"the matcher refused token {step} ({token}) of the valid document")
        engine.fill(m, bits)
        if not _allowed(bits, self.eos):
            raise ValueError("EOS is not allowed after the complete document")
        self.eos_only = int(np.unpackbits(bits.view(np.uint8)).sum()) == 1

    def step(self, what: str) -> None:
        if self.error is None:
            try:
                getattr(self, what)()
            except Exception as e:  # each library has its own error types
                self.error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:120]

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {"compile_ms": {"median": 1e3 * median(self.compile_s), "min": 1e3 * min(self.compile_s),
                               "n": len(self.compile_s)},
                "first_mask_ms": 1e3 * self.first_mask, "matcher_us": 1e6 * median(self.creates),
                "mask_us": distribution(self.masks, 1e6),
                "advance_us": distribution(self.advances, 1e6),
                "tokens": len(self.ids), "eos_only_at_end": self.eos_only}


def _accepts(engine: Engine, compiled: Any, ids: list[int], eos: int, words: int) -> bool:
    """Does the matcher take the whole token list and then allow EOS?"""
    bits, m = np.zeros(words, np.int32), engine.matcher(compiled)
    for token in ids:
        engine.fill(m, bits)
        if not _allowed(bits, token) or not engine.advance(m, token):
            return False
    engine.fill(m, bits)
    return _allowed(bits, eos)


def features(engine: Engine, tok: Tokenizer, eos: int, words: int) -> dict[str, str]:
    out = {}
    for name, schema in FEATURES.items():
        try:
            compiled = engine.compile(schema)
        except Exception as e:  # each library has its own error types
            message = re.sub(r"^\[[\d:]+\] \S+: ", "", " ".join(str(e).split()))  # xgrammar's log prefix
            out[name] = "refused: " + message.removeprefix("response_format: ")[:90]
            continue
        out[name] = "compiles"
        violation, valid = VIOLATIONS.get(name), VALID.get(name)
        if violation and _accepts(engine, compiled, tok.encode(violation, add_special_tokens=False).ids, eos, words):
            out[name] = f"compiles, **not enforced** (accepts `{violation}`)"
        if valid and not _accepts(engine, compiled, tok.encode(valid, add_special_tokens=False).ids, eos, words):
            out[name] = f"compiles, **rejects** the valid `{valid}`"
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Grammar engines on the CPU: {m.get('cpu')}, {m.get('cores')} cores (shared, noisy), Python "
             f"{m.get('python')}; tokenizer {report['tokenizer']} (vocab {report['vocab']}), EOS {report['eos']}. "
             f"Compile: median of {report['compiles']} cold compiles. Mask and advance: per token over "
             f"{report['passes']} passes of the valid document's tokens (one row, one thread), the engines "
             "interleaved; p99 and max include the shared machine's preemptions (a 4 ms slice). The prefixport "
             "row's mask is `Matcher.mask(logits)`: the bitmask plus a copy of the row's logits with the "
             "forbidden ones at -inf, what a row pays per step.", ""]
    lines += ["| engine | case | setup s | compile ms | first mask ms | new matcher µs | mask mean µs | "
              "p50 | p99 | max | advance mean µs | tokens | EOS only at end |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["engines"].items():
        if "skipped" in r:
            lines.append(f"| {name} | — | skipped: {r['skipped']} |" + " |" * 10)
            continue
        for case, c in r["cases"].items():
            if "error" in c:
                lines.append(f"| {name} | {case} | {r['setup_s']:.2f} | {c['error']} |" + " |" * 9)
                continue
            k = c["mask_us"]
            lines.append(f"| {name} ({r['version']}) | {case} | {r['setup_s']:.2f} | {c['compile_ms']['median']:.1f} | "
                         f"{c['first_mask_ms']:.2f} | {c['matcher_us']:.0f} | {k['mean']:.0f} | {k['p50']:.0f} | "
                         f"{k['p99']:.0f} | {k['max']:.0f} | {c['advance_us']['mean']:.0f} | {c['tokens']} | "
                         f"{'yes' if c['eos_only_at_end'] else 'no'} |")
    lines += ["", "Dependencies pip installs with each (its metadata's unconditional requirements):", ""]
    lines += [f"- {n}: {', '.join(r['requires']) or 'none'}" for n, r in report["engines"].items() if "requires" in r]
    names = [n for n, r in report["engines"].items() if "features" in r]
    if names:
        lines += ["", "Schema features (does it compile, and is what compiles enforced?):", "",
                  "| feature | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for feature in FEATURES:
            cells = (report["engines"][n]["features"][feature] for n in names)
            lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(DEFAULT_EXPORT / "tokenizer.json"))
    parser.add_argument("--eos", type=int, default=None, help="EOS id (default: generation_config.json beside it)")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "grammar_cost.json"))
    args = parser.parse_args()
    path = Path(args.tokenizer)
    eos = args.eos
    if eos is None:
        eos = json.loads((path.parent / "generation_config.json").read_text())["eos_token_id"]
        eos = eos[0] if isinstance(eos, list) else eos
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    words = (vocab + 31) // 32
    report: dict[str, Any] = {"machine": machine("llguidance", "xgrammar", "outlines_core", "tokenizers"),
                              "tokenizer": path.parent.name, "vocab": vocab, "eos": eos,
                              "passes": args.passes, "compiles": args.compiles, "engines": {}}
    ready: list[Engine] = []
    for engine in (LLGuidance(), XGrammar(), OutlinesCore(), Prefixport()):
        try:
            start = time.perf_counter()
            engine.setup(path, eos)
            setup_s = time.perf_counter() - start
        except Exception as e:  # not installed, or a library that cannot read this tokenizer
            report["engines"][engine.name] = {"skipped": f"{type(e).__name__}: {e}"[:120]}
            print(f"{engine.name}: skipped ({e})", file=sys.stderr)
            continue
        ready.append(engine)
        report["engines"][engine.name] = {"version": engine.version(), "requires": engine.requires(),
                                          "setup_s": setup_s, "cases": {}}
    for case, (schema, doc) in CASES.items():
        ids = tok.encode(json.dumps(doc), add_special_tokens=False).ids
        runs = [Run(engine, ids, schema, eos, words) for engine in ready]
        for what, times in (("compile", args.compiles), ("first", 1), ("one_pass", args.passes)):
            for _ in range(times):
                for run in runs:
                    run.step(what)
        for run in runs:
            report["engines"][run.engine.name]["cases"][case] = run.result()
        print(f"{case}: done", file=sys.stderr)
    for engine in ready:
        report["engines"][engine.name]["features"] = features(engine, tok, eos, words)
    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
