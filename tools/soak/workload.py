"""The soak's requests: a seeded list of specs (endpoints, models, sampling, cancels, bad
requests), how each is sent, and the checks every answer must pass."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.serving import prompt_text
from prefixport.bench.serve_client import api_url, stream_request
from tools.soak import BUNDLES, STATIC_ADAPTERS
from tools.soak.hot_adapters import HotAdapters

STOPS = [["\n"], [".", "!"], ["\n\n", " the "], ["2"]]


# --- the specs -----------------------------------------------------------------------------------

@dataclass
class Spec:
    index: int
    kind: str  # normal | cancel_stream | cancel_whole | bad
    endpoint: str = "chat"  # chat | completions
    model: str = "@base"  # a name, "@base", or "@hot:prefix" / "@hot:prompt" (chosen when sent)
    stream: bool = False
    body: dict[str, Any] = field(default_factory=dict)  # without "model"
    key: str | None = None  # deterministic template (greedy or seeded): same key, same text
    sampling: str = "greedy"  # greedy | seeded | random
    cancel_after: int = 0  # chunks (stream) or seconds (whole)
    bad: str | None = None  # which bad request
    expect: tuple[int, str | None] | None = None  # expected status, error code


def bundle_of(model: str) -> str:
    """The bundle a spec's model runs ("base" for the base model)."""
    if model == "@base":
        return "base"
    if model.startswith("@hot:"):
        return BUNDLES[model[5:]]
    return STATIC_ADAPTERS[model]


def template(rng: random.Random, sampling: str) -> dict[str, Any]:
    """A request's content: endpoint, model bundle, prompt, sampling, stop, max_tokens."""
    endpoint = "chat" if rng.random() < 0.6 else "completions"
    bundle_pick = rng.random()
    text = prompt_text(rng, [0, 0, 1, 2, 4])
    body: dict[str, Any] = {"max_tokens": rng.choice([16, 20, 24])}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text + "\n"
    if sampling == "greedy":
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.7, 1.0])
        body["top_p"] = rng.choice([0.9, 1.0])
        body["top_k"] = rng.choice([0, 40])
        if rng.random() < 0.3:
            body["repetition_penalty"] = 1.1
        if sampling == "seeded":
            body["seed"] = rng.randrange(10_000)
    if rng.random() < 0.25:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    return {"endpoint": endpoint, "bundle_pick": bundle_pick, "body": body}


def pick_model(rng: random.Random, bundle_pick: float) -> str:
    """base 25%, static adapters 45%, hot adapters 30%; templates fix the bundle, not the name."""
    if bundle_pick < 0.25:
        return "@base"
    kind = "prefix" if bundle_pick < 0.625 else "prompt"
    if rng.random() < 0.4:
        return f"@hot:{kind}"
    return rng.choice([n for n, b in STATIC_ADAPTERS.items() if b == BUNDLES[kind]])


BAD = [  # name, expected status, expected error code (None: not checked)
    ("unknown model", 404, "model_not_found"),
    ("unknown field", 400, None),
    ("temperature out of range", 400, None),
    ("over the context", 400, "context_length_exceeded"),
    ("unsupported field (logit_bias)", 400, "unsupported_parameter"),
    ("malformed JSON", 400, None),
    ("empty messages", 400, None),
    ("prompt ids over the context", 400, "context_length_exceeded"),
    ("deleted adapter", 404, "model_not_found"),
    ("DELETE unknown adapter", 404, "adapter_not_found"),
    ("POST adapter outside the folder", 400, None),
    ("POST adapter with no bundle", 404, "adapter_not_found"),
]


def workload(n: int, seed: int, bad_every: int) -> list[Spec]:
    """n specs drawn with `seed`, every `bad_every`-th a bad request (0: none). Greedy and seeded
    requests come from a pool of templates (`key`), so that the same text can be expected again."""
    rng = random.Random(seed)
    pools = {s: [template(rng, s) for _ in range(max(4, n // 9))] for s in ("greedy", "seeded")}
    specs, n_bad = [], 0
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            name, status, code = BAD[n_bad % len(BAD)]
            n_bad += 1
            specs.append(Spec(i, "bad", bad=name, expect=(status, code)))
            continue
        r = rng.random()
        kind = "cancel_stream" if r < 0.05 else "cancel_whole" if r < 0.07 else "normal"
        sampling = rng.choices(["greedy", "seeded", "random"], [0.45, 0.40, 0.15])[0]
        if sampling == "random" or kind != "normal":
            t, key = template(rng, sampling), None
        else:
            j = rng.randrange(len(pools[sampling]))
            t, key = pools[sampling][j], f"{sampling}-{j}"
        body = json.loads(json.dumps(t["body"]))
        model = pick_model(rng, t["bundle_pick"])
        if kind == "cancel_whole" and model.startswith("@hot:"):  # hot-adapter requests are streamed
            model = BUNDLES[model[5:]]
        stream = kind == "cancel_stream" or model.startswith("@hot:") or (kind == "normal" and rng.random() < 0.5)
        if kind == "cancel_whole":
            stream = False
        if kind != "normal":  # long enough to be cancelled mid-way
            body.update(max_tokens=24, ignore_eos=True)
            body.pop("stop", None)
        spec = Spec(i, kind, t["endpoint"], model, stream, body, key, sampling,
                    cancel_after=2 if kind == "cancel_stream" else 1 if kind == "cancel_whole" else 0)
        specs.append(spec)
    return specs


# --- one request ---------------------------------------------------------------------------------

def bad_request(spec: Spec, base_model: str, hot: HotAdapters) -> tuple[str, str, Any]:
    """(method, path, json body or raw bytes) of a deliberately bad request."""
    chat = {"model": base_model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    b = spec.bad
    if b == "unknown model":
        return "POST", "/v1/chat/completions", chat | {"model": "no-such-model"}
    if b == "unknown field":
        return "POST", "/v1/chat/completions", chat | {"frobnicate": 1}
    if b == "temperature out of range":
        return "POST", "/v1/chat/completions", chat | {"temperature": 3.5}
    if b == "over the context":
        return "POST", "/v1/completions", {"model": base_model, "prompt": "Hello", "max_tokens": 9000}
    if b == "unsupported field (logit_bias)":
        return "POST", "/v1/chat/completions", chat | {"logit_bias": {"42": 5}}
    if b == "malformed JSON":
        return "POST", "/v1/chat/completions", b'{"model": "x", "messages": [}'
    if b == "empty messages":
        return "POST", "/v1/chat/completions", chat | {"messages": []}
    if b == "prompt ids over the context":
        return "POST", "/v1/completions", {"model": base_model, "prompt": [42] * 8200, "max_tokens": 4}
    if b == "deleted adapter":
        gone = [n for n in hot.recently_deleted if n not in hot.registered]
        name = gone[-1] if gone else "hot-never-registered"
        return "POST", "/v1/chat/completions", chat | {"model": name}
    if b == "DELETE unknown adapter":
        return "DELETE", "/v1/adapters/no-such-adapter", None
    if b == "POST adapter outside the folder":
        return "POST", "/v1/adapters", {"name": "escape", "path": "../../etc/passwd"}
    if b == "POST adapter with no bundle":
        return "POST", "/v1/adapters", {"name": "no-such-bundle"}
    raise AssertionError(b)


def _error_code(text: str) -> str | None:
    try:
        return json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def run_bad(client: httpx.AsyncClient, base: str, spec: Spec, base_model: str,
                  hot: HotAdapters) -> dict[str, Any]:
    """Send a bad request; its record's outcome is bad_expected_ok when the status and code are as expected."""
    method, path, body = bad_request(spec, base_model, hot)
    rec: dict[str, Any] = {"index": spec.index, "kind": "bad", "bad": spec.bad, "endpoint": path}
    start = time.perf_counter()
    try:
        if isinstance(body, bytes):
            r = await client.request(method, f"{base}{path}", content=body,
                                     headers={"content-type": "application/json"})
        else:
            r = await client.request(method, f"{base}{path}", json=body)
        rec["status"] = r.status_code
        code = _error_code(r.text)
        status, want = spec.expect  # type: ignore[misc]
        if r.status_code == status and (want is None or code == want) and "error" in r.json():
            rec["outcome"] = "bad_expected_ok"
        else:
            rec["outcome"] = "error"
            rec["error"] = (f"bad request ({spec.bad}): expected HTTP {status}"
                            f"{f' code {want}' if want else ''}, got HTTP {r.status_code}: {r.text[:300]}")
    except (httpx.HTTPError, ValueError) as e:
        rec["outcome"], rec["error"] = "error", f"bad request ({spec.bad}): {type(e).__name__}: {e}"
    rec["latency_s"] = time.perf_counter() - start
    return rec


def check_answer(spec: Spec, body: dict[str, Any], text: str, finish: str | None, tokens: int | None) -> str | None:
    """A failed check of a finished answer, or None."""
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    if tokens is None:
        return "no usage"
    if tokens > body["max_tokens"] or tokens < 1:
        return f"{tokens} completion tokens for max_tokens {body['max_tokens']}"
    if body.get("ignore_eos") and finish == "length" and tokens != body["max_tokens"]:
        return f"ignore_eos, finish length, but {tokens} tokens of {body['max_tokens']}"
    if body.get("ignore_eos") and finish == "stop" and not body.get("stop"):
        return "ignore_eos, no stop strings, but finish_reason stop"
    for s in body.get("stop") or []:
        if s in text:
            return f"stop string {s!r} in the text"
    return None


async def run_one(client: httpx.AsyncClient, base: str, spec: Spec, base_model: str,
                  hot: HotAdapters) -> dict[str, Any]:
    """Send a spec (cancelling it on purpose when its kind says so) and check the answer: its record
    (outcome ok, error, cancelled, cancel_came_too_late or bad_expected_ok; status, text, timings).
    A streamed spec goes through `prefixport bench serve`'s client (prefixport.bench.serve_client):
    TTFT is its first chunk carrying output text, and a cancelled stream leaves after
    `cancel_after` chunks."""
    if spec.kind == "bad":
        return await run_bad(client, base, spec, base_model, hot)
    model, hot_name = spec.model, None
    if model == "@base":
        model = base_model
    elif model.startswith("@hot:"):
        kind = model[5:]
        hot_name = hot.take(kind)
        model = hot_name or BUNDLES[kind]  # none open now: the same bundle's static name
    body = {"model": model, **spec.body, "stream": spec.stream}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    rec: dict[str, Any] = {"index": spec.index, "kind": spec.kind, "endpoint": spec.endpoint, "model": model,
                           "hot": hot_name is not None, "bundle": bundle_of(spec.model), "stream": spec.stream,
                           "sampling": spec.sampling, "key": spec.key, "max_tokens": spec.body["max_tokens"],
                           "stop": bool(spec.body.get("stop")), "ignore_eos": bool(spec.body.get("ignore_eos"))}
    start = time.perf_counter()
    accepted = False

    def on_status(status: int) -> None:  # a hot adapter runs a request once the server has taken it
        nonlocal accepted, hot_name
        if hot_name is None:
            return
        if status == 200:
            hot.accepted(hot_name, spec.index)
            accepted = True
        else:
            hot.refused(hot_name)
            hot_name = None

    try:
        if not spec.stream:
            try:
                coro = client.post(api_url(base, spec.endpoint), json=body)
                r = await (asyncio.wait_for(coro, spec.cancel_after) if spec.kind == "cancel_whole" else coro)
            except asyncio.TimeoutError:
                rec.update(outcome="cancelled", status=None)
                return rec
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec.update(outcome="error", error=f"HTTP {r.status_code}: {r.text[:300]}")
                return rec
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
            finish, tokens = choice["finish_reason"], (data.get("usage") or {}).get("completion_tokens")
        else:
            streamed = await stream_request(client, api_url(base, spec.endpoint), body, on_status=on_status,
                                            leave_after=spec.cancel_after if spec.kind == "cancel_stream" else None)
            rec["status"] = streamed.status
            if streamed.ttft_s is not None:
                rec["ttft_s"] = streamed.ttft_s
            if streamed.error is not None:
                rec.update(outcome="error", error=streamed.error)
                return rec
            if streamed.left:
                rec.update(outcome="cancelled", chunks=streamed.chunks)
                return rec
            if not streamed.done:
                rec.update(outcome="error", error=f"the stream ended without [DONE] after {streamed.chunks} chunks")
                return rec
            text, finish = streamed.text, streamed.finish_reason
            tokens = (streamed.usage or {}).get("completion_tokens")
        problem = check_answer(spec, spec.body, text, finish, tokens)
        rec.update(text=text, finish_reason=finish, completion_tokens=tokens)
        if problem:
            rec.update(outcome="error", error=f"check failed: {problem} (model {model}, {spec.endpoint})")
        elif spec.kind == "cancel_whole":
            rec["outcome"] = "cancel_came_too_late"  # it finished within the cancel delay: a normal answer
        else:
            rec["outcome"] = "ok"
        return rec
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        rec.update(outcome="error", error=f"{type(e).__name__}: {e}")
        return rec
    finally:
        rec["latency_s"] = time.perf_counter() - start
        if accepted:
            hot.finished(hot_name, spec.index)
        elif hot_name is not None:  # sent, never accepted (an exception before the headers)
            hot.refused(hot_name)
