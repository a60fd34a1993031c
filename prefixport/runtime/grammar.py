"""Structured output: an OpenAI `response_format` compiled to a token grammar (llguidance), and one
`Matcher` per row that masks each decode step's logits to the tokens the grammar allows."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import llguidance as llg
import numpy as np

from ..errors import PrefixportError, SchemaError
from .lru import FairLRU
from .tokenizer import Tokenizer

# The whitespace allowed wherever JSON allows some: one space, or one line break and up to 32 spaces or
# tabs of indentation (8 levels of 4 spaces). Compact, spaced and pretty-printed JSON pass; blank lines
# and runs of whitespace, which small models emit endlessly, do not.
WHITESPACE = r"\x20|\r?\n[\x20\x09]{0,32}"
CACHE_SIZE = 128  # compiled grammars kept per vocabulary
_TYPES = ("text", "json_object", "json_schema")
_LIMITS = llg.LLParserLimits(verbose_errors=False)  # errors never echo parser state or the grammar
# a mask byte -> what its 8 tokens add to their logits (0 allowed, -inf forbidden): one gather and one
# add per step, whatever the pattern (numpy's masked copies are branchy: 10x slower on mixed masks)
_ADD = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"), 0.0, -np.inf
                ).astype(np.float32)
_scratch = threading.local()  # per thread: the gathered [vocab] additions (reused; 4 bytes a token)


class GrammarVocab:
    """The export's tokenizer as llguidance sees it (built once per export: under 1 s for 49k tokens)
    and the cache of grammars compiled against it. Thread-safe."""

    def __init__(self, tokenizer_json: str, eos_ids: Sequence[int], cache_size: int = CACHE_SIZE) -> None:
        if not eos_ids:
            raise PrefixportError("structured output needs the model's end-of-sequence token id; the export has none")
        spec = json.loads(tokenizer_json)
        spec["padding"] = spec["truncation"] = None  # as llguidance.hf does: whole texts, no pads
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.ll_tokenizer = llg.LLTokenizer(json.dumps(spec), eos_token=list(self.eos_ids))
        self.vocab_size: int = self.ll_tokenizer.vocab_size  # mask bits; logits beyond this are forbidden
        self.cache: FairLRU[str, Grammar] = FairLRU(cache_size)  # compiled grammars by schema

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> GrammarVocab:
        """From the export's tokenizer; eos_ids: the model's (`Engine.eos_token_ids`), allowed once a
        document is complete."""
        return cls(tokenizer.to_json(), eos_ids)

    def cached(self, key: str, build: Callable[[], Grammar], owner: str = "") -> Grammar:
        """The grammar kept under key, else build() (outside the lock: a race compiles twice, harmlessly),
        kept for `owner` (a tenant) in a `FairLRU` of cache_size: a tenant sending ever new schemas
        evicts its own grammars, not others' (docs/security.md, "Bounded state")."""
        grammar = self.cache.get(key)
        if grammar is None:
            grammar = build()
            self.cache.put(key, grammar, owner)
        return grammar


class Grammar:
    """A compiled response format; shared by every row that asks for it (thread-safe to share)."""

    def __init__(self, template: llg.LLMatcher, vocab: GrammarVocab) -> None:
        self._template = template  # never advanced: each row gets a copy
        self._vocab = vocab
        self._lock = threading.Lock()

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any] | None, vocab: GrammarVocab,
                             owner: str = "") -> Grammar | None:
        """None for no format or `{"type": "text"}`; else the compiled grammar (cached by schema, for `owner`).
        Raises SchemaError naming the problem for a malformed format or a schema that cannot be used."""
        schema = _schema(response_format)
        if schema is None:
            return None
        # key keeps the schema's key order: llguidance emits properties in the order the schema lists them
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        return vocab.cached(key, lambda: cls._compile(schema, vocab), owner)

    @classmethod
    def _compile(cls, schema: dict[str, Any], vocab: GrammarVocab) -> Grammar:
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
        except ValueError as e:
            raise SchemaError(f"response_format: the JSON schema cannot be read: {e}") from e
        template = llg.LLMatcher(vocab.ll_tokenizer, text, log_level=0, limits=_LIMITS)
        probe = template.deep_copy()  # the first mask builds the lexer (shared by later copies) and
        probe.compute_bitmask()  # reveals limits hit only then
        for m in (template, probe):
            if m.is_error():
                raise SchemaError(_schema_message(m.get_error()))
        return cls(template, vocab)

    def matcher(self) -> Matcher:
        """A fresh row position at the start of the document (a copy: tens of µs)."""
        with self._lock:
            return Matcher(self._template.deep_copy(), self._vocab.vocab_size)


class Matcher:
    """One row's position in the grammar. Not thread-safe: one row, one thread at a time."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self._vocab_size = vocab_size
        self._bits = np.empty((vocab_size + 31) // 32, np.int32)

    def _fill(self) -> np.ndarray:
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # releases the GIL
        if self._m.is_error():
            raise PrefixportError(f"structured output failed: {self._m.get_error().splitlines()[0]}")
        return self._bits.view(np.uint8)

    def allowed(self) -> np.ndarray:
        """bool [tokenizer vocab]: the tokens the grammar allows next (only EOS once finished)."""
        return np.unpackbits(self._fill(), bitorder="little")[: self._vocab_size].view(bool)

    def mask(self, logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """logits [vocab] with every token the grammar forbids at -inf (ids beyond the tokenizer's
        vocabulary too), written to out: a new array by default, `out=logits` masks in place."""
        if logits.ndim != 1:
            raise ValueError(f"mask takes one row's logits [vocab]; got shape {logits.shape}")
        bits = self._fill()
        add = getattr(_scratch, "add", None)
        if add is None or add.shape[0] != bits.size:
            add = _scratch.add = np.empty((bits.size, 8), np.float32)
        _ADD.take(bits, axis=0, out=add)
        n = min(logits.shape[0], self._vocab_size)
        out = np.empty_like(logits) if out is None else out
        np.add(logits[:n], add.reshape(-1)[:n], out=out[:n], casting="unsafe")
        out[n:] = -np.inf
        return out

    def advance(self, token: int) -> None:
        """Consume the sampled token; PrefixportError if the grammar does not allow it."""
        token = int(token)
        ok = 0 <= token < self._vocab_size and not self._m.is_error() and self._m.consume_token(token)
        if not ok:
            reason = self._m.get_error().splitlines()[0] if self._m.is_error() else (
                f"outside the tokenizer's {self._vocab_size} tokens")
            raise PrefixportError(f"structured output: token {token} is not allowed here ({reason})")

    @property
    def finished(self) -> bool:
        """The document is complete: only end-of-sequence may follow (also true once EOS is consumed)."""
        return self._m.is_stopped() and not self._m.is_error()


def _schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a response format asks for, None for free text; SchemaError if malformed."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise SchemaError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind not in _TYPES:
        raise SchemaError(f"response_format.type must be one of {', '.join(map(repr, _TYPES))}; got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise SchemaError("response_format of type 'json_schema' needs a 'json_schema' object: "
                         "{\"name\": ..., \"schema\": {...}}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise SchemaError("response_format.json_schema.schema is required and must be a JSON Schema object")
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise SchemaError("response_format.json_schema: 'name' must be a string and 'strict' a boolean")
    # llguidance's own options ride in a top-level "x-guidance" key: not the client's to set
    return {k: v for k, v in schema.items() if k != "x-guidance"}


def _schema_message(error: str) -> str:
    lines = error.strip().splitlines()  # the parser's message, up to any dump of its state ("<...")
    cut = next((i for i, line in enumerate(lines) if line.startswith("<")), len(lines))
    error = "\n".join(lines[:cut])[:500]
    if error.startswith("Unimplemented keys:"):
        keys = error.removeprefix("Unimplemented keys:").strip().strip("[]").replace('"', "")
        return f"response_format: the JSON schema uses keywords structured output does not support: {keys}"
    if "coerce_one_of" in error:
        return ("response_format: the JSON schema's oneOf is supported only where its branches cannot "
                "overlap; use anyOf")
    return f"response_format: the JSON schema is invalid or not supported: {error}"
