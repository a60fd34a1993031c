"""Ray Serve on a Ray cluster of the test's own, started as an operator starts one (`ray start --head`,
with the token authentication current Ray turns on): the application deployed with `serve deploy` from
a config file, a second one with `prefixport serve --ray` beside it, both driven by the official openai
client over 127.0.0.1. Replicas hold the base model and an LRU of adapters (serve.multiplexed); the
ingress checks keys, scopes, quotas and the body size before any replica is contacted."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install 'prefixport[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install 'prefixport[ray]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prefixport.runtime import Engine  # noqa: E402
from prefixport.server import ServerSettings, create_app  # noqa: E402
from prefixport.server.ray_metrics import push_metrics  # noqa: E402
from prefixport.server.ray_serve import (APP_NAME, INGRESS, REFRESH_S, REPLICA, SCHEDULE_WARN_S, AppArgs,  # noqa: E402
                                         app_builder)

from .conftest import ADAPTER_VARIANTS  # noqa: E402
from .helpers import running  # noqa: E402

RAY_ADAPTERS = (*ADAPTER_VARIANTS, "lora", "ia3")  # the export takes --lora: a LoRA and an IA3 beside them

SERVE_CONFIG: dict[str, Path] = {}  # the application's `serve deploy` config (ray_served writes it)
REPLICAS, MAX_ADAPTERS = 2, 1  # 4 adapters, 2 replicas holding at most 1 each: the LRU must evict
PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京"]
BIN = Path(sys.executable).parent  # ray, serve and prefixport of this environment
MAX_BODY = 1 << 16  # the first application's max_body_mb (MiB): 0.0625
# Both applications' keys: `user` may use every model, `acme` its own, `capped` one token a minute.
KEYS = """\
[[key]]
id = "ops"
key = "ops-key"
role = "admin"
[[key]]
id = "user"
key = "user-key"
[[key]]
id = "acme"
key = "acme-key"
models = ["tiny", "prompt", "acme-*"]
max_concurrent = 1
[[key]]
id = "capped"
key = "capped-key"
tokens_per_minute = 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} failed: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster: `ray start --head` with RAY_AUTH_MODE=token and the token in
    RAY_AUTH_TOKEN (docs/ray.md), the dashboard on (`serve deploy` talks to it). Yields
    (environment for Ray clients, dashboard address, GCS address); `ray stop` after."""
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        _run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
              f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
              f"--num-cpus={REPLICAS + 1}", f"--temp-dir={temp}", "--object-store-memory=100000000",
              "--disable-usage-stats"], env)
        yield env, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}"
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_running(env: dict, dashboard: str, app: str, timeout: float = 300) -> None:
    """Poll `serve status` (through the dashboard, with the token) until `app` is RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        status = _run([BIN / "serve", "status", f"--address={dashboard}", f"--name={app}"], env).stdout
        if "status: RUNNING" in status:
            return
        assert "DEPLOY_FAILED" not in status and time.monotonic() < deadline, status
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_served(tiny_model, tiny_adapters, tmp_path_factory, cluster):
    """The application over the tiny Llama exported with --lora and its six adapters (the four prompt
    and prefix variants, a LoRA, an IA3), deployed with `serve deploy`
    CONFIG on the cluster: (engine, url, adapters folder). `engine` is a plain Engine in this process, the reference.
    Its ingress has the KEYS with /metrics and /health public (`private_ops: false`) and a MAX_BODY
    limit. This process joins the cluster too (with the token), to ask the replicas what they hold."""
    from peft import IA3Config, LoraConfig
    from transformers import AutoModelForCausalLM

    from prefixport.adapters import convert_checkpoint
    from prefixport.exporter import LoraOptions, export_model

    from . import peft_helpers as ph

    env, dashboard, gcs = cluster
    export = tmp_path_factory.mktemp("ray-export") / "export"
    export_model(export, model=str(tiny_model("llama")), lora=LoraOptions())
    folder = tmp_path_factory.mktemp("ray-adapters")
    for name in ADAPTER_VARIANTS:  # converted for the plain export: the same base model, so they fit
        shutil.copy(tiny_adapters("llama") / f"{name}.safetensors", folder)
    peft = tmp_path_factory.mktemp("ray-peft")
    for name, config in (("lora", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)),
                         ("ia3", IA3Config(init_ia3_weights=False))):
        ph.random_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_model("llama")), config, peft / name)
        convert_checkpoint(peft / name, export, name=name, out=folder / f"{name}.safetensors")
    port = _free_port()
    config = SERVE_CONFIG["path"] = tmp_path_factory.mktemp("ray-config") / "serve.yaml"
    keys = config.with_name("keys.toml")
    keys.write_text(KEYS)
    config.write_text(f"""\
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: {APP_NAME}
    route_prefix: /
    import_path: prefixport.server.ray_serve:app_builder
    args: {{outdir: "{export}", adapters_dir: "{folder}", model_name: tiny, max_batch: 4,
            replicas: {REPLICAS}, max_adapters: {MAX_ADAPTERS}, replica_cpus: 1, threads: 1,
            keys_file: "{keys}", private_ops: false, max_body_mb: {MAX_BODY / 2**20}, max_stops: 5}}
""")
    _run([BIN / "serve", "deploy", f"--address={dashboard}", config], env)
    _wait_running(env, dashboard, APP_NAME)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({k: env[k] for k in saved})
    _reread_ray_config()  # a fresh process (the CLI, a driver) reads them at start; this one has started
    ray.init(address=gcs, log_to_driver=False)
    try:
        engine = Engine.load(export, threads=1)
        for name in RAY_ADAPTERS:
            engine.add_adapter(name, folder / f"{name}.safetensors")
        yield engine, f"http://127.0.0.1:{port}", folder
        engine.close()
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        _reread_ray_config()


def _reread_ray_config() -> None:
    """Make this process's Ray see RAY_AUTH_MODE as set now (what Ray does when it turns token
    authentication on itself: `authentication_token_setup._enable_token_auth`)."""
    from ray._raylet import Config

    Config.initialize("")


@pytest.fixture
def client(ray_served):
    return _client(ray_served, "user-key")


def _client(ray_served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=ray_served[1] + "/v1", api_key=key, max_retries=0, timeout=60)


def _ingress_counters() -> dict[str, int]:
    """The first application's ingress: how often it looked up the models, asked a replica, and sent a
    request again after its replica died."""
    return serve.get_deployment_handle(INGRESS, app_name=APP_NAME).counters.remote().result()


def _adapter(model: str) -> str | None:
    return None if model == "tiny" else model


def _replicas_state() -> dict[str, dict]:
    """replica id -> its `describe()` (asked until every replica has answered)."""
    handle = serve.get_deployment_handle(REPLICA, app_name=APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(100):
        info = handle.describe.remote().result()
        seen[info["replica"]] = info
        if len(seen) == REPLICAS:
            return seen
    raise AssertionError(f"only {len(seen)} of {REPLICAS} replicas answered")


def _wait_replicas(ready: Callable[[dict], bool], timeout: float = 240) -> None:
    """Until REPLICAS replicas answer, each `ready`, three times in a row (a rolling update or a
    replacement has settled)."""
    deadline, settled = time.monotonic() + timeout, 0
    while settled < 3:
        try:
            state = _replicas_state()
            settled = settled + 1 if all(ready(info) for info in state.values()) else 0
        except AssertionError:  # a replica is being replaced
            settled = 0
        assert time.monotonic() < deadline, "the replicas did not settle"
        time.sleep(1)


def _check_lru(state: dict[str, dict]) -> None:
    """Every replica holds at most MAX_ADAPTERS adapters, all of them real ones."""
    for replica, info in state.items():
        assert info["max_adapters"] == MAX_ADAPTERS
        assert len(info["registered"]) <= MAX_ADAPTERS, (replica, info["registered"])
        assert set(info["registered"]) <= set(RAY_ADAPTERS)


def _loads(state: dict[str, dict]) -> int:
    return sum(n for info in state.values() for n in info["loads"].values())


def test_models_lists_the_base_and_every_adapter_in_the_folder(client):
    assert {m.id for m in client.models.list()} == {"tiny", *RAY_ADAPTERS}
    assert client.models.retrieve("prefix").parent == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_completions_for_the_base_and_each_adapter_equal_the_engine_alone(ray_served, client):
    engine = ray_served[0]
    # every adapter twice, the first ones again after the LRU evicted them
    models = ["tiny", *RAY_ADAPTERS, "tiny", *RAY_ADAPTERS]
    for i, model in enumerate(models):
        prompt, n = PROMPTS[i % len(PROMPTS)], 5 + i % 4
        got = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
        assert got.choices[0].text == engine.generate(prompt, adapter=_adapter(model), max_new_tokens=n).text, model
        assert got.model == model
        assert got.usage.completion_tokens <= n
    state = _replicas_state()
    _check_lru(state)
    # 4 adapters on 2 replicas keeping 1 each: some were evicted (unregistered) and registered again
    assert _loads(state) > REPLICAS * MAX_ADAPTERS


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(client):
    client.completions.create(model="prefix", prompt="warm", max_tokens=2, temperature=0)
    time.sleep(1.5)  # replicas push the ids they hold every 0.1 s; the routers learn them from the controller
    before = _replicas_state()
    # Usually one replica holds it; two may, when an earlier request reached a replica before the
    # routers learned where it was (Ray's multiplexed routing is best effort while they learn).
    holders = [r for r, info in before.items() if "prefix" in info["registered"]]
    assert holders
    for i in range(8):
        client.completions.create(model="prefix", prompt=PROMPTS[i % 3], max_tokens=2, temperature=0)
    after = _replicas_state()
    assert _loads(after) == _loads(before)  # not registered anywhere again: every request went to a holder
    assert all("prefix" in after[h]["registered"] for h in holders)


def test_concurrent_requests_across_adapters_equal_each_alone(ray_served, client):
    """Requests for more adapters than a replica keeps, at once: evictions never break a running one."""
    engine = ray_served[0]
    jobs = [(PROMPTS[i % 3], ["tiny", *RAY_ADAPTERS][i % 7], 4 + i % 5) for i in range(21)]

    def call(job):
        prompt, model, n = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, jobs))
    expected = [engine.generate(p, adapter=_adapter(m), max_new_tokens=n).text for p, m, n in jobs]
    assert got == expected


def test_streamed_chat_and_completions_equal_the_engine_alone(ray_served, client):
    engine = ray_served[0]
    for i, model in enumerate(["prefix-projection", "tiny", "prompt", "ptuning-lstm"]):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=7, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == engine.generate(messages, adapter=_adapter(model), max_new_tokens=7).text, model
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 7

        stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
        chunks = list(stream)  # the ingress counts tokens from a usage chunk it asks for and keeps to itself
        assert all(c.usage is None for c in chunks)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == engine.generate(PROMPTS[0], adapter=_adapter(model), max_new_tokens=6).text, model


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # streaming: the status comes before any event
        client.chat.completions.create(model="../prefix", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="prefix", prompt="hi", max_tokens=2, logit_bias={"1": 1.0})
    assert info.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"
    # the request bounds (max_stops: 5 in the config) and valid Unicode, at the ingress
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, stop=list("abcde")).choices
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, stop=list("abcdef"))
    assert info.value.body["param"] == "stop" and "at most 5" in info.value.body["message"]
    r = httpx.post(str(client.base_url) + "completions", content=b'{"model": "tiny", "prompt": "hi \\ud800"}',
                   headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "invalid Unicode" in r.json()["error"]["message"]
    _check_lru(_replicas_state())  # the unknown ids never entered a replica's LRU


def test_app_builder_refuses_settings_that_cannot_work(tmp_path):
    """`serve run ...:app_builder` takes the flat command-line arguments and makes them one
    BackendSettings, refused before anything is deployed (no Ray needed)."""
    from prefixport.errors import DeviceError, PrefixportError

    with pytest.raises(DeviceError, match="the tensorrt backend runs on an NVIDIA GPU"):
        app_builder(AppArgs(outdir=str(tmp_path), backend="tensorrt", device="cpu"))
    with pytest.raises(PrefixportError, match="--precision is for the tensorrt backend"):
        app_builder(AppArgs(outdir=str(tmp_path), precision="fp16"))


def test_logprobs_echo_and_structured_output_through_ray(ray_served, client):
    """The API for real clients runs on Ray replicas as on `prefixport serve` (the same Server)."""
    import json

    engine = ray_served[0]
    r = client.completions.create(model="prompt", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    score = engine.score(PROMPTS[0], adapter="prompt", top_logprobs=1)
    assert r.choices[0].text == PROMPTS[0]
    assert r.choices[0].logprobs.token_logprobs == [None] + [lp.logprob for lp in score.logprobs[1:]]
    chat = client.chat.completions.create(model="prefix", messages=[{"role": "user", "content": "pet"}],
                                          max_tokens=200, temperature=0, logprobs=True, top_logprobs=2,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    assert len(chat.choices[0].logprobs.content) >= 2


def test_ingress_metrics_gather_every_replica(ray_served, client):
    """/metrics on the ingress: the replicas' prefixport counters, one `replica` label each."""
    before = time.monotonic()
    for model in ["tiny", "prompt", "tiny", "prefix"]:
        client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    for _ in range(30):
        time.sleep(1)  # replicas push every METRICS_PUSH_S
        body = httpx.get(ray_served[1] + "/metrics", timeout=30).text
        counts = [line for line in body.splitlines() if line.startswith("prefixport_generation_tokens_total{")]
        if sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= 12 or time.monotonic() - before > 25:
            break
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= 12, body
    assert all('replica="' in line for line in counts)
    replicas = {line.split('replica="')[1].split('"')[0] for line in body.splitlines() if 'replica="' in line}
    assert replicas - {INGRESS} and len(replicas - {INGRESS}) == REPLICAS
    assert "prefixport_kv_cache_bytes{" in body and "prefixport_adapter_hits_total{" in body
    requests = [line for line in body.splitlines() if line.startswith("prefixport_requests_total{")]
    assert any('model="prompt"' in line and 'status="200"' in line and f'replica="{INGRESS}"' in line
               for line in requests), body  # counted by the same middleware as the plain server's

    # every family the plain server exports after the same requests is there (the ingress adds none)
    plain_engine = Engine.load(ray_served[0].folder, threads=1)
    with running(create_app(plain_engine, ServerSettings(model_name="tiny", adapters_dir=ray_served[2]))) as url:
        plain = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for model in ["tiny", "prompt", "tiny", "prefix"]:
            plain.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0)
        plain_body = httpx.get(url + "/metrics", timeout=30).text
    plain_engine.close()
    families = lambda text: {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}  # noqa: E731
    assert families(plain_body) == families(body), families(plain_body) ^ families(body)


def test_a_second_application_beside_it_with_the_cli(ray_served, cluster, tmp_path):
    """`prefixport serve --ray` on a cluster where Serve runs: the cluster's port is used and said,
    the same application name is refused, another name and route prefix deploy beside the first;
    stopping it (SIGTERM) deletes it alone."""
    env, dashboard, gcs = cluster
    engine, url, folder = ray_served
    port = url.rsplit(":", 1)[1]
    cli = {**env, "RAY_ADDRESS": gcs}
    base = [BIN / "prefixport", "serve", engine.folder, "--ray", "--model-name", "tiny", "--adapters", folder, "--replicas", "1",
            "--max-adapters", "1", "--threads", "1"]
    refused = subprocess.run([str(a) for a in base], env=cli, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1
    assert f"an application named '{APP_NAME}' already runs on this Ray cluster" in refused.stderr
    assert "--replace" in refused.stderr

    keys = tmp_path / "keys.toml"  # the ingress checks keys and scopes; replicas trust it
    keys.write_text(KEYS)
    log = tmp_path / "second.log"
    with log.open("w") as out:  # with --keys, /metrics and /health are private unless --public-metrics
        second = subprocess.Popen([str(a) for a in base + ["--port", str(_free_port()), "--app-name", "second",
                                                           "--route-prefix", "/second", "--keys", keys,
                                                           "--max-body-mb", "0.01"]], env=cli, stderr=out)  # 10,485 bytes
    try:
        deadline = time.monotonic() + 300
        while "serving application" not in (said := log.read_text()):
            assert second.poll() is None and time.monotonic() < deadline, said
            time.sleep(1)
        assert f"Serve already runs on this cluster with its HTTP proxy on 127.0.0.1:{port}" in said, said
        assert f"serving application 'second' on http://127.0.0.1:{port}/second/v1" in said, said
        other = openai.OpenAI(base_url=f"{url}/second/v1", api_key="acme-key", max_retries=0, timeout=60)
        got = other.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=5, temperature=0)
        assert got.choices[0].text == engine.generate(PROMPTS[1], adapter="prompt", max_new_tokens=5).text
        assert {m.id for m in other.models.list()} == {"tiny", "prompt"}
        with pytest.raises(openai.NotFoundError):  # not acme's: as if it did not exist
            other.completions.create(model="prefix", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/second/v1", api_key="nope", max_retries=0).models.list()
        for route in ["metrics", "health"]:
            assert httpx.get(f"{url}/second/{route}", timeout=60).status_code == 401
            assert httpx.get(f"{url}/second/{route}", headers={"Authorization": "Bearer acme-key"},
                             timeout=60).status_code == 403
            assert httpx.get(f"{url}/second/{route}", headers={"Authorization": "Bearer ops-key"},
                             timeout=60).status_code == 200
        big = httpx.post(f"{url}/second/v1/completions", content=b"x" * 10_486, timeout=60,
                         headers={"Authorization": "Bearer acme-key"})  # --max-body-mb counts MiB (2^20 bytes)
        assert big.status_code == 413 and "over 10485 bytes" in big.json()["error"]["message"]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=120)
    status = _run([BIN / "serve", "status", f"--address={dashboard}"], env).stdout
    assert "second" not in status and APP_NAME in status  # the first application goes on
    first = openai.OpenAI(base_url=f"{url}/v1", api_key="user-key", max_retries=0, timeout=60)
    assert first.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices[0].text


def test_sigterm_while_replicas_cannot_be_scheduled_removes_the_application(ray_served, cluster, tmp_path):
    """`prefixport serve --ray --replica-cpus 64` on a 3-CPU cluster: the deployment waits; within
    SCHEDULE_WARN_S the CLI says what each replica reserves and what is free; SIGTERM then (during the
    deployment) deletes the application, and the first one goes on."""
    env, dashboard, gcs = cluster
    engine, url, folder = ray_served
    log = tmp_path / "stuck.log"
    with log.open("w") as out:
        stuck = subprocess.Popen([str(a) for a in [BIN / "prefixport", "serve", engine.folder, "--ray", "--adapters",
                                                   folder, "--app-name", "stuck", "--route-prefix", "/stuck",
                                                   "--replica-cpus", "64", "--threads", "1"]],
                                 env={**env, "RAY_ADDRESS": gcs}, stderr=out)
    try:
        deadline = time.monotonic() + SCHEDULE_WARN_S + 120
        while "are not running after" not in (said := log.read_text()):
            assert stuck.poll() is None and time.monotonic() < deadline, said
            time.sleep(1)
        assert "each of the 1 reserves 64 CPU and the cluster has" in said, said
        assert "stuck" in _run([BIN / "serve", "status", f"--address={dashboard}"], env).stdout
    finally:
        stuck.send_signal(signal.SIGTERM)
        stuck.wait(timeout=120)
    status = _run([BIN / "serve", "status", f"--address={dashboard}"], env).stdout
    assert "stuck" not in status and APP_NAME in status, status


def test_a_body_over_the_limit_is_413_at_the_ingress(ray_served):
    """Refused as it arrives, before anything parses it (the body is not even JSON): by its
    Content-Length, or counted when it comes chunked."""
    url, auth = ray_served[1] + "/v1/completions", {"Authorization": "Bearer user-key"}
    big = b"x" * (MAX_BODY + 1)
    for content in [big, iter([big[:MAX_BODY // 2], big[MAX_BODY // 2:]])]:  # the second: no length, chunked
        r = httpx.post(url, content=content, headers=auth, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=big[:MAX_BODY], headers=auth, timeout=60)  # at the limit: read, then refused as JSON
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_scopes_and_made_up_models_cost_the_replicas_nothing(ray_served):
    """A model outside the key's scope, existing or not, is the same 404 as one that does not exist,
    and the ingress never looks the models up for it; made-up names within the scope look them up
    each time, but a replica is asked at most once per REFRESH_S."""
    acme = _client(ray_served, "acme-key")
    assert {m.id for m in acme.models.list()} == {"tiny", "prompt"}
    before = _ingress_counters()
    texts = set()
    for model in ["prefix", "made-up"]:  # another key's adapter; no one's
        with pytest.raises(openai.NotFoundError) as info:
            acme.completions.create(model=model, prompt="hi", max_tokens=2)
        texts.add(info.value.body["message"].replace(f"`{model}`", "`M`"))
        with pytest.raises(openai.NotFoundError) as info:
            acme.models.retrieve(model)
        texts.add(info.value.body["message"].replace(f"`{model}`", "`M`"))
    assert _ingress_counters() == before  # out of scope: not even looked up
    flood, start = 20, time.monotonic()
    for i in range(flood):
        with pytest.raises(openai.NotFoundError) as info:
            acme.completions.create(model=f"acme-made-up-{i}", prompt="hi", max_tokens=2)
        texts.add(info.value.body["message"].replace(f"`acme-made-up-{i}`", "`M`"))
    elapsed = time.monotonic() - start
    assert len(texts) == 1 and "prefix" not in texts.pop()  # one text, naming only acme's models
    after = _ingress_counters()
    assert after["catalog_asked"] - before["catalog_asked"] == flood
    # not a bound on time: however slow the machine, at most one replica call per REFRESH_S
    assert after["catalog_refreshes"] - before["catalog_refreshes"] <= 1 + elapsed / REFRESH_S


def test_a_key_over_its_quota_gets_429_before_any_replica(ray_served):
    """`capped` spends its minute's token; then even a made-up model is a 429, not a 404: the quota
    is checked before the request is routed (the models are not even looked up)."""
    capped = _client(ray_served, "capped-key")
    assert capped.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).usage.total_tokens > 1
    before = _ingress_counters()
    for model in ["tiny", "prompt", "capped-made-up"]:
        with pytest.raises(openai.RateLimitError) as info:
            capped.completions.create(model=model, prompt="hi", max_tokens=2)
        assert info.value.body["code"] == "rate_limit_exceeded" and info.value.body["type"] == "tokens"
        assert info.value.response.headers["retry-after"]
    assert _ingress_counters() == before
    assert _client(ray_served, "user-key").completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_metrics_and_health_follow_private_ops(ray_served):
    """The first application has a keys file and `private_ops: false`: /metrics and /health are
    open (the second application, with --keys and no flag, has them private)."""
    assert httpx.get(ray_served[1] + "/health", timeout=60).json()["status"] == "ok"
    assert httpx.get(ray_served[1] + "/metrics", timeout=60).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(ray_served, "nope").models.list()


def test_the_metrics_thread_outlives_any_error(monkeypatch, caplog):
    """A replica's metrics thread logs an unexpected error once (not at every push) and goes on."""
    import threading
    from types import SimpleNamespace

    from prefixport.server import ray_metrics

    pushed: list[str] = []
    errors = iter([RuntimeError("GCS unreachable"), RuntimeError("GCS unreachable"), ValueError("no board")])

    def get_actor(name: str, namespace: str) -> SimpleNamespace:
        error = next(errors, None)
        if error is not None:
            raise error
        return SimpleNamespace(put=SimpleNamespace(remote=lambda replica, text: pushed.append(text)))

    class FivePushes(threading.Event):
        """Stops the loop after five rounds, without waiting between them."""

        def __init__(self) -> None:
            super().__init__()
            self.rounds = 0

        def wait(self, timeout: float | None = None) -> bool:
            self.rounds += 1
            return self.rounds >= 5

    monkeypatch.setattr(ray_metrics.ray, "get_actor", get_actor)
    with caplog.at_level("ERROR", logger=ray_metrics.log.name):
        push_metrics("metrics:app", "r1", lambda: b"m 1\n", FivePushes())
    assert pushed == ["m 1\n", "m 1\n"]  # the two rounds after the errors
    assert [r.exc_info[1].args[0] for r in caplog.records] == ["GCS unreachable"]


def _one_request(url: str, i: int, max_tokens: int) -> str:
    """Request `i` of a load (the base model and adapters in turn, every other one streamed):
    "ok", "failed: ..." (an HTTP error, nothing streamed), or "broken" (a stream that ended with an
    error event, which must name a request id and no internals)."""
    model = ["tiny", "prompt", "prefix", "lora"][i % 4]
    body = {"model": model, "prompt": PROMPTS[i % 3], "max_tokens": max_tokens, "temperature": 0,
            "stream": i % 2 == 0, "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": "Bearer user-key"}) as r:
            if r.status_code != 200:
                r.read()
                return f"failed: {r.status_code} {r.text[:200]}"
            if not body["stream"]:
                r.read()
                return "ok"
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as e:
        return f"failed: {e!r}"
    if events and events[-1] == "data: [DONE]":
        return "ok"
    error = events[-1] if events else ""
    assert "request id" in error and "Actor" not in error and "pid" not in error, error
    return "broken"


def test_a_rolling_redeploy_under_load_fails_no_request(ray_served, cluster):
    """`serve deploy` of the application's config with another max_adapters (every replica is
    replaced, one at a time) while 4 clients keep sending: no request fails and no stream breaks
    (Serve drains a replica before stopping it)."""
    env, dashboard, _ = cluster
    url = ray_served[1]
    config = SERVE_CONFIG["path"]
    done = threading.Event()

    def redeploy() -> None:
        time.sleep(2)
        config.write_text(config.read_text().replace(f"max_adapters: {MAX_ADAPTERS},",
                                                     f"max_adapters: {MAX_ADAPTERS + 1},"))
        _run([BIN / "serve", "deploy", f"--address={dashboard}", config], env)
        _wait_replicas(lambda info: info["max_adapters"] == MAX_ADAPTERS + 1)
        done.set()

    def client(first: int) -> list[str]:
        out, i = [], first
        while not done.is_set() or len(out) < 25:
            out.append(_one_request(url, i, 64))
            i += 4
        return out

    started = time.monotonic()
    redeployer = threading.Thread(target=redeploy)
    redeployer.start()
    with ThreadPoolExecutor(4) as pool:
        outcomes = [o for part in pool.map(client, range(4)) for o in part]
    redeployer.join()
    failed = [o for o in outcomes if o.startswith("failed")]
    print(f"rolling redeploy of {REPLICAS} replicas under 4 clients: {len(outcomes)} requests in "
          f"{time.monotonic() - started:.0f} s, {len(failed)} failed, {outcomes.count('broken')} streams broken")
    _wait_replicas(lambda info: info["max_adapters"] == MAX_ADAPTERS + 1)
    assert not failed and "broken" not in outcomes, failed


def test_a_replica_killed_under_load_fails_no_request_that_had_not_streamed(ray_served):
    """kill -9 of a replica under 4 concurrent clients x 100 requests (streamed and not, the base model
    and adapters): the ingress sends again every request whose replica died before it answered, so
    none fails that had not streamed; a stream that had already sent tokens ends with an error event
    that names a request id and no internals. Runs last: Serve replaces the replica (waited for here)."""
    url = ray_served[1]
    pids = {info["pid"] for info in _replicas_state().values()}
    before = _ingress_counters()["retries"]
    killed = threading.Event()

    killed_at: list[float] = []

    def kill() -> None:  # while requests run on both replicas
        time.sleep(3)
        os.kill(sorted(pids)[0], signal.SIGKILL)
        killed_at.append(time.monotonic())
        killed.set()

    killer = threading.Thread(target=kill)
    killer.start()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: _one_request(url, i, 200), range(100)))
    killer.join()
    assert killed.is_set()
    failed = [o for o in outcomes if o.startswith("failed")]
    broken = outcomes.count("broken")
    print(f"kill -9 of a replica under 4 clients x 100 requests: {outcomes.count('ok')} ok, {len(failed)} failed "
          f"before streaming, {broken} streams broken mid-way, {_ingress_counters()['retries'] - before} sent again")
    assert not failed, failed
    _wait_replicas(lambda info: info["pid"] != sorted(pids)[0], timeout=120)  # Serve replaces the replica
    print(f"the killed replica was replaced within {time.monotonic() - killed_at[0]:.0f} s")
