"""The async API, deadlines, cancellation, settings checks and the engine's lifecycle (tiny Llama
export with every adapter kind; real ONNX Runtime sessions, a real uvicorn server)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from prefixport.errors import AdapterError, InputError, PrefixportError
from prefixport.runtime import AsyncEngine, Engine, Scheduler

LONG = {"max_new_tokens": 200, "stop_token_ids": []}  # runs far longer than any wait below (~0.5 s)


@pytest.fixture(scope="module")
def aengine(llama_engine):
    engine = AsyncEngine(llama_engine, max_batch=4)
    yield engine
    engine.close()


def until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_async_generate_and_stream_give_what_the_engine_gives(llama_engine, aengine):
    for adapter in (None, "prompt", "prefix"):
        want = llama_engine.generate("hello there", adapter=adapter, max_new_tokens=12)

        async def both():
            result = await aengine.generate("hello there", adapter=adapter, max_new_tokens=12)
            stream = aengine.stream("hello there", adapter=adapter, max_new_tokens=12)
            text = "".join([delta async for delta in stream])
            return result, text, stream.result

        result, text, streamed = asyncio.run(both())
        assert result.token_ids == streamed.token_ids == want.token_ids
        assert text == result.text == want.text


def test_concurrent_async_requests_share_the_batch(llama_engine, aengine):
    prompts = ["one", "two two", "three three three", "four"]
    want = [llama_engine.generate(p, max_new_tokens=8).token_ids for p in prompts]

    async def all_at_once():
        return await asyncio.gather(*(aengine.generate(p, max_new_tokens=8) for p in prompts))

    steps = aengine.scheduler.steps
    got = asyncio.run(all_at_once())
    assert [r.token_ids for r in got] == want
    assert aengine.scheduler.steps - steps < sum(len(w) for w in want)  # steps were shared


def test_wait_for_timeout_cancels_the_request(aengine):
    cancelled = aengine.scheduler.cancelled

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aengine.generate("a long story", **LONG), timeout=0.02)

    asyncio.run(impatient())
    assert until(lambda: aengine.scheduler.cancelled == cancelled + 1 and aengine.scheduler.running == 0)


def test_cancelling_the_task_or_closing_the_stream_cancels(aengine):
    async def cancel_task():
        ticket = aengine.submit("a long story", **LONG)
        seen = []

        async def consume():
            async for event in ticket.aevents():
                seen.append(event)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(ticket.result, 10)

    result = asyncio.run(cancel_task())
    assert result.finish_reason == "cancelled" and len(result.token_ids) < LONG["max_new_tokens"]

    async def close_stream():
        async with aengine.stream("a long story", **LONG) as stream:
            async for _ in stream:
                break
        return await asyncio.to_thread(stream.ticket.result, 10)

    result = asyncio.run(close_stream())
    assert result.finish_reason == "cancelled" and len(result.token_ids) < LONG["max_new_tokens"]


def test_timeout_setting_ends_rows_everywhere(llama_engine, aengine):
    direct = llama_engine.generate("a long story", timeout=0.02, **LONG)
    queued = Scheduler(llama_engine, max_batch=2)
    try:
        scheduled = queued.submit("a long story", adapter="prefix", timeout=0.02, **LONG).result(timeout=30)
    finally:
        queued.close()
    batch = llama_engine.generate_batch(["a long story", "short"], per_row=[{"timeout": 0.02}, {"max_new_tokens": 3}],
                                        stop_token_ids=[], max_new_tokens=200)
    streamed = asyncio.run(aengine.generate("a long story", timeout=0.02, **LONG))
    for result in (direct, scheduled, batch[0], streamed):
        assert result.finish_reason == "timeout" and 1 <= len(result.token_ids) < LONG["max_new_tokens"]
    assert batch[1].finish_reason == "length" and len(batch[1].token_ids) == 3
    with pytest.raises(InputError, match="timeout"):
        llama_engine.generate("x", timeout=0)


def test_ticket_result_timeout_and_text_stream_close(llama_engine, aengine):
    ticket = aengine.submit("a long story", **LONG)
    with pytest.raises(TimeoutError, match="goes on"):
        ticket.result(timeout=0.001)
    ticket.cancel()
    assert ticket.result(timeout=10).finish_reason == "cancelled"

    with llama_engine.stream("a long story", **LONG) as stream:
        first = next(iter(stream))
    assert first and stream.result.finish_reason == "cancelled"
    assert len(stream.result.token_ids) < LONG["max_new_tokens"]
    assert llama_engine.generate("hello", max_new_tokens=3).token_ids  # the cache row came back


def test_async_stream_result_after_aclose_and_after_a_timeout(llama_engine, aengine):
    """As the sync stream: after `aclose()` `.result` holds what was made ("cancelled"), and a
    stream that runs out of time ends without an error, `.result.finish_reason` "timeout"."""
    async def closed_early():
        async with aengine.stream("a long story", **LONG) as stream:
            async for _ in stream:
                break
        unread = aengine.stream("a long story", **LONG)
        await unread.aclose()  # before any delta was read
        return stream.result, unread.result

    read, unread = asyncio.run(closed_early())
    with llama_engine.stream("a long story", **LONG) as sync:
        next(iter(sync))
    for result in (read, unread, sync.result):
        assert result is not None and result.finish_reason == "cancelled"
        assert len(result.token_ids) < LONG["max_new_tokens"]
    assert read.token_ids and read.text
    assert until(lambda: aengine.scheduler.running == 0)

    async def timed_out():
        stream = aengine.stream("a long story", timeout=0.02, **LONG)
        text = "".join([delta async for delta in stream])
        ticket = aengine.submit("hello", max_new_tokens=3)
        return text, stream.result, await ticket.aresult(), ticket

    text, result, awaited, ticket = asyncio.run(timed_out())
    assert result is not None and result.finish_reason == "timeout" and result.text == text
    assert 1 <= len(result.token_ids) < LONG["max_new_tokens"]
    assert awaited is ticket.result(timeout=10) and len(awaited.token_ids) <= 3


def test_unknown_settings_are_input_errors_naming_the_right_one(llama_engine, aengine):
    for call in (lambda: llama_engine.generate("x", max_tokens=5), lambda: llama_engine.stream("x", max_tokens=5),
                 lambda: llama_engine.generate_batch(["x"], max_tokens=5),
                 lambda: llama_engine.generate_batch(["x"], per_row=[{"max_tokens": 5}]),
                 lambda: aengine.submit("x", max_tokens=5)):
        with pytest.raises(InputError, match="'max_tokens' \\(did you mean 'max_new_tokens'\\?\\)"):
            call()


def test_generate_batch_per_row_settings(llama_engine):
    results = llama_engine.generate_batch(
        ["a", "b", "c"], adapters=[None, "prompt", None], stop_token_ids=[], max_new_tokens=4,
        per_row=[{"max_new_tokens": 2}, {}, {"max_new_tokens": 5, "adapter": "prefix", "stop": ["never"]}])
    assert [len(r.token_ids) for r in results] == [2, 4, 5]
    assert [r.adapter for r in results] == [None, "prompt", "prefix"]
    alone = llama_engine.generate("c", adapter="prefix", max_new_tokens=5, stop_token_ids=[])
    assert results[2].token_ids == alone.token_ids
    with pytest.raises(InputError, match="per-row"):
        llama_engine.generate_batch(["a", "b"], per_row=[{}])
    one = llama_engine.generate_batch(["c"], adapter="prefix", max_new_tokens=5, stop_token_ids=[])  # for every row
    assert one[0].token_ids == alone.token_ids and one[0].adapter == "prefix"


def test_engine_lifecycle(tiny_export, tiny_adapters):
    with Engine.load(tiny_export("llama")) as engine:
        assert engine.generate("hi", max_new_tokens=2).token_ids
        with pytest.raises(AdapterError, match="PEFT checkpoint folder.*adapter convert"):
            engine.add_adapter("p", tiny_adapters("llama") / "peft" / "prompt")
    for call in (lambda: engine.generate("hi"), lambda: engine.add_adapter("p", tiny_adapters("llama") / "prompt.safetensors"),
                 lambda: engine.score("hi")):
        with pytest.raises(PrefixportError, match="engine is closed"):
            call()
    engine.close()  # idempotent

    async def owned():
        async with AsyncEngine.load(tiny_export("llama"), scheduler={"max_batch": 2}) as aengine:
            result = await aengine.generate("hi", max_new_tokens=2)
        return aengine, result

    aengine, result = asyncio.run(owned())
    assert len(result.token_ids) == 2 and aengine.engine.closed


def test_a_fastapi_app_of_its_own(aengine):
    """A service author's app: an endpoint awaiting the engine with a deadline, a streaming one
    whose client hangs up early (the request is cancelled), others served meanwhile."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from .helpers import running

    app = FastAPI()

    @app.get("/generate")
    async def generate(prompt: str, n: int = 8, timeout: float | None = None):
        result = await aengine.generate(prompt, max_new_tokens=n, stop_token_ids=[], timeout=timeout)
        return {"text": result.text, "tokens": len(result.token_ids), "finish_reason": result.finish_reason}

    @app.get("/stream")
    async def stream(prompt: str, n: int = 8):
        return StreamingResponse(aengine.stream(prompt, max_new_tokens=n, stop_token_ids=[]), media_type="text/plain")

    cancelled = aengine.scheduler.cancelled
    with running(app) as url:
        with httpx.stream("GET", f"{url}/stream", params={"prompt": "a long story", "n": 200}, timeout=30) as response:
            assert next(response.iter_text())  # the first text, then the client hangs up
        timed = httpx.get(f"{url}/generate", params={"prompt": "a long story", "n": 200, "timeout": 0.02}, timeout=30).json()
        assert timed["finish_reason"] == "timeout" and timed["tokens"] < 200
        body = httpx.get(f"{url}/generate", params={"prompt": "hello", "n": 5}, timeout=30).json()
        assert body["tokens"] == 5 and body["finish_reason"] == "length"
        assert until(lambda: aengine.scheduler.cancelled == cancelled + 1 and aengine.scheduler.running == 0)


# --- first-hour frictions (issue 20's, landed with the lifecycle work) ------------------------

def test_cli_checks_options_and_the_port_before_loading(tiny_export, tiny_adapters):
    import socket

    from click.testing import CliRunner

    from prefixport.cli import main

    result = CliRunner().invoke(main, ["generate", str(tiny_export("llama")), "hi", "--max-new-tokens", "-1"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.output and "loading" not in result.output
    peft = tiny_adapters("llama") / "peft" / "prompt"
    result = CliRunner().invoke(main, ["generate", str(tiny_export("llama")), "hi", "--adapter", str(peft)])
    assert result.exit_code == 1 and f"{peft} is a PEFT checkpoint folder" in result.output
    assert "prefixport adapter convert" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(tiny_export("llama")), "--port", str(port)])
    assert result.exit_code == 1 and f"127.0.0.1:{port} is already in use" in result.output
    assert "serving" not in result.output
    result = CliRunner().invoke(main, ["serve", str(tiny_export("llama")), "--app-name", "x", "--replace"])
    assert result.exit_code == 2 and "--app-name, --replace go with --ray" in result.output


def test_context_error_names_virtual_tokens_only_with_an_adapter(llama_engine):
    from prefixport.errors import ContextLengthError

    with pytest.raises(ContextLengthError) as plain:
        llama_engine.generate("hello", max_new_tokens=10_000)
    with pytest.raises(ContextLengthError) as prefixed:
        llama_engine.generate("hello", max_new_tokens=10_000, adapter="prefix")
    assert "virtual" not in str(plain.value) and str(plain.value).startswith("the prompt (")
    assert "the adapter's virtual tokens (" in str(prefixed.value)


def test_malformed_json_gets_an_openai_error_naming_it(served):
    _, url, _, _ = served
    response = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_json" and error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON: ") and "at character" in error["message"]
