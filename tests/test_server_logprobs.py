"""The server's logprobs (completions and chat, streamed or not) and echo scoring, through the
official client and raw HTTP, against the engine's own values."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from prefixport.runtime import Engine


PROMPTS = ["The quick brown fox", "Numbers: 0 1 2", "def add(a, b):\n    return"]


@pytest.fixture
def client(served):
    return OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token], skip_special_tokens=False)


def check_completion_logprobs(engine, lp: dict, ids: list[int], want: list, top: int) -> None:
    """`lp` (a completions logprobs object) names `ids` with the engine's values `want` (None first)."""
    assert lp["tokens"] == [token_text(engine, t) for t in ids]
    for i, (value, alternatives, entry) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"], want)):
        if entry is None:
            assert value is None and alternatives is None and i == 0
            continue
        np.testing.assert_allclose(value, entry.logprob, atol=1e-5)
        assert lp["tokens"][i] in alternatives and len(alternatives) <= top + 1
        best = [token_text(engine, t) for t, _ in entry.top[:top]]
        assert all(b in alternatives for b in best)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))


@pytest.mark.parametrize("model", ["tiny", "prompt", "prefix"])
def test_completion_logprobs_equal_the_engines(served, model):
    engine, url = served[:2]
    adapter = None if model == "tiny" else model
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 3,
            "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    want = engine.generate(PROMPTS[0], adapter=adapter, max_new_tokens=6, stop_token_ids=[], logprobs=3)
    choice = r["choices"][0]
    assert choice["text"] == want.text
    check_completion_logprobs(engine, choice["logprobs"], want.token_ids, want.logprobs, 3)

    # streamed: the chunks' logprobs join to the same lists
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["logprobs"])
    joined = {k: [v for c in chunks if c for v in c[k]] for k in ("tokens", "token_logprobs", "text_offset")}
    assert joined["tokens"] == choice["logprobs"]["tokens"]
    assert joined["token_logprobs"] == choice["logprobs"]["token_logprobs"]
    assert joined["text_offset"] == choice["logprobs"]["text_offset"]


def test_chat_logprobs_through_the_official_client(served, client):
    engine = served[0]
    messages = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(model="prefix", messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    want = engine.generate(messages, adapter="prefix", max_new_tokens=5, stop_token_ids=[], logprobs=4)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(engine, t) for t in want.token_ids]
    for c, lp in zip(content, want.logprobs):
        np.testing.assert_allclose(c.logprob, lp.logprob, atol=1e-5)
        assert c.bytes == list(engine.tokenizer.token_bytes(lp.token))
        assert [t.token for t in c.top_logprobs] == [token_text(engine, t) for t, _ in lp.top]
        assert len(c.top_logprobs) == 4
    stream = client.chat.completions.create(model="prefix", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=4, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("model", ["tiny", "prompt", "prefix-projection"])
def test_echo_scores_batched_prompts_with_max_tokens_0(served, model):
    engine, url = served[:2]
    adapter = None if model == "tiny" else model
    body = {"model": model, "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["text"] for c in out["choices"]] == PROMPTS
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == sum(len(engine.encode(p)) for p in PROMPTS)
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in sorted(chunks, key=lambda c: c["index"])] == \
           [(i, c["text"], "length") for i, c in enumerate(out["choices"])]
    assert [c["logprobs"] for c in sorted(chunks, key=lambda c: c["index"])] == [c["logprobs"] for c in out["choices"]]
    for prompt, choice in zip(PROMPTS, out["choices"]):
        score = engine.score(prompt, adapter=adapter, top_logprobs=1)
        check_completion_logprobs(engine, choice["logprobs"], score.token_ids, score.logprobs, 1)
        assert "".join(choice["logprobs"]["tokens"]) == prompt  # each token's text at its offset


def test_echo_with_generation_and_token_prompts(served):
    engine, url = served[:2]
    ids = engine.encode(PROMPTS[1])
    body = {"model": "prompt", "prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0,
            "ignore_eos": True}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    gen = engine.generate(ids, adapter="prompt", max_new_tokens=3, stop_token_ids=[], logprobs=2)
    score = engine.score(ids, adapter="prompt", top_logprobs=2)
    assert choice["text"] == engine.tokenizer.decode(ids) + gen.text
    check_completion_logprobs(engine, choice["logprobs"], ids + gen.token_ids, score.logprobs + gen.logprobs, 2)
    # streamed: the echoed prompt comes first, then the new tokens
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines() if line.startswith("data: {")]
    assert texts[0] == engine.tokenizer.decode(ids) and "".join(texts) == choice["text"]


BAD = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "n": 2, "stream": True}, "n"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "n": 2, "stream": True}, "n"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
]


def test_bad_logprob_requests_are_clear_errors_and_disturb_no_one(served, client):
    engine, url = served[:2]
    want = engine.generate(PROMPTS[2], adapter="prefix", max_new_tokens=24, stop_token_ids=[]).text

    def good() -> str:
        return client.completions.create(model="prefix", prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(good) for _ in range(3)]
        for path, extra, param in BAD:
            base = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
            r = httpx.post(url + path, json={"model": "tiny", **base, **extra}, timeout=60)
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        assert [f.result() for f in running] == [want] * 3
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"echo": True})


def test_tokenizer_routes_as_vllm_serves_them(served):
    engine, url = served[:2]
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPTS[0], "add_special_tokens": False}).json()
    assert r["tokens"] == engine.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == engine.context_limit
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == PROMPTS[0]
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == engine.tokenizer.special_tokens["eos_token"] and "chat_template" in info
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]
    assert httpx.post(url + "/tokenize", json={}).status_code == 400


def test_echo_scores_the_text_as_sent_even_for_a_template_adapter(served, tiny_export, tiny_adapters, tmp_path):
    """An adapter's prompt format shapes generation, but echo scores exactly the text sent: a harness
    slices the prompt's logprobs by its own token count."""
    from prefixport.adapters import convert_checkpoint

    engine, url = served[:2]
    out = tmp_path / "templated.safetensors"
    convert_checkpoint(tiny_adapters("llama") / "peft" / "prefix", tiny_export("llama"), out=out,
                       prompt_format="Q: {prompt}\nA:")
    engine.add_adapter("templated", out)
    try:
        body = {"model": "templated", "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0}
        choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        score = engine.score(PROMPTS[0], adapter="templated")
        assert choice["text"] == PROMPTS[0] and "".join(choice["logprobs"]["tokens"]) == PROMPTS[0]
        assert choice["logprobs"]["token_logprobs"][1:] == [lp.logprob for lp in score.logprobs[1:]]
        generated = httpx.post(url + "/v1/completions", json={"model": "templated", "prompt": PROMPTS[0],
                                                              "max_tokens": 1}, timeout=60).json()
        assert generated["usage"]["prompt_tokens"] == len(engine.encode(PROMPTS[0], adapter="templated")) > \
            len(engine.encode(PROMPTS[0], chat=False))
    finally:
        engine.remove_adapter("templated")
