"""The OpenAI API's request bodies (the fields prefixport honours), the bounds on what one request
may ask for, and its response objects.

Unknown fields are refused, as OpenAI does; known fields that prefixport cannot honour (tools,
penalties, ...) are refused with a message saying so rather than silently ignored (docs/api.md).
`top_k`, `repetition_penalty` and `ignore_eos` are extensions (vLLM's names; the openai client sends them via
`extra_body`), and so is `timeout` (seconds: the request ends at its first token after that,
finish_reason "timeout"). Every string in a body must be valid Unicode, and sampling settings stay
in ranges where the math is finite; `RequestLimits` bounds the rest of a request's work
(docs/security.md, "Bounded work per request").
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InputError
from ..runtime import GenerationResult, TokenLogprob
from ..runtime.sampling import MAX_SEED, MAX_TOP_K, MIN_TEMPERATURE, PENALTY_RANGE

MAX_NAME = 256  # characters of a model or adapter name, a user or a cache salt


def invalid_unicode(data: Any) -> str | None:
    """Where `data` (parsed JSON) holds a string, value or key, that is not valid Unicode (a lone
    UTF-16 surrogate, which JSON's \\u escapes can carry), as a path like `messages.0.content`;
    None if nowhere. One C-speed encoding of the whole (60 ms for 3 MB of 600,000 strings: a walk
    in Python took 0.6 s), then, only if that fails, an iterative walk (any nesting depth) to say where."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    except (TypeError, ValueError, RecursionError):  # not plain JSON data (or nested past the encoder): walk it
        pass
    stack: list[tuple[Any, str]] = [(data, "body")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack += [(k, f"{path}.{k}") for k in value] + [(v, f"{path}.{k}") for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}.{i}") for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path.removeprefix("body.")
    return None


class Body(BaseModel):
    """A request body: unknown fields refused, every string valid Unicode (a lone surrogate is a
    400 naming where it is, never a tokenizer's 500)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = invalid_unicode(data)
        if where is not None:
            where = where.encode("utf-8", "backslashreplace").decode()  # a key may hold the surrogate itself
            raise ValueError(f"invalid Unicode at {where} (a lone surrogate): send UTF-8 text, and escape "
                             "characters outside the BMP as surrogate pairs")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(Body):
    """What a completion and a chat completion request share (the base of `CompletionRequest` and
    `ChatRequest`): the model (base or adapter), sampling, stopping, n choices, streaming. Sampling
    settings are bounded where the math stays finite (runtime/sampling.py says why)."""

    model: str = Field(max_length=MAX_NAME)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None  # bounded by RequestLimits (count, length)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = Field(default=None, max_length=MAX_NAME)  # accepted, not used
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)
    repetition_penalty: float = Field(default=1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    ignore_eos: bool = False  # generate max_tokens whatever the model's end-of-sequence tokens
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (docs/api.md); bounded by RequestLimits
    timeout: float | None = Field(default=None, gt=0)  # seconds from arrival; finish_reason "timeout"
    # vLLM's: only requests of one salt share prompt-cache blocks (within the caller's key: docs/security.md)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: below that sampling is greedy in "
                             "all but name and the logits divided by it overflow")
        return value

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token when logprobs are asked for (None: not asked)."""
        return None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something prefixport cannot do: {field: reason}."""
        out = {}
        if self.top_logprobs_asked() is not None and self.stream and self.n > 1:
            out["n"] = ("logprobs are streamed for n = 1 only: with n > 1 the chunks of several choices would "
                        "interleave; set stream to false, or send n requests")
        if self.presence_penalty or self.frequency_penalty:
            out["presence_penalty" if self.presence_penalty else "frequency_penalty"] = \
                "presence and frequency penalties are not supported; use repetition_penalty"
        if self.logit_bias:
            out["logit_bias"] = "logit_bias is not supported"
        return out

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, choice: int) -> dict[str, Any]:
        """Engine keywords for choice `choice` of n (seeded choices differ, reproducibly)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty,
                    seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
                    stop_token_ids=[] if self.ignore_eos else None, response_format=self.response_format,
                    timeout=self.timeout)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 with echo: scoring
    logprobs: int | None = Field(default=None, ge=0, le=5)  # alternatives per token, as OpenAI allows
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.max_tokens == 0 and not self.echo:
            out["max_tokens"] = "max_tokens 0 generates nothing: it is allowed only with echo (to score the prompt)"
        if self.best_of not in (None, 1):
            out["best_of"] = "best_of is not supported; use n"
        if self.suffix:
            out["suffix"] = "suffix (insertion) is not supported"
        return out

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise InputError("prompt is empty")
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template

    role: str
    content: str | list[ContentPart] | None = None

    def plain(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InputError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # a /v1/completions field: refused here with a message saying so
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            out["top_logprobs"] = "top_logprobs needs logprobs set to true"
        if self.echo:
            out["echo"] = ("echo is not part of the chat API; to score a text, send it as the prompt of "
                           "/v1/completions with echo true and max_tokens 0")
        if self.tools or self.tool_choice not in (None, "none"):
            out["tools"] = "tool calling is not supported"
        return out

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for beyond the body size: each bound over is a 400 naming the
    field and the bound, before any work (`check`). `max_stops` is OpenAI's 4 by default."""

    max_choices: int = 64  # completions per request: prompts x n
    max_stops: int = 4  # stop strings
    max_stop_chars: int = 256  # characters per stop string
    max_schema_bytes: int = 32 << 10  # response_format, as compact JSON
    max_schema_depth: int = 32  # nesting of response_format's objects and arrays

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")

    def check(self, body: GenerationRequest) -> None:
        """Raise `LimitError` for the first bound `body` is over."""
        stops = body.stops()
        if len(stops) > self.max_stops:
            raise LimitError("stop", f"at most {self.max_stops} stop strings, got {len(stops)}")
        longest = max(map(len, stops), default=0)
        if longest > self.max_stop_chars:
            raise LimitError("stop", f"a stop string is at most {self.max_stop_chars} characters, got {longest}")
        prompts = len(body.prompts()) if isinstance(body, CompletionRequest) else 1
        if prompts * body.n > self.max_choices:
            raise LimitError("n", f"{prompts} prompts x n={body.n} ask for {prompts * body.n} completions; at most "
                                  f"{self.max_choices} per request", code="too_many_choices")
        if body.response_format is not None:
            size = len(json.dumps(body.response_format, separators=(",", ":"), ensure_ascii=False).encode())
            if size > self.max_schema_bytes:
                raise LimitError("response_format", f"at most {self.max_schema_bytes} bytes as JSON, got {size}")
            depth = json_depth(body.response_format)
            if depth > self.max_schema_depth:
                raise LimitError("response_format", f"nested at most {self.max_schema_depth} deep, got {depth}")


class LimitError(InputError):
    """A request over one of `RequestLimits`' bounds (a 400 naming `param`, with `code`)."""

    def __init__(self, param: str, message: str, code: str = "limit_exceeded") -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code


def json_depth(data: Any) -> int:
    """How deeply parsed JSON nests objects and arrays (a scalar: 0). Iterative."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack += [(v, depth + 1) for v in children]
    return deepest


class AdapterLoad(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    path: str | None = Field(default=None, min_length=1, max_length=1024,  # under the adapters folder
                             pattern=r"^[^\x00]*$")  # default NAME.safetensors


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prompt cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_tokens(results: Sequence[GenerationResult | None], n: int) -> int:
    """The cached prompt tokens of a request's choices (`n` per prompt, in order): a prompt's tokens
    count once, so its cached ones are those every one of its choices found cached."""
    per_prompt = [results[i : i + n] for i in range(0, len(results), n)]
    return sum(min((r.cached_tokens if r is not None else 0) for r in choices) for choices in per_prompt)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status (and headers: a 429's
    Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers

    def __reduce__(self) -> tuple[Any, ...]:  # picklable as it is (a Ray replica's error reaches the ingress whole)
        error = self.body["error"]
        return ApiError, (self.status, error["message"], error["type"], error["param"], error["code"], self.headers)


def completion_logprobs(ids: Sequence[int], entries: Sequence[TokenLogprob | None], top: int,
                        text_of: Callable[[int], str], offset: int = 0) -> dict[str, list]:
    """/v1/completions' `logprobs` object for tokens `ids`: their text, logprob (None: the first
    prompt token), the `top` likeliest alternatives plus the token itself (OpenAI: up to top + 1),
    and each token's character offset in the choice's text (starting at `offset`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in zip(ids, entries):
        text = text_of(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        alternatives = {text_of(t): v for t, v in lp.top[:top]}
        alternatives.setdefault(text, lp.logprob)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(alternatives)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], top: int, text_of: Callable[[int], str],
                  bytes_of: Callable[[int], bytes]) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs` object: per token its text, logprob, bytes (the token's
    own: part of a multi-byte character too) and the `top` likeliest alternatives (the same three
    fields each)."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text_of(token), "logprob": logprob, "bytes": list(bytes_of(token))}

    return {"content": [item(lp.token, lp.logprob) | {"top_logprobs": [item(t, v) for t, v in lp.top[:top]]}
                        for lp in entries], "refusal": None}


class Envelope:
    """Builds the response objects of one completion or chat completion (same id and time)."""

    def __init__(self, kind: Literal["text_completion", "chat.completion"], model: str, fingerprint: str) -> None:
        self.kind, self.model, self.fingerprint = kind, model, fingerprint
        self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        self.created = int(time.time())

    def _object(self, obj: str, choices: list[dict], extra: dict | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **(extra or {})}

    def choice(self, index: int, text: str, finish_reason: str | None, first: bool = False,
               stream: bool = False, logprobs: dict | None = None) -> dict[str, Any]:
        if self.kind == "text_completion":
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        key = "delta" if stream else "message"
        message = {"content": text} if stream else {"role": "assistant", "content": text}
        if stream and first:
            message = {"role": "assistant", "content": text}
        return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self, choices: list[dict], use: dict[str, int]) -> dict[str, Any]:
        """The non-streaming response object."""
        return self._object(self.kind, choices, {"usage": use})

    def chunk(self, choices: list[dict], use: dict[str, int] | None = None) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        return self._object(obj, choices, {"usage": use} if use is not None else None)
