"""One tenant's legal-looking requests must not cost the others (docs/security.md, "Bounded work,
bounded state"): a poisoned row fails alone, every request's work is bounded before it starts,
per-client state is bounded and fair between keys, and nothing internal leaks. The real server
on 127.0.0.1 (`--keys`, prompt-lookup speculation), its scheduler and engine; no timed assertions."""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from prefixport.adapters.bundle import load_bundle, make_bundle, save_bundle
from prefixport.errors import ContextLengthError, InputError, NumericsError
from prefixport.runtime import Engine, Scheduler
from prefixport.runtime.sampling import MAX_SEED, MAX_TOP_K, PENALTY_RANGE, SamplingParams
from prefixport.server import ServerSettings, create_app
from prefixport.server.app import Server, as_api_error
from prefixport.server.protocol import AdapterLoad, ApiError, RequestLimits
from prefixport.server.tenants import Access, KeyRing, Penalties, digest

from .helpers import running

KEYS = {"admin": "adm-1", "a": "tenant-a", "b": "tenant-b"}
KEYS_FILE = "".join(f'[[key]]\nid = "{who}"\nsha256 = "{digest(key)}"\nrole = "{"admin" if who == "admin" else "user"}"\n\n'
                    for who, key in KEYS.items())
PROMPTS = ["The harbour at dawn", "Seven lighthouses", "A list of rivers:"]


def _poisoned(bundle_path, out) -> None:
    """A prefix whose keys and values are scaled to the edge of float32: finite (so the bundle
    checks pass) but large enough that attention overflows, so the row's logits are NaN or Inf."""
    bundle = load_bundle(bundle_path)
    meta = {k: v for k, v in bundle.metadata.items() if k not in ("format", "format_version", "kind", "name",
                                                                     "n_virtual", "dtype", "fingerprint", "peft_type")}
    tensors = {k: (v * np.float32(3e37)).astype(v.dtype) for k, v in bundle.tensors.items()}
    save_bundle(make_bundle(name="poison", kind=bundle.kind, tensors=tensors, fingerprint=bundle.metadata["fingerprint"],
                            peft_type=bundle.metadata["peft_type"], **meta), out)


@pytest.fixture(scope="module")
def attacked(tiny_export, tiny_adapters, tmp_path_factory):
    """(engine, url, adapters folder, keys file): a tenants' server with prompt-lookup speculation and
    a poisoned prefix beside a soft prompt."""
    folder = tmp_path_factory.mktemp("attack-adapters")
    shutil.copy(tiny_adapters("llama") / "prompt.safetensors", folder)
    _poisoned(tiny_adapters("llama") / "prefix.safetensors", folder / "poison.safetensors")
    keys_file = tmp_path_factory.mktemp("attack-keys") / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    engine = Engine.load(tiny_export("llama"), threads=1)
    access = Access(KeyRing(keys_file), penalties=Penalties(max_refused=10_000))  # the box: its own test
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder, speculative="prompt-lookup", max_batch=8),
                            access=access)) as url:
        yield engine, url, folder, keys_file
    engine.close()


def _post(url: str, path: str, who: str, body: dict | bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[who]}"}
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers=headers | {"Content-Type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def _alone(engine: Engine, prompt: str, adapter: str | None = None) -> list[int]:
    return engine.generate(prompt, adapter=adapter, max_new_tokens=12, stop_token_ids=[]).token_ids


# --- 1. one row's failure is that row's alone -------------------------------------------------

def test_a_poisoned_row_fails_alone_in_the_scheduler(attacked):
    engine = attacked[0]
    expected = [_alone(engine, p, a) for p, a in zip(PROMPTS, (None, "prompt", None))]
    with Scheduler(engine, max_batch=8, speculative="prompt-lookup") as scheduler:
        tickets = [scheduler.submit(p, adapter=a, max_new_tokens=12, stop_token_ids=[])
                   for p, a in zip(PROMPTS, (None, "prompt", None))]
        poisoned = scheduler.submit(PROMPTS[0], adapter="poison", max_new_tokens=12, stop_token_ids=[])
        with pytest.raises(NumericsError, match="not finite"):
            poisoned.result(timeout=60)
        assert [t.result(timeout=60).token_ids for t in tickets] == expected  # the same step, their usual tokens
        assert scheduler.alive
        assert scheduler.generate(PROMPTS[2], max_new_tokens=12, stop_token_ids=[]).token_ids == expected[2]


def test_a_poisoned_request_over_http_leaves_the_others(attacked):
    engine, url = attacked[:2]
    bodies = [("a", {"model": "poison", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})] + [
        ("b", {"model": m, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        for p, m in zip(PROMPTS, ("tiny", "prompt", "tiny"))]
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda wb: _post(url, "/v1/completions", *wb), bodies))
    assert got[0].status_code == 500 and got[0].json()["error"]["code"] == "non_finite_logits"
    for r, (p, m) in zip(got[1:], zip(PROMPTS, (None, "prompt", None))):
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(_alone(engine, p, m))


def test_sampling_bounds_are_400s_and_their_edges_stay_finite(attacked):
    engine, url = attacked[:2]
    for field, value in [("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("temperature", 1e-300),
                         ("temperature", 2.5), ("top_k", 2**40), ("seed", 2**64), ("top_p", 0)]:
        r = _post(url, "/v1/completions", "a", {"model": "tiny", "prompt": "hello there", "max_tokens": 5,
                                               field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    with pytest.raises(InputError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300)
    # the edges of every range sample finite tokens, on a prompt that repeats (the penalty applies)
    low, high = PENALTY_RANGE
    for params in [dict(temperature=0.01, seed=MAX_SEED), dict(temperature=100.0, top_k=MAX_TOP_K, seed=1),
                   dict(temperature=1.0, repetition_penalty=low, top_p=1e-9, seed=2),
                   dict(temperature=0.01, repetition_penalty=high, seed=3)]:
        result = engine.generate("a a a a a a", max_new_tokens=6, stop_token_ids=[], **params)
        assert len(result.token_ids) == 6, params


# --- 2. bounded work per request ----------------------------------------------------------------

def test_stops_choices_and_schemas_are_bounded_before_any_work(attacked):
    url = attacked[1]
    base = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for extra, param in [({"stop": list("abcde")}, "stop"), ({"stop": "x" * 257}, "stop"),
                         ({"stop": ["."] * 600_000, "n": 16}, "stop"),
                         ({"prompt": ["hi"] * 65}, "n"), ({"prompt": ["hi"] * 5, "n": 16}, "n")]:
        r = _post(url, "/v1/completions", "a", base | extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
    assert _post(url, "/v1/completions", "a", base | {"stop": ["x" * 256] * 4}).status_code == 200
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(2000)}}
    for schema in (deep, wide):
        r = _post(url, "/v1/chat/completions", "a", {"model": "tiny", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}],
                                                     "response_format": {"type": "json_schema",
                                                                         "json_schema": {"name": "s", "schema": schema}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text[:300]
        assert r.json()["error"]["code"] == "limit_exceeded"
    assert RequestLimits(max_stops=8).max_stops == 8
    with pytest.raises(InputError, match="max_stops"):
        RequestLimits(max_stops=0)


def test_a_settable_stop_bound(attacked):
    engine, _, folder = attacked[:3]
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder, limits=RequestLimits(max_stops=6)),
                            register_adapters=False)) as url:
        ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                       "stop": list("abcdef")})
        over = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                         "stop": list("abcdefg")})
    assert ok.status_code == 200
    assert over.status_code == 400 and "at most 6 stop strings" in over.json()["error"]["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud800 there", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud83d"}]}'),
    ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x", '
                             b'"name": "\\udc00"}]}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "cache_salt": "\\ud800"}'),
    ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], '
                             b'"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": '
                             b'{"type": "object", "properties": {"\\ud800": {"type": "string"}}}}}}'),
    ("/tokenize", b'{"prompt": "\\ud800"}'),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
])
def test_invalid_unicode_anywhere_is_a_400(attacked, path, body):
    r = _post(attacked[1], path, "a", body)
    assert r.status_code == 400, r.text
    assert "invalid Unicode" in r.json()["error"]["message"]
    # a valid surrogate pair (an emoji) is fine
    assert _post(attacked[1], "/tokenize", "a", b'{"prompt": "\\ud83d\\ude00"}').status_code == 200


# --- 3. bounded state per key -----------------------------------------------------------------

def test_prompt_lookup_history_is_bounded_fair_and_forgets_removed_adapters(attacked):
    engine, url, folder = attacked[:3]
    history = engine.prompt_lookup.stats().history
    assert history is not None and history.max_entries == 1024
    body = {"model": "tiny", "prompt": "count with me: one two", "max_tokens": 3, "temperature": 0}
    _post(url, "/v1/completions", "a", body | {"model": "prompt"})
    for salt in range(30):  # tenant b: a new salt each request
        assert _post(url, "/v1/completions", "b", body | {"cache_salt": f"s{salt}"}).status_code == 200
    stats = engine.prompt_lookup.stats().history
    assert stats.entries >= 31 and stats.owners >= 2
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    assert 'prefixport_bounded_entries{map="lookup_history"}' in metrics
    assert 'prefixport_bounded_max_entries{map="grammars"} 128.0' in metrics
    shutil.copy(folder / "prompt.safetensors", folder / "gone.safetensors")
    engine.add_adapter("gone", folder / "gone.safetensors")
    _post(url, "/v1/completions", "a", body | {"model": "gone"})
    with_gone = engine.prompt_lookup.stats().history.entries
    engine.remove_adapter("gone")
    assert engine.prompt_lookup.stats().history.entries == with_gone - 1


def test_a_flood_of_schemas_evicts_the_flooders_own_grammars(attacked):
    engine = attacked[0]

    def schema(i: int) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}}}

    for i in range(3):  # tenant a's schemas, in use
        engine.prepare("x", response_format=schema(i), tenant="a")
    vocab_cache = engine.stats().grammars
    for i in range(100, 100 + vocab_cache.max_entries + 20):  # tenant b floods the cache with new schemas
        engine.prepare("x", response_format=schema(i), tenant="b")
    stats = engine.stats().grammars
    assert stats.entries == stats.max_entries and stats.evictions >= 20
    hits = engine.stats().grammars.evictions
    for i in range(3):  # a's grammars are still cached: nothing compiled, nothing evicted
        engine.prepare("x", response_format=schema(i), tenant="a")
    assert engine.stats().grammars.evictions == hits


# --- 4. no leaks ------------------------------------------------------------------------------

def test_internal_errors_say_only_a_request_id(caplog):
    with caplog.at_level(logging.ERROR, logger="prefixport.server.app"):
        error = as_api_error(RuntimeError("secret detail /home/ops/keys.toml"))
    body = json.dumps(error.body)
    assert error.status == 500 and "secret" not in body and "RuntimeError" not in body
    request_id = error.headers["X-Request-Id"]
    assert request_id in error.body["error"]["message"] and error.body["error"]["code"] == "internal_error"
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)  # the detail is in the log


def test_with_keys_metrics_and_health_need_an_admin_key_by_default(attacked):
    engine, url, folder, keys_file = attacked
    for path in ("/metrics", "/health"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEYS['a']}"}).status_code == 403
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEYS['admin']}"}).status_code == 200
    public = Access(KeyRing(keys_file), private_ops=False)  # --public-metrics
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder),
                            access=public, register_adapters=False)) as open_url:
        assert httpx.get(open_url + "/health").status_code == 200


def test_adapter_paths_the_file_system_refuses_are_400s(attacked):
    engine, _, folder = attacked[:3]
    # the server POST /v1/adapters calls once an admin key is checked
    server = Server(engine, ServerSettings(model_name="tiny", adapters_dir=folder))
    try:
        for path in ("a" * 300 + ".safetensors", "é" * 200):  # over the file system's 255 bytes a name
            with pytest.raises(ApiError) as e:
                server.load_adapter(AdapterLoad(name="x", path=path))
            assert e.value.status == 400 and e.value.body["error"]["param"] == "path", path
        with pytest.raises(ValidationError):
            AdapterLoad(name="x", path="bad\x00.safetensors")
    finally:
        server.scheduler.close()


def test_a_huge_max_tokens_is_a_context_error(attacked):
    r = _post(attacked[1], "/v1/completions", "a", b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_megabytes_of_prompt_are_refused_without_tokenizing_them(attacked):
    engine, url = attacked[:2]
    tokenizer, limit = engine.tokenizer, engine.context_limit
    huge = "hello world " * (limit * tokenizer.max_token_chars // 12 + 1)  # over limit x the longest token
    long = "hello world " * limit  # under that bound: its first 8 x limit characters say it cannot fit
    for text in (huge, long):
        with pytest.raises(ContextLengthError, match="longer than the context"):
            engine.prepare(text)  # Engine.encode(text) alone encodes it whole: a caller may slice the ids
        r = _post(url, "/v1/completions", "a", {"model": "tiny", "prompt": text, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert _post(url, "/tokenize", "a", {"prompt": text}).status_code == 400
    fits = "hello " * (limit // 2)  # long in characters, within the context in tokens: encoded whole
    assert engine.encode(fits, limit=limit) == tokenizer.encode(fits)
    one_word = "x" * (9 * limit)  # the probe's last word may be cut: never counted, so encoded whole
    assert len(tokenizer.encode(one_word, limit=10 * limit)) == len(tokenizer.encode(one_word))


def test_a_key_that_keeps_sending_bad_requests_is_boxed_before_its_bodies_are_read(attacked):
    engine, _, folder, keys_file = attacked
    access = Access(KeyRing(keys_file), penalties=Penalties(max_refused=5, delay_s=0.05))
    bad = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "repetition_penalty": 1e-300}
    good = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder),
                            access=access, register_adapters=False)) as url:
        assert [_post(url, "/v1/completions", "a", bad).status_code for _ in range(6)] == [400] * 6
        boxed = _post(url, "/v1/completions", "a", bad)
        assert boxed.status_code == 429 and boxed.json()["error"]["code"] == "too_many_refused"
        assert int(boxed.headers["retry-after"]) >= 1
        # refused unread: not even a valid body of that key passes while it is boxed (it keeps the box shut)
        assert _post(url, "/v1/completions", "a", good).status_code == 429
        assert _post(url, "/v1/completions", "a", b"{" * 100).status_code == 429
        assert _post(url, "/v1/completions", "b", good).status_code == 200  # the other tenant: untouched
        for _ in range(7):  # unknown keys share one box, which no valid key is in
            httpx.post(url + "/v1/completions", json=good, headers={"Authorization": "Bearer nobody"})
        assert httpx.post(url + "/v1/completions", json=good, headers={"Authorization": "Bearer nobody"}
                          ).status_code == 429
        assert _post(url, "/v1/completions", "b", good).status_code == 200
    assert access.penalties.boxed >= 3


def test_a_refused_body_weighs_by_its_size():
    penalties = Penalties(max_refused=60)
    penalties.refused("big", body_bytes=2_400_000)  # 600,000 stop strings: counts 1 + 36
    assert not penalties.over("big")
    penalties.refused("big", body_bytes=2_400_000)
    assert penalties.over("big") == 74 and not penalties.over("small")
