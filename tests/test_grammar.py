"""Structured output's grammar (runtime/grammar.py) on the default model's real tokenizer: forced valid
documents, random-logit walks that must still give schema-valid JSON, the -inf mask, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel

from prefixport.errors import PrefixportError, SchemaError
from prefixport.runtime.grammar import Grammar, GrammarVocab
from prefixport.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Tokenizer:
    """SmolLM2-135M-Instruct's tokenizer written as the exporter writes it (from the GGUF; no graph export)."""
    from transformers import AutoTokenizer

    from prefixport.exporter.loading import DEFAULT_MODEL, resolve

    source = resolve(DEFAULT_MODEL)
    folder: Path = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
    tok.save_pretrained(folder)
    return Tokenizer(folder)


@pytest.fixture(scope="session")
def eos(smollm2_tokenizer) -> int:
    return smollm2_tokenizer.token_id("<|im_end|>")  # SmolLM2's generation_config eos_token_id (2)


@pytest.fixture(scope="session")
def vocab(smollm2_tokenizer, eos) -> GrammarVocab:
    return GrammarVocab.from_tokenizer(smollm2_tokenizer, [eos])


@pytest.fixture(scope="session")
def closing(smollm2_tokenizer, vocab) -> np.ndarray:
    """bool [vocab]: tokens holding a quote or a closing bracket; random walks favour them so that
    strings, arrays and objects end in a bounded number of steps."""
    texts = (smollm2_tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab.vocab_size))
    return np.array([any(c in t for c in '"]}') for t in texts])


class Address(BaseModel):
    city: str
    zip: Optional[str] = None  # the spelling pydantic users write


class Person(BaseModel):
    name: str
    age: int
    nickname: Optional[str] = None
    tags: list[str]
    address: Address


NESTED = {"type": "object", "properties": {"user": {"type": "object", "properties": {
    "name": {"type": "string"},
    "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                "additionalProperties": False}},
    "required": ["name", "address"], "additionalProperties": False}},
    "required": ["user"], "additionalProperties": False}
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested objects": NESTED,
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                "size": {"type": "string", "enum": ["S", "M", "L"]},
                                                "level": {"enum": [1, 2, 3]}},
              "required": ["color", "size", "level"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}},
        "required": ["tags", "matrix"], "additionalProperties": False},
    "required and additional": {"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
                                "required": ["id"]},
    "scalars": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                                  "ok": {"type": "boolean"}, "none": {"type": "null"}},
                "required": ["score", "ok", "none"], "additionalProperties": False},
    "pydantic": Person.model_json_schema(),
}
JSON_OBJECT = {"type": "object"}


def _format(schema: dict[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


def _force(grammar: Grammar, tok: Tokenizer, text: str):
    """A matcher fed text's tokens; PrefixportError at the first token the grammar forbids."""
    m = grammar.matcher()
    for token in tok.encode(text, add_special_tokens=False):
        allowed = m.allowed()
        m.advance(token)
        assert allowed[token]  # the mask agrees with advance
    return m


@pytest.mark.parametrize("schema,doc", [
    (JSON_OBJECT, {"id": 17, "title": "Weekly report", "done": False, "score": 0.75, "owner": {"name": "Ada"},
                   "labels": ["x", "y"], "note": None, "nested": [[1, {"deep": []}]]}),
    (NESTED, {"user": {"name": "Ada Lovelace", "address": {"city": "London"}}}),
    (SCHEMAS["pydantic"], {"name": "Ada", "age": 36, "nickname": None, "tags": ["math", "poetry"],
                           "address": {"city": "London", "zip": "SW1Y 4JH"}}),
])
@pytest.mark.parametrize("layout", [{}, {"separators": (",", ":")}, {"indent": 2}])
def test_a_valid_document_forced_token_by_token_finishes(smollm2_tokenizer, vocab, eos, schema, doc, layout):
    grammar = Grammar.from_response_format(_format(None if schema is JSON_OBJECT else schema), vocab)
    text = json.dumps(doc, **layout)
    m = _force(grammar, smollm2_tokenizer, text)
    assert m.finished
    assert np.flatnonzero(m.allowed()).tolist() == [eos]  # only end-of-sequence may follow
    m.advance(eos)
    assert m.finished
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text, False)) == text
    jsonschema.validate(json.loads(text), schema)


def _walk(grammar: Grammar, tok: Tokenizer, closing: np.ndarray, seed: int, steps: int = 600) -> str:
    """Greedy on masked random logits (wider than the tokenizer, as a model's head may be) until finished."""
    rng = np.random.default_rng(seed)
    m, ids = grammar.matcher(), []
    for _ in range(steps):
        logits = rng.standard_normal(len(closing) + 64).astype(np.float32)
        logits[: len(closing)][closing] += 3.0
        token = int(np.argmax(m.mask(logits)))
        m.advance(token)
        ids.append(token)
        if m.finished:
            return tok.decode(ids)
    raise AssertionError(f"not finished after {steps} steps: {tok.decode(ids)!r}")


@pytest.mark.parametrize("name", ["json_object", *SCHEMAS])
def test_random_logits_under_the_mask_give_valid_json(smollm2_tokenizer, vocab, closing, name):
    schema = SCHEMAS.get(name)
    grammar = Grammar.from_response_format(_format(schema), vocab)
    for seed in range(3):
        text = _walk(grammar, smollm2_tokenizer, closing, seed)
        value = json.loads(text)
        jsonschema.validate(value, schema or JSON_OBJECT)


def test_forbidden_tokens_get_minus_infinity(smollm2_tokenizer, vocab, eos):
    grammar = Grammar.from_response_format(_format(NESTED), vocab)
    m = grammar.matcher()
    logits = np.random.default_rng(0).standard_normal(vocab.vocab_size + 64).astype(np.float32)
    masked = m.mask(logits)
    allowed = m.allowed()
    assert masked.shape == logits.shape and masked.dtype == logits.dtype
    assert np.array_equal(masked[: vocab.vocab_size][allowed], logits[: vocab.vocab_size][allowed])
    assert np.all(masked[: vocab.vocab_size][~allowed] == -np.inf)
    assert np.all(masked[vocab.vocab_size:] == -np.inf)  # ids the tokenizer does not have
    assert 0 < allowed.sum() < 100  # the document must open with "{"
    for text in ("a", "[", '"', "<|im_start|>"):
        assert masked[smollm2_tokenizer.token_id(text) or smollm2_tokenizer.encode(text, False)[0]] == -np.inf
    assert masked[eos] == -np.inf  # not before the document is complete
    assert np.isfinite(masked[smollm2_tokenizer.encode("{", False)[0]])
    half = m.mask(logits.astype(np.float16))
    assert half.dtype == np.float16 and np.array_equal(np.isfinite(half[: vocab.vocab_size]), allowed)
    narrow = m.mask(logits[:1000])  # a head narrower than the tokenizer: its ids only
    assert np.array_equal(narrow, masked[:1000])
    in_place = logits.copy()
    assert m.mask(in_place, out=in_place) is in_place and np.array_equal(in_place, masked)


def test_a_forbidden_token_is_refused(smollm2_tokenizer, vocab, eos):
    m = Grammar.from_response_format(_format(NESTED), vocab).matcher()
    with pytest.raises(PrefixportError, match="not allowed"):
        m.advance(eos)
    with pytest.raises(PrefixportError, match="outside the tokenizer"):
        Grammar.from_response_format(_format(NESTED), vocab).matcher().advance(vocab.vocab_size + 3)


def test_whitespace_is_bounded(smollm2_tokenizer, vocab):
    grammar = Grammar.from_response_format(_format(None), vocab)
    for ok in ('{"a":1}', '{"a": 1}', '{\n  "a": [\n    1\n  ]\n}', '{\r\n\t\t"a" : 1}', '{\n' + " " * 32 + '"a": 1}'):
        assert _force(grammar, smollm2_tokenizer, ok).finished
    # a blank line, indentation beyond 32, two spaces, a tab without a line break, anything after the document
    for runaway in ('{\n\n"a": 1}', '{\n' + " " * 33 + '"a": 1}', '{"a":  1}', '{"a":\t1}', '{"a": 1} ', ' {"a": 1}'):
        with pytest.raises(PrefixportError):
            _force(grammar, smollm2_tokenizer, runaway)


@pytest.mark.parametrize("response_format,message", [
    ("json", "must be an object"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ({}, "response_format.type must be one of"),
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "'strict' a boolean"),
    (_format({"type": "nonsense"}), "invalid or not supported: Invalid type: nonsense"),
    (_format({"type": "object", "properties": {"a": {"type": "integer", "minimum": "one"}}}), "minimum"),
    (_format({"type": "object", "required": "a"}), "required"),
    (_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (_format({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     "keywords structured output does not support: uniqueItems"),
    (_format({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "does not support: not"),
    (_format({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}), "use anyOf"),
    (_format({"type": "string", "pattern": "(?=a)b"}), "look-around"),
    (_format({"type": "string", "format": "credit-card"}), "credit-card"),
    (_format({"$ref": "https://example.com/schema.json"}), "example.com"),
])
def test_bad_formats_and_unsupported_schemas_raise_input_error(vocab, response_format, message):
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("$", r"\$")):
        Grammar.from_response_format(response_format, vocab)


def test_no_grammar_for_text(vocab):
    assert Grammar.from_response_format(None, vocab) is None
    assert Grammar.from_response_format({"type": "text"}, vocab) is None


def test_grammars_are_cached_by_schema_in_its_key_order(smollm2_tokenizer, vocab):
    first = Grammar.from_response_format(_format(NESTED), vocab)
    renamed = {"type": "json_schema", "json_schema": {"name": "other", "schema": json.loads(json.dumps(NESTED))}}
    assert Grammar.from_response_format(renamed, vocab) is first  # name and strict do not change the grammar
    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
          "required": ["a", "b"], "additionalProperties": False}
    ba = {**ab, "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    g_ab, g_ba = (Grammar.from_response_format(_format(s), vocab) for s in (ab, ba))
    assert g_ab is not g_ba  # properties come out in the schema's order
    assert _force(g_ab, smollm2_tokenizer, '{"a": 1, "b": 2}').finished
    assert _force(g_ba, smollm2_tokenizer, '{"b": 2, "a": 1}').finished
    with pytest.raises(PrefixportError):
        _force(g_ba, smollm2_tokenizer, '{"a": 1, "b": 2}')


def test_the_cache_is_bounded(smollm2_tokenizer, eos):
    small = GrammarVocab(smollm2_tokenizer.to_json(), [eos], cache_size=2)
    grammars = [Grammar.from_response_format(_format({"type": "object", "title": str(i)}), small) for i in range(3)]
    assert Grammar.from_response_format(_format({"type": "object", "title": "2"}), small) is grammars[2]
    assert Grammar.from_response_format(_format({"type": "object", "title": "0"}), small) is not grammars[0]


def test_matchers_are_independent(smollm2_tokenizer, vocab, eos):
    """Rows on different grammars, and rows on one grammar, advanced interleaved, never see each other."""
    a = Grammar.from_response_format(_format(NESTED), vocab)
    b = Grammar.from_response_format(_format(SCHEMAS["enums"]), vocab)
    docs = [(a, '{"user": {"name": "Ada", "address": {"city": "London"}}}'),
            (b, '{"color": "red", "size": "M", "level": 2}'),
            (a, '{"user":{"name":"Bob","address":{"city":"Paris"}}}')]
    rows = [(g.matcher(), smollm2_tokenizer.encode(text, False)) for g, text in docs]
    start = a.matcher().allowed()
    for step in range(max(len(ids) for _, ids in rows)):
        for m, ids in rows:
            if step < len(ids):
                assert m.allowed()[ids[step]]
                m.advance(ids[step])
        if step == 5:
            assert np.array_equal(a.matcher().allowed(), start)  # a new row starts at the beginning
    assert all(m.finished for m, _ in rows)


def test_every_eos_id_ends_a_document(smollm2_tokenizer):
    eos_ids = [smollm2_tokenizer.token_id("<|im_end|>"), smollm2_tokenizer.token_id("<|endoftext|>")]
    two = GrammarVocab.from_tokenizer(smollm2_tokenizer, eos_ids)
    m = _force(Grammar.from_response_format(_format(None), two), smollm2_tokenizer, "{}")
    assert sorted(np.flatnonzero(m.allowed()).tolist()) == sorted(eos_ids)
    with pytest.raises(PrefixportError, match="end-of-sequence"):
        GrammarVocab.from_tokenizer(smollm2_tokenizer, [])


def test_one_grammar_serves_rows_on_several_threads(smollm2_tokenizer, vocab):
    from concurrent.futures import ThreadPoolExecutor

    grammar = Grammar.from_response_format(_format(NESTED), vocab)
    docs = [json.dumps({"user": {"name": f"user {i}", "address": {"city": f"city {i}"}}}) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda text: _force(grammar, smollm2_tokenizer, text).finished, docs))
