"""Structured output (`response_format`): grammar-constrained rows in mixed batches, through the
engine, the server, the official `openai` client's `parse` and langchain-openai; outputs validate
with `jsonschema`."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import httpx
import jsonschema
import pytest
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

from prefixport.errors import SchemaError
from prefixport.runtime import Engine
from prefixport.server import ServerSettings, create_app

from .helpers import running

# Bounded fields: a random tiny model must still finish a document within its context (it fills
# every whitespace slot the grammar allows: about 60-180 tokens for this schema).
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 99},
                         "kind": {"enum": ["cat", "dog"]}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}


class Pet(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)
    kind: Literal["cat", "dog"]
    owner: Optional[str] = Field(default=None, max_length=6)


@pytest.fixture(scope="module")
def engine(llama_engine):
    return llama_engine


def test_constrained_and_free_rows_share_a_batch(engine):
    """Schemas, json_object and free rows, each with its own adapter, in one batch: every
    constrained row is valid and complete, and every row gives what it gives alone."""
    rows = [("A pet:", None, JSON_SCHEMA), ("Hello", "prefix", None), ("pet", "prompt", JSON_OBJECT),
            ("Another pet", "ptuning-lstm", JSON_SCHEMA), ("Free text", None, None)]
    batch = [engine.prepare(p, adapter=a, max_new_tokens=200, response_format=f, temperature=0.7, seed=5)
             for p, a, f in rows]
    tokens: list[list[int]] = [[] for _ in rows]
    for i, token in engine.run_rows(batch):
        tokens[i].append(token)
    for (prompt, adapter, fmt), got in zip(rows, tokens):
        alone = engine.generate(prompt, adapter=adapter, max_new_tokens=200, response_format=fmt, temperature=0.7,
                                seed=5)
        assert got == alone.token_ids
        if fmt is None:
            continue
        assert alone.finish_reason == "stop" and alone.token_ids[-1] not in engine.eos_token_ids
        value = json.loads(alone.text)
        if fmt is JSON_SCHEMA:
            jsonschema.validate(value, SCHEMA)
        else:
            assert isinstance(value, dict)


def test_bad_schemas_are_refused_before_any_work(engine):
    bad = [({"type": "json_schema"}, "needs a 'json_schema' object"),
           ({"type": "xml"}, "must be one of"),
           ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
           ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
            "uniqueItems")]
    for fmt, message in bad:
        with pytest.raises(SchemaError, match=message):
            engine.generate("x", response_format=fmt)


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured-adapters")
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder), register_adapters=False)) as url:
        yield url


def test_openai_parse_and_json_object_over_http(engine, url):
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for model in ("tiny", "prefix"):
        r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "A pet, as JSON"}],
                                          response_format=Pet, max_tokens=200, temperature=0)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), Pet.model_json_schema())
    out = client.completions.create(model="prompt", prompt="pet", max_tokens=200, temperature=0.5, seed=1,
                                    extra_body={"response_format": JSON_OBJECT})
    assert isinstance(json.loads(out.choices[0].text), dict)
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pet"}],
                                              max_tokens=200, temperature=0, stream=True, response_format=JSON_SCHEMA)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)),
                        SCHEMA)


def test_langchain_with_structured_output(url):
    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=200,
                     max_retries=0)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet")  # method="json_schema", langchain's default
    assert isinstance(pet, Pet)
    value = llm.with_structured_output(None, method="json_mode").invoke("Describe a pet as JSON")
    assert isinstance(value, dict)


def test_bad_schema_over_http_is_a_clear_400_and_disturbs_no_one(engine, url):
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    want = engine.generate("Free text", max_new_tokens=30, stop_token_ids=[]).text

    def good() -> str:
        return client.completions.create(model="tiny", prompt="Free text", max_tokens=30, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(3) as pool:
        running_ = [pool.submit(good) for _ in range(2)]
        for fmt, message in [({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "nonsense"),
                             ({"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}, "not"),
                             ({"type": "yaml"}, "must be one of")]:
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": fmt})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "response_format" and message in error["message"]
        assert [f.result() for f in running_] == [want] * 2


@pytest.mark.slow
def test_the_default_model_fills_a_schema_through_the_clients(default_export, tmp_path):
    """The real model: the openai client's parse and langchain-openai give schema-valid objects."""
    class Person(BaseModel):
        name: str
        age: int
        city: str

    engine = Engine.load(default_export)
    shutil.rmtree(tmp_path / "adapters", ignore_errors=True)
    with running(create_app(engine, ServerSettings(model_name="smol"), register_adapters=False)) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        text = "Extract the person as JSON: Alice is 30 years old and lives in Paris."
        r = client.chat.completions.parse(model="smol", messages=[{"role": "user", "content": text}],
                                          response_format=Person, max_tokens=60, temperature=0)
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), Person.model_json_schema())
        llm = ChatOpenAI(base_url=base + "/v1", api_key="unused", model="smol", temperature=0, max_tokens=60)
        assert isinstance(llm.with_structured_output(Person).invoke(text), Person)
    engine.close()
