"""OpenAI's protocol on the wire, shared by the plain server and the Ray ingress: every error as
the API error it is answered with (`as_api_error`, one `error_response` keeping its headers, one
404 text), a body checked as both check it (`parse`), and server-sent events rendered from the
event objects a server produces (`render_sse`: the usage chunk passed on only when asked for, read
as data by whoever counts tokens).
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Iterable, Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import (AdapterError, BusyError, ContextLengthError, InputError, NumericsError, PrefixportError,
                      SchemaError)
from .protocol import (ApiError, ChatRequest, CompletionRequest, GenerationRequest, LimitError, RequestLimits,
                       new_id)

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
DONE = "data: [DONE]\n\n"


def as_api_error(e: BaseException) -> ApiError:
    """Any error as the API error it is answered with: the library's errors by kind (input: 400,
    context length: 400 `context_length_exceeded`, a bound of `RequestLimits`: 400 `limit_exceeded`,
    busy: 503, ...), anything else a 500 that says "internal error" and a request id, the detail
    logged under that id (never in the body)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, LimitError):
        return ApiError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, NumericsError):
        return ApiError(500, str(e), "server_error", code="non_finite_logits")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, SchemaError):
        return ApiError(400, str(e), param="response_format")
    if isinstance(e, (InputError, AdapterError)):
        return ApiError(400, str(e))
    if isinstance(e, BusyError):
        return ApiError(503, str(e), "server_error", code="overloaded")
    if isinstance(e, PrefixportError):
        return ApiError(503, str(e), "server_error", code="unavailable")
    request_id = new_id("req")
    log.error("internal error (request id %s)", request_id, exc_info=e)
    return ApiError(500, f"internal error (request id {request_id}); the server's log has the detail", "server_error",
                    code="internal_error", headers={"X-Request-Id": request_id, "Connection": "close"})
    # (Connection: close, since Starlette re-raises the exception after this answer and the server
    # then drops the connection: a client that kept it alive would lose its next request.)


def context_error(e: ContextLengthError, body: GenerationRequest) -> ApiError:
    """A request over the context as a 400 naming the request's own field, `max_tokens` (or a chat
    request's `max_completion_tokens` where it set that), where the library says `max_new_tokens`."""
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    return ApiError(400, str(e).replace("max_new_tokens", field), param=field, code="context_length_exceeded")


def invalid_body(errors: list[dict]) -> ApiError:
    """pydantic's validation errors as one 400 error naming the first bad field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is [body, character offset], not a field
        at = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(400, f"the request body is not valid JSON: {reason} at character {at}", code="invalid_json")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)


def check_supported(body: GenerationRequest, limits: RequestLimits = RequestLimits()) -> None:
    """400 for the first field set to something prefixport cannot do (tools, penalties, ...) or
    over one of `limits` (stop strings, choices, schema size): before any work."""
    for name, reason in body.unsupported().items():
        raise ApiError(400, reason, param=name, code="unsupported_parameter")
    limits.check(body)


def parse(kind: Kind, data: Any, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """A request body (parsed JSON) checked as a server checks it: pydantic, then `check_supported`
    (the same 400 error objects)."""
    model = CompletionRequest if kind == "completion" else ChatRequest
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise invalid_body(list(e.errors())) from None
    check_supported(body, limits)
    return body


def model_not_found(model: str, models: Iterable[str]) -> ApiError:
    """The 404 for a model that does not exist or that the caller may not use (one text for both),
    naming the `models` the caller may use."""
    return ApiError(404, f"The model `{model}` does not exist (the models: {', '.join(models) or 'none'})",
                    param="model", code="model_not_found")


def error_response(e: BaseException) -> JSONResponse:
    """Any error as its OpenAI error object and status, with its headers (a 503 says Retry-After)."""
    err = as_api_error(e)
    headers = err.headers or ({"Retry-After": "1"} if err.status == 503 else None)
    return JSONResponse(err.body, status_code=err.status, headers=headers)


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def is_usage(event: dict[str, Any]) -> bool:
    """Whether an event object is the usage chunk (no choices, a usage)."""
    return not event.get("choices") and bool(event.get("usage"))


async def render_sse(events: AsyncIterator[dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
    """A stream's event objects as server-sent events: each chunk, the usage chunk only when the
    client asked for it (`stream_options.include_usage`), then [DONE]; an error object ends the
    stream without [DONE]."""
    async for event in events:
        if "error" in event:
            yield sse(event)
            return
        if include_usage or not is_usage(event):
            yield sse(event)
    yield DONE
