"""The OpenAI API's request bodies (the fields prefixport honours) and its response objects.

Unknown fields are refused, as OpenAI does; known fields that prefixport cannot honour (tools,
penalties, ...) are refused with a message saying so rather than silently ignored (docs/api.md).
`top_k`, `repetition_penalty` and `ignore_eos` are extensions (vLLM's names; the openai client sends them via
`extra_body`), and so is `timeout` (seconds: the request ends at its first token after that,
finish_reason "timeout").
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..runtime import GenerationResult, TokenLogprob


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What a completion and a chat completion request share (the base of `CompletionRequest` and
    `ChatRequest`): the model (base or adapter), sampling, stopping, n choices, streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    user: str | None = None  # accepted, not used
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False  # generate max_tokens whatever the model's end-of-sequence tokens
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (docs/api.md)
    timeout: float | None = Field(default=None, gt=0)  # seconds from arrival; finish_reason "timeout"
    # vLLM's: only requests of one salt share prompt-cache blocks (within the caller's key: docs/security.md)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)

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
                    seed=None if self.seed is None else self.seed + choice,
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


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    path: str | None = None  # under the adapters folder; default NAME.safetensors


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
