"""`prefixport serve`: the OpenAI-compatible server on 127.0.0.1, driven by the official client."""

from __future__ import annotations

import json
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

from prefixport.runtime import Engine
from prefixport.server import AccessSettings, ServerSettings, create_app

from .conftest import ADAPTER_VARIANTS
from .helpers import running

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京", "Numbers: 0 1 2"]


@pytest.fixture
def client(served):
    return OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def _alone(engine: Engine, prompt, adapter, n: int) -> str:
    return engine.generate(prompt, adapter=adapter, max_new_tokens=n).text


def test_models_lists_the_base_and_every_adapter(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", *ADAPTER_VARIANTS}
    assert client.models.retrieve("prefix").id == "prefix"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("missing")


def test_completions_with_several_adapters_at_once_equal_each_alone(served, client):
    engine = served[0]
    jobs = [(PROMPTS[i % 4], (["tiny"] + list(ADAPTER_VARIANTS))[i % 5], 6 + 3 * (i % 4)) for i in range(12)]
    expected = [_alone(engine, p, None if m == "tiny" else m, n) for p, m, n in jobs]

    def call(job):
        p, m, n = job
        r = client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
        return r.choices[0].text, r.model, r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(call, jobs))
    assert [g[0] for g in got] == expected
    assert [g[1] for g in got] == [m for _, m, _ in jobs]
    assert all(0 < g[2] <= n and g[3] in ("stop", "length") for g, (_, _, n) in zip(got, jobs))


def test_streaming_completion_joins_to_the_same_text_with_usage(served, client):
    engine = served[0]
    chunks = list(client.completions.create(model="prefix", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _alone(engine, PROMPTS[1], "prefix", 20)
    assert chunks[-1].usage.completion_tokens == len(engine.generate(PROMPTS[1], adapter="prefix",
                                                                     max_new_tokens=20).token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_streaming_and_not_equal_the_engine_with_the_template(served, client):
    engine = served[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    expected = _alone(engine, messages, "prompt", 15)
    whole = client.chat.completions.create(model="prompt", messages=messages, max_tokens=15, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(engine.encode(messages))
    stream = client.chat.completions.create(model="prompt", messages=messages, max_tokens=15, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[2][:5]},
                                          {"type": "text", "text": PROMPTS[2][5:]}]}]
    r = client.chat.completions.create(model="prompt", messages=parts, max_tokens=15, temperature=0)
    assert r.choices[0].message.content == _alone(engine, [{"role": "user", "content": PROMPTS[2]}], "prompt", 15)


def test_chat_without_max_tokens_runs_to_a_stop_within_the_context(served, client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0)
    limit = served[0].manifest.max_positions
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= limit
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_without_max_tokens_whose_prompt_fills_the_context_is_the_runtimes_400(served, client):
    """The context rule is the runtime's (`Engine.prepare`): a chat prompt that leaves no room for a
    new token is its ContextLengthError, answered 400 `context_length_exceeded`, with or without an
    adapter's virtual tokens."""
    engine = served[0]
    messages = [{"role": "user", "content": "word " * engine.context_limit}]
    assert len(engine.encode(messages)) >= engine.context_limit
    for model in ("tiny", "prefix"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=messages, temperature=0)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
        assert f"exceed the model's context of {engine.context_limit} positions" in e.value.body["message"]
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices  # still serving


def test_n_choices_and_prompt_lists_and_seeds(served, client):
    engine = served[0]
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [_alone(engine, p, None, 8) for p in PROMPTS[:2]]
    assert [c.index for c in r.choices] == [0, 1]
    kw = dict(model="ptuning-lstm", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[1].text == engine.generate(PROMPTS[0], adapter="ptuning-lstm", max_new_tokens=10,
                                                temperature=1.0, seed=8).text
    ids = engine.encode(PROMPTS[3])
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == _alone(engine, PROMPTS[3], None, 5) and r.usage.prompt_tokens == len(ids)


def test_stop_strings(served, client):
    engine = served[0]
    full = _alone(engine, PROMPTS[0], "prefix", 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model="prefix", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_errors_are_openai_error_objects(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="prefix", prompt="x", max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, top_p=0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError, match="logit_bias is not supported"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="Extra inputs are not permitted"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError, match="prompt is empty|encodes to no tokens"):
        client.completions.create(model="tiny", prompt="", max_tokens=2)
    url = served[1]
    for method, path, body in (("POST", "/v1/completions", b"{not json"), ("GET", "/v1/nowhere", None),
                               ("POST", "/v1/chat/completions", json.dumps({"model": "tiny"}).encode())):
        r = httpx.request(method, url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices  # still serving


def test_load_and_unload_adapters(served, client):
    engine, url, folder, _ = served
    shutil.copy(folder / "prefix.safetensors", folder / "fresh.safetensors")
    r = httpx.post(url + "/v1/adapters", json={"name": "fresh"})
    assert r.status_code == 200 and r.json()["kind"] == "prefix"
    text = client.completions.create(model="fresh", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert text == _alone(engine, PROMPTS[0], "prefix", 8)
    r = httpx.post(url + "/v1/adapters", json={"name": "alias", "path": "prompt.safetensors"})
    assert r.status_code == 200 and r.json()["kind"] == "prompt" and "alias" in engine.adapters
    assert httpx.delete(url + "/v1/adapters/fresh").json() == {"id": "fresh", "object": "adapter", "deleted": True}
    assert httpx.delete(url + "/v1/adapters/alias").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="x", max_tokens=2)
    assert httpx.delete(url + "/v1/adapters/fresh").status_code == 404
    assert httpx.post(url + "/v1/adapters", json={"name": "x", "path": "../../etc/passwd"}).status_code == 400
    assert httpx.post(url + "/v1/adapters", json={"name": "absent"}).json()["error"]["code"] == "adapter_not_found"
    assert httpx.post(url + "/v1/adapters", json={"name": "tiny", "path": "prefix.safetensors"}).status_code == 409
    assert httpx.post(url + "/v1/adapters", json={"name": "bad/name"}).status_code == 400
    data = (folder / "prompt.safetensors").read_bytes()
    (folder / "torn.safetensors").write_bytes(data[: len(data) // 2])
    r = httpx.post(url + "/v1/adapters", json={"name": "torn"})
    assert r.status_code == 400 and "torn" in r.json()["error"]["message"]
    assert "torn" not in engine.adapters


def test_concurrent_streams_share_decode_steps(served, client):
    """Streaming clients for different adapters run in one batch, and each gets its text alone."""
    engine, url, _, _ = served
    before = _batch_histogram(url)
    jobs = [(PROMPTS[i % 4], ADAPTER_VARIANTS[i % 4], 30) for i in range(8)]
    expected = [_alone(engine, p, a, n) for p, a, n in jobs]
    barrier = threading.Barrier(len(jobs))

    def call(job):
        p, m, n = job
        barrier.wait()
        chunks = client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        assert list(pool.map(call, jobs)) == expected
    after = _batch_histogram(url)
    steps, rows = after[0] - before[0], after[1] - before[1]
    assert rows / steps > 2  # requests shared decode steps (mean batch > 2 rows)


def test_a_client_that_leaves_mid_stream_frees_its_row(served, client):
    engine, url, _, server = served
    steps = server.scheduler.steps
    with httpx.stream("POST", url + "/v1/completions",
                      json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(100):
        health = httpx.get(url + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.05)
    assert health == {**health, "status": "ok", "running": 0, "waiting": 0}
    assert server.scheduler.steps - steps < 200  # it left before its 200 tokens
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices


@pytest.mark.slow
def test_a_client_that_times_out_frees_its_row(default_export):
    """Not streaming: the server notices the closed connection and the row leaves the batch (the
    real model, so that the 200 tokens take seconds: longer than the server needs to notice)."""
    engine = Engine.load(default_export)
    app = create_app(engine)
    scheduler = app.state.server.scheduler
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": app.state.server.model_name, "prompt": "Once",
                                                      "max_tokens": 200, "ignore_eos": True}, timeout=0.5)
        for _ in range(100):
            if scheduler.running == 0:
                break
            time.sleep(0.05)
        assert scheduler.running == 0 and scheduler.steps < 200 and scheduler.cancelled == 1
        metrics = httpx.get(url + "/metrics").text
        assert "prefixport_requests_cancelled_total 1.0" in metrics
    engine.close()


def test_a_request_timeout_ends_it_with_finish_reason_timeout(served, client):
    """`timeout` (an extension, seconds): the row ends at its first token after it; others run on."""
    slow = client.completions.create(model="prefix", prompt="Once", max_tokens=200, temperature=0,
                                     extra_body={"ignore_eos": True, "timeout": 0.02})
    assert slow.choices[0].finish_reason == "timeout" and slow.usage.completion_tokens < 200
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          extra_body={"ignore_eos": True, "timeout": 60})
    assert chat.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="timeout"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"timeout": 0})


def test_metrics_report_requests_tokens_latency_batches_adapters_memory(served, client):
    client.completions.create(model="prompt", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(served[1] + "/metrics").text
    for name in ('prefixport_requests_total{endpoint="/v1/completions",model="prompt",status="200"}',
                 'prefixport_generation_tokens_total{model="prompt"}',
                 'prefixport_time_to_first_token_seconds_count{model="prompt"}',
                 'prefixport_inter_token_latency_seconds_count{model="prompt"}',
                 "prefixport_batch_size_count", 'prefixport_adapter_hits_total{adapter="prompt"}',
                 'prefixport_memory_bytes{kind="rss"}', "prefixport_requests_running"):
        line = next((ln for ln in text.splitlines() if ln.startswith(name)), None)
        assert line is not None, name
        assert float(line.split()[-1]) >= (0 if "running" in name else 1), line


def test_api_key(tiny_export):
    engine = Engine.load(tiny_export("llama"))
    with running(create_app(engine, ServerSettings(model_name="tiny", access=AccessSettings(api_key="s3cret")))) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        good = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open
    engine.close()


def _batch_histogram(url: str) -> tuple[float, float]:
    """(decode steps, rows summed over steps) from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("prefixport_batch_size_count", "prefixport_batch_size_sum")):
            values[line.split()[0]] = float(line.split()[1])
    return values["prefixport_batch_size_count"], values["prefixport_batch_size_sum"]


def test_cli_serve(tiny_export, tiny_adapters):
    """`prefixport serve` as a user runs it: adapters from a folder, an API key, a clean Ctrl-C."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "prefixport.cli", "serve", str(tiny_export("llama")), "--port", str(port),
           "--adapters", str(tiny_adapters("llama")), "--model-name", "tiny", "--max-batch", "4", "--api-key", "k"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert {m.id for m in client.models.list()} == {"tiny", *ADAPTER_VARIANTS}
        assert client.completions.create(model="prefix", prompt="Hi", max_tokens=3).choices[0].finish_reason
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving tiny and 4 adapters" in err and f"http://127.0.0.1:{port}/v1" in err


def test_bodies_over_the_limit_are_refused(tiny_export):
    engine = Engine.load(tiny_export("llama"))
    with running(create_app(engine, ServerSettings(model_name="tiny", max_body_bytes=1000))) as url:
        big = json.dumps({"model": "tiny", "prompt": "x" * 2000})
        r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield big[:500].encode()
            yield big[500:].encode()

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200  # a body under the limit, read and replayed
    engine.close()


def test_too_many_choices_and_bad_seeds_are_refused(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["x"] * 10, n=8, max_tokens=1)
    assert e.value.body["code"] == "too_many_choices"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", seed=-1, temperature=1.0, max_tokens=1)
    assert e.value.body["param"] == "seed"


def test_an_adapter_deleted_while_streams_use_it_lets_them_finish(served, client):
    engine, url, folder, _ = served
    shutil.copy(folder / "prefix.safetensors", folder / "doomed.safetensors")
    assert httpx.post(url + "/v1/adapters", json={"name": "doomed"}).status_code == 200
    expected = _alone(engine, PROMPTS[1], "prefix", 40)
    stream = client.completions.create(model="doomed", prompt=PROMPTS[1], max_tokens=40, temperature=0, stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    assert httpx.delete(url + "/v1/adapters/doomed").status_code == 200
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="doomed", prompt="x", max_tokens=1)


@pytest.mark.slow
def test_a_full_queue_answers_503_and_the_others_go_on(default_export):
    """max_batch 1 and max_waiting 1 on the real model (seconds per request): a third concurrent
    request is refused with 503 and Retry-After; the two admitted ones finish."""
    engine = Engine.load(default_export)
    app = create_app(engine, ServerSettings(max_batch=1, max_waiting=1))
    server = app.state.server
    body = {"model": server.model_name, "prompt": "Once", "max_tokens": 40, "ignore_eos": True}
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
        while server.scheduler.running == 0:
            time.sleep(0.01)
        second = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
        while server.scheduler.waiting == 0:
            time.sleep(0.01)
        refused = httpx.post(url + "/v1/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert [f.result().json()["usage"]["completion_tokens"] for f in (first, second)] == [40, 40]
    engine.close()


def test_a_load_over_the_kv_cache_budget_waits_and_an_impossible_request_is_a_400(tiny_export):
    """A budget for two rows: eight concurrent requests all finish (the others wait for rows to
    leave), each with its text alone; one that can never fit gets 400 context_length_exceeded;
    /metrics reports the cache's bytes, within the budget."""
    from prefixport.runtime import CacheSettings
    from prefixport.runtime.kv_cache import slot_bytes

    plain = Engine.load(tiny_export("llama"))
    need = max(len(plain.encode(p)) for p in PROMPTS) + 24
    budget_mb = 2 * need * slot_bytes(plain.manifest) / 2**20
    engine = Engine.load(tiny_export("llama"), cache_settings=CacheSettings(budget_mb=budget_mb))
    app = create_app(engine, ServerSettings(model_name="tiny", max_batch=8))
    with running(app) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        jobs = [PROMPTS[i % 4] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=24,
                                                                      temperature=0).choices[0].text, jobs))
        assert texts == [plain.generate(p, max_new_tokens=24).text for p in jobs]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10 * need)
        assert err.value.body["code"] == "context_length_exceeded" and "KV cache" in err.value.body["message"]
        metrics = httpx.get(url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("prefixport_kv_cache_bytes "))
    assert 0 < float(line.split()[1]) <= budget_mb * 2**20
    assert app.state.server.scheduler.cache.rows <= 2
    engine.close()


def test_context_length_errors_name_the_requests_field(served, client):
    """Over the context, the 400 names the field the request sent (`max_tokens`, or chat's
    `max_completion_tokens`) in `param` and in the message; the library keeps its `max_new_tokens`."""
    engine = served[0]
    too_many = engine.context_limit
    calls = {"max_tokens": lambda: client.completions.create(model="prefix", prompt="x", max_tokens=too_many),
             "max_completion_tokens": lambda: client.chat.completions.create(
                 model="tiny", messages=[{"role": "user", "content": "x"}], max_completion_tokens=too_many)}
    for field, call in calls.items():
        with pytest.raises(openai.BadRequestError) as e:
            call()
        body = e.value.body
        assert (body["code"], body["param"]) == ("context_length_exceeded", field)
        assert f"plus {field} ({too_many})" in body["message"] and "max_new_tokens" not in body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # chat's max_tokens: named as sent
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=too_many)
    assert e.value.body["param"] == "max_tokens" and f"max_tokens ({too_many})" in e.value.body["message"]
    from prefixport.errors import ContextLengthError

    with pytest.raises(ContextLengthError, match=rf"plus max_new_tokens \({too_many}\)"):
        engine.prepare("x", max_new_tokens=too_many)
