"""A server shared between tenants (`--keys`): roles and model scopes, adapter admin, the prompt
cache per key, quotas, key reloads and the audit log; the real server on 127.0.0.1 and the openai
client."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from prefixport.errors import PrefixportError
from prefixport.runtime import Engine
from prefixport.server import ServerSettings, create_app
from prefixport.server.tenants import Access, KeyRing, digest, parse_keys

from .conftest import ADAPTER_VARIANTS
from .helpers import running

KEYS = {"admin": "adm-0123", "acme": "acme-4567", "beta": "beta-89ab", "burst": "burst-cdef", "tpm": "tpm-0011"}
KEYS_FILE = f"""
[[key]]
id = "admin"
key = "{KEYS['admin']}"
role = "admin"

[[key]]
id = "acme"
sha256 = "{digest(KEYS['acme'])}"
models = ["tiny", "prompt"]

[[key]]
id = "beta"
key = "{KEYS['beta']}"
models = ["prefix*"]

[[key]]
id = "burst"
key = "{KEYS['burst']}"
max_concurrent = 1

[[key]]
id = "tpm"
key = "{KEYS['tpm']}"
models = ["tiny"]
tokens_per_minute = 40
"""
LONG = list(range(5, 105))  # 100 token ids: three prompt-cache blocks of 32


@pytest.fixture(scope="module")
def tenants(tiny_export, tiny_adapters, tmp_path_factory):
    """A server with the keys above and adapter admin on: (engine, url, keys file, adapters folder)."""
    folder = tmp_path_factory.mktemp("tenant-adapters")
    for name in ADAPTER_VARIANTS:
        shutil.copy(tiny_adapters("llama") / f"{name}.safetensors", folder)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    engine = Engine.load(tiny_export("llama"), threads=1)
    access = Access(KeyRing(keys_file), adapter_admin=True)
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder), access=access)) as url:
        yield engine, url, keys_file, folder
    engine.close()


@pytest.fixture
def audited():
    """The `prefixport.audit` events logged while the test runs (JSON-decoded), read by a handler on that
    logger itself: `prefixport serve` run in this process (tests/test_async.py) stops its propagation."""
    events: list[dict] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: events.append(json.loads(record.getMessage()))
    logger = logging.getLogger("prefixport.audit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield events
    logger.removeHandler(handler)
    logger.setLevel(level)


def _client(url: str, who: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=KEYS.get(who, who), max_retries=0, timeout=60)


def test_keys_see_and_use_only_their_models(tenants):
    url = tenants[1]
    assert {m.id for m in _client(url, "admin").models.list()} == {"tiny", *ADAPTER_VARIANTS}
    assert {m.id for m in _client(url, "acme").models.list()} == {"tiny", "prompt"}
    assert {m.id for m in _client(url, "beta").models.list()} == {"prefix", "prefix-projection"}
    acme = _client(url, "acme")
    assert acme.completions.create(model="prompt", prompt="hi", max_tokens=2, temperature=0).choices[0].text
    # another tenant's adapter answers exactly as a name that does not exist: nothing says it is there
    errors = {}
    for name in ("prefix", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as e:
            acme.completions.create(model=name, prompt="hi", max_tokens=2)
        errors[name] = e.value.body
        with pytest.raises(openai.NotFoundError):
            acme.models.retrieve(name)
    assert errors["prefix"]["code"] == errors["no-such-adapter"]["code"] == "model_not_found"
    assert errors["prefix"]["message"].replace("prefix", "X") == errors["no-such-adapter"]["message"].replace(
        "no-such-adapter", "X")
    assert "prefix" not in errors["no-such-adapter"]["message"]
    with pytest.raises(openai.NotFoundError):  # beta may not use the base model
        _client(url, "beta").completions.create(model="tiny", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as e:
        _client(url, "not-a-key").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401


def test_adapter_admin_needs_an_admin_key_and_is_audited(tenants, audited, tiny_export):
    engine, url, _, folder = tenants
    shutil.copy(folder / "prompt.safetensors", folder / "fresh.safetensors")
    user = {"Authorization": f"Bearer {KEYS['acme']}"}
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    r = httpx.post(url + "/v1/adapters", json={"name": "fresh"}, headers=user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert httpx.delete(url + "/v1/adapters/prompt", headers=user).status_code == 403
    assert "prompt" in engine.adapters and "fresh" not in engine.adapters
    before = len(audited)
    assert httpx.post(url + "/v1/adapters", json={"name": "fresh"}, headers=admin).status_code == 200
    assert httpx.delete(url + "/v1/adapters/fresh", headers=admin).status_code == 200
    events = audited[before:]
    assert [(e["event"], e["key_id"], e["adapter"]) for e in events] == [
        ("adapter_registered", "admin", "fresh"), ("adapter_deleted", "admin", "fresh")]
    assert not any(k in json.dumps(e) for e in audited for k in KEYS.values())  # ids, never keys

    # off unless enabled: even an admin key (or, without keys, anyone) gets 403
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder), register_adapters=False)) as bare:
        r = httpx.post(bare + "/v1/adapters", json={"name": "fresh"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_admin_disabled"
        assert httpx.get(bare + "/metrics").status_code == 200  # open unless private_ops


def test_the_prompt_cache_is_each_keys_own(tenants):
    engine, url = tenants[:2]
    acme, admin = _client(url, "acme"), _client(url, "admin")

    def cached(client: OpenAI, **extra) -> int:
        r = client.completions.create(model="tiny", prompt=LONG, max_tokens=2, temperature=0, **extra)
        return r.usage.prompt_tokens_details.cached_tokens

    cached(acme)
    assert cached(acme) > 0  # acme's own prefix: a hit
    hits = engine.stats().prompt_cache.hits
    assert cached(admin) == 0  # another tenant, the same tokens: a miss, as if never sent
    assert cached(acme, extra_body={"cache_salt": "session-2"}) == 0  # a salt narrows within a key
    assert engine.stats().prompt_cache.hits == hits


def test_quotas_answer_429_and_spare_other_keys(tenants):
    url = tenants[1]
    burst, admin = _client(url, "burst"), _client(url, "admin")

    def call(client: OpenAI):
        try:
            return client.completions.create(model="tiny", prompt="count", max_tokens=100, temperature=0,
                                             extra_body={"ignore_eos": True})
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, [burst] * 4 + [admin] * 4))
    limited = [g for g in got[:4] if isinstance(g, openai.RateLimitError)]
    assert 1 <= len(limited) <= 3  # one at a time: the others refused at once
    assert limited[0].body["code"] == "rate_limit_exceeded" and limited[0].body["type"] == "requests"
    assert int(limited[0].response.headers["retry-after"]) >= 1
    assert all(not isinstance(g, Exception) and g.usage.completion_tokens == 100 for g in got[4:])
    assert not isinstance(call(burst), Exception)  # free again once those ended

    tpm = _client(url, "tpm")
    assert tpm.completions.create(model="tiny", prompt=LONG[:30], max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True}).usage.total_tokens == 50
    with pytest.raises(openai.RateLimitError) as e:  # 50 of 40 tokens this minute
        tpm.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.body["type"] == "tokens" and int(e.value.response.headers["retry-after"]) > 30
    assert admin.completions.create(model="tiny", prompt="hi", max_tokens=2).choices  # others unaffected


def test_keys_reload_under_load_without_a_failed_request(tenants, audited):
    url, keys_file = tenants[1], tenants[2]
    failures, done = [], threading.Event()

    def load():
        client = _client(url, "acme")
        while not done.is_set():
            try:
                client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                failures.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        _replace(keys_file, KEYS_FILE + '\n[[key]]\nid = "gamma"\nkey = "gamma-2222"\nmodels = ["tiny"]\n')
        deadline = time.monotonic() + 10
        while True:  # the file is looked at once a second
            try:
                _client(url, "gamma-2222").models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        _replace(keys_file, "[[key]]\nid = 'broken'\n")  # a bad file: the keys in force stay
        time.sleep(1.5)
        assert _client(url, "gamma-2222").models.list().data
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
        _replace(keys_file, KEYS_FILE)
    assert failures == []
    # (the reload of the file put back may come after these two)
    assert [e["event"] for e in audited][:2] == ["keys_reloaded", "keys_reload_failed"]
    assert audited[0]["keys"] == len(KEYS) + 1 and "sha256" in audited[1]["error"]


def _replace(path, text: str) -> None:
    """Write a keys file as an operator should: another file, then renamed over it (atomic)."""
    temp = path.with_suffix(".new")
    temp.write_text(text)
    os.replace(temp, path)


def test_bad_keys_files_are_refused_naming_the_entry(tmp_path):
    for text, message in [("[[key]]\nkey = 'k'\n", "key 1: needs an `id`"),
                          ("[[key]]\nid = 'a'\nkey = 'k'\nrole = 'root'\n", "role must be admin or user"),
                          ("[[key]]\nid = 'a'\nkey = 'k'\n[[key]]\nid = 'b'\nkey = 'k'\n", "used twice"),
                          ("[[key]]\nid = 'a'\nsha256 = 'abc'\n", "64 hex digits"),
                          ("[[key]]\nid = 'a'\nkey = 'k'\nmax_concurrent = 0\n", "positive integer"),
                          ("[[key]]\nid = 'a'\nkey = 'k'\nscopes = []\n", "unknown fields ['scopes']"),
                          ("[[key]\n", "not valid TOML")]:
        with pytest.raises(PrefixportError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_keys(text)
    with pytest.raises(PrefixportError, match="--keys or --api-key"):
        KeyRing(tmp_path / "keys.toml", "k")
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(PrefixportError, match="no keys"):
        KeyRing(tmp_path / "empty.toml")


def test_private_metrics_and_a_shared_prompt_cache(tenants):
    engine, _, keys_file, folder = tenants
    access = Access(KeyRing(keys_file), private_ops=True, shared_prompt_cache=True)
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder), access=access)) as url:
        for path in ("/metrics", "/health"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEYS['acme']}"}).status_code == 403
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEYS['admin']}"}).status_code == 200
        prompt = LONG[::-1]  # shared on purpose: one key's prefix is another's hit
        _client(url, "acme").completions.create(model="tiny", prompt=prompt, max_tokens=1)
        r = _client(url, "admin").completions.create(model="tiny", prompt=prompt, max_tokens=1)
        assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_cli_serve_with_keys_reloads_on_sighup(tiny_export, tenants, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "prefixport.cli", "serve", str(tiny_export("llama")), "--port", str(port),
           "--model-name", "tiny", "--keys", str(keys_file), "--private-metrics", "--threads", "1"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stderr=err)
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=admin).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 401
        proc.send_signal(signal.SIGHUP)  # reload now, the file unchanged
        for _ in range(100):
            if "keys_reloaded" in log.read_text():
                break
            time.sleep(0.1)
        assert _client(f"http://127.0.0.1:{port}", "acme").models.list().data
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    said = log.read_text()
    assert proc.returncode == 0, said
    events = [json.loads(line) for line in said.splitlines() if line.startswith('{"time"')]
    assert [e["event"] for e in events] == ["keys_loaded", "keys_reloaded"] and events[0]["keys"] == len(KEYS)
