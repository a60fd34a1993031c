"""The OpenAI-compatible HTTP API over one Engine and its Scheduler (FastAPI).

`model` in a request names the base model or a registered adapter; requests for different
adapters share decode steps (continuous batching). Errors are OpenAI's error objects.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ContextLengthError, PrefixportError
from ..runtime import Engine, GenerationResult, Scheduler, Ticket, TokenLogprob
from ..runtime.generation import RowRequest
from .metrics import Metrics
from .middleware import CountRequests, LimitBody, PenaltyBox
from .protocol import (AdapterLoad, ApiError, ChatRequest, CompletionRequest, Envelope, GenerationRequest,
                       chat_logprobs, cached_tokens, completion_logprobs, error_body, usage)
from .responses import (as_api_error, check_supported, context_error, error_response, invalid_body, model_not_found,
                        render_sse)
from .settings import ServerSettings
from .tenants import OPEN, Access, Key, Quotas, audit
from .tokenizing import tokenizer_router

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class Echo:
    """A prompt echoed (`echo: true`): its text and tokens, each token's logprobs (None: the first)."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class Job:
    """A request once accepted: its prompts (token ids), the prompts to echo (prepared, so they
    hold their adapter until scored) and one ticket per prompt and choice (none for max_tokens 0)."""

    body: GenerationRequest
    envelope: Envelope
    prompts: list[list[int]]
    tickets: list[Ticket]
    echo: list[RowRequest] = field(default_factory=list)

    @property
    def top(self) -> int | None:
        return self.body.top_logprobs_asked()

    @property
    def tokens(self) -> int:
        """Prompt and generated tokens so far (what a key's tokens_per_minute counts)."""
        return sum(len(p) for p in self.prompts) + sum(len(t.request.tokens) for t in self.tickets)


def default_model_name(engine: Engine) -> str:
    """The name clients use for the base model: the export's model spec (its last path part)."""
    name = Path(engine.manifest.source).name
    return name.removesuffix(".gguf") or engine.folder.name


class Server:
    """State behind the routes: the engine, its scheduler, metrics, the adapters folder, the
    bounds on one request (`settings.limits`)."""

    def __init__(self, engine: Engine, settings: ServerSettings = ServerSettings(), access: Access | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.access, self.quotas = access or Access(), Quotas()
        self.model_name = settings.model_name or default_model_name(engine)
        self.adapters_dir = Path(settings.adapters_dir).resolve() if settings.adapters_dir is not None else None
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, settings.max_batch, settings.prefill_budget, settings.max_waiting,
                                   on_step=self.metrics.batch_size.observe, speculative=settings.speculative,
                                   speculate_max_batch=settings.speculate_max_batch)
        self.metrics.watch(engine, self.scheduler)
        self.fingerprint = f"prefixport-{engine.manifest.fingerprint[:12]}"
        self.created = int(time.time())
        # a token's text and bytes, as logprobs name them (special tokens included)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda token: engine.tokenizer.decode([token], skip_special_tokens=False))
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(engine.tokenizer.token_bytes)

    # --- requests -----------------------------------------------------------------------------

    def visible(self, key: Key = OPEN) -> list[str]:
        """The models `key` may use: the base model first, then adapters."""
        return [n for n in (self.model_name, *self.engine.adapters) if key.may_use(n)]

    def adapter_for(self, model: str, key: Key = OPEN) -> str | None:
        """The adapter `model` names (None: the base); 404 if it is not served or `key` may not use
        it (alike: a key learns nothing of models that are not its own)."""
        if key.may_use(model) and model == self.model_name:
            return None
        if key.may_use(model) and model in self.engine.adapters:
            return model
        raise model_not_found(model, self.visible(key))

    def check(self, body: GenerationRequest, key: Key = OPEN) -> str | None:
        """Refuse what prefixport cannot do or what is over the limits; the adapter the request
        names (None: the base)."""
        check_supported(body, self.settings.limits)
        return self.adapter_for(body.model, key)

    def prompts(self, body: GenerationRequest, adapter: str | None = None) -> tuple[list[Any], int | None]:
        """The request's prompts encoded in `adapter`'s prompt format (`Engine.encode`: a text raw, as
        a template fills it or as one user message; chat messages through the chat template, or their
        last user message for a raw or template adapter; token ids as given) and its max_tokens (None:
        the rest of the context). Tokenizes: call it off the event loop."""
        if isinstance(body, ChatRequest):
            messages = [m.plain() for m in body.messages]
            return [self.engine.encode(messages, adapter=adapter, limit=self.engine.context_limit)], body.limit()
        assert isinstance(body, CompletionRequest)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        chat = False if body.echo else None  # echo scores the text exactly as sent (harnesses slice it)
        limit = self.engine.context_limit  # a text that cannot fit is refused before it is tokenized whole
        return ([self.engine.encode(p, chat=chat, adapter=adapter, limit=limit) if isinstance(p, str) else p
                 for p in body.prompts()], max_tokens)

    def envelope(self, body: GenerationRequest) -> Envelope:
        kind = "chat.completion" if isinstance(body, ChatRequest) else "text_completion"
        return Envelope(kind, body.model, self.fingerprint)

    def start(self, body: GenerationRequest, prompts: list[Any], adapter: str | None,
              max_tokens: int | None, key: Key = OPEN) -> Job:
        """Accept a request by `key`: prepare the prompts to echo and submit the tickets (all or
        none). No await in here: the adapter is held from the moment it was checked."""
        echo = [self.engine.prepare(ids, adapter=adapter, max_new_tokens=1)
                for ids in prompts] if getattr(body, "echo", False) else []
        salt = self.access.salt(key, body.cache_salt)
        tickets = self.submit(prompts, body, adapter, max_tokens, salt, key.id) if max_tokens != 0 else []
        return Job(body, self.envelope(body), prompts, tickets, echo)

    def echoes(self, job: Job) -> list[Echo]:
        """Score the prompts to echo (a prefill with every position's logits each). Runs the model:
        call it off the event loop."""
        assert isinstance(job.body, CompletionRequest)
        texts = job.body.prompts()
        return [Echo(text if isinstance(text, str) else self.engine.tokenizer.decode(request.prompt_ids),
                     request.prompt_ids, self.engine.run_score(request, job.top or 0))
                for text, request in zip(texts, job.echo)]

    def choice_logprobs(self, job: Job, ids: list[int], entries: list, offset: int = 0) -> dict | None:
        """A choice's `logprobs` object for these tokens (None: not asked for)."""
        if job.top is None:
            return None
        if job.envelope.kind == "chat.completion":
            return chat_logprobs(entries, job.top, self.token_text, self.token_bytes)
        return completion_logprobs(ids, entries, job.top, self.token_text, offset)

    def submit(self, prompts: list[Any], body: GenerationRequest, adapter: str | None,
               max_tokens: int | None, salt: str = "", tenant: str = "") -> list[Ticket]:
        """One ticket per prompt and choice (`check` has bounded their number) for `tenant` (a
        key id: its fair share of the bounded caches); all or none (a bad one cancels those before it)."""
        tickets: list[Ticket] = []
        try:
            for prompt in prompts:
                limit = max_tokens or self._room(prompt, adapter)
                for choice in range(body.n):
                    tickets.append(self.scheduler.submit(prompt, adapter=adapter, max_new_tokens=limit,
                                                         stop=body.stops(), logprobs=body.top_logprobs_asked(),
                                                         cache_salt=salt, tenant=tenant, **body.sampling(choice)))
        except Exception as e:
            for t in tickets:
                t.cancel()
            if isinstance(e, ContextLengthError):
                raise context_error(e, body) from e
            raise
        return tickets

    def _room(self, ids: list[int], adapter: str | None) -> int:
        """Default max_tokens for chat: what the context and the KV cache leave after the adapter's
        virtual tokens and the prompt (`Engine.room`), at least 1. A prompt that leaves nothing is
        refused by `Engine.prepare` (ContextLengthError: 400 `context_length_exceeded`)."""
        n_virtual = self.engine.store.n_virtual(adapter) if adapter else 0
        return max(1, self.engine.room(len(ids), n_virtual))

    async def collect(self, tickets: list[Ticket]) -> list[GenerationResult]:
        async def one(ticket: Ticket) -> GenerationResult:
            async for event in ticket.aevents():
                if event.error is not None:
                    raise event.error
                if event.result is not None:
                    return event.result
            raise AssertionError("unreachable: a ticket's last event has a result or an error")

        try:
            return list(await asyncio.gather(*(one(t) for t in tickets)))
        finally:
            for t in tickets:
                t.cancel()

    def stream(self, job: Job, include_usage: bool, model: str) -> AsyncIterator[str]:
        """Server-sent events of `events`: the usage chunk only if `include_usage`, then [DONE]."""
        return render_sse(self.events(job, model), include_usage)

    async def events(self, job: Job, model: str) -> AsyncIterator[dict[str, Any]]:
        """A streamed request's event objects: the echoed prompts, a chunk per text delta (or
        token, with logprobs) per choice, and the usage chunk; or an error object, last."""
        envelope, n = job.envelope, job.body.n
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ticket: Ticket) -> None:
            async for event in ticket.aevents():
                await queue.put((index, ticket, event))

        tasks = [asyncio.create_task(pump(i, t)) for i, t in enumerate(job.tickets)]
        choices = len(job.prompts) * n
        first, offsets, completion_tokens = [True] * choices, [0] * choices, 0
        prompt_tokens = sum(len(ids) for ids in job.prompts)  # n choices of a prompt count it once
        results: list[GenerationResult | None] = [None] * len(job.tickets)
        try:
            echoes = await asyncio.to_thread(self.echoes, job) if job.echo else []
            for i in range(choices) if echoes else ():
                echo, finish = echoes[i // n], None if job.tickets else "length"
                logprobs = self.choice_logprobs(job, echo.ids, echo.logprobs)
                yield envelope.chunk([envelope.choice(i, echo.text, finish, stream=True, logprobs=logprobs)])
                first[i], offsets[i] = False, sum(len(self.token_text(t)) for t in echo.ids)
            left = len(job.tickets)
            while left:
                index, ticket, event = await queue.get()
                if event.error is not None:
                    yield as_api_error(event.error).body
                    return
                result = event.result
                if event.text or event.logprobs or result is not None or first[index]:
                    finish = result.finish_reason if result is not None else None
                    logprobs = self.choice_logprobs(job, event.token_ids, event.logprobs, offsets[index])
                    choice = envelope.choice(index, event.text, finish, first=first[index], stream=True,
                                             logprobs=logprobs)
                    yield envelope.chunk([choice])
                    first[index] = False
                    offsets[index] += len("".join(map(self.token_text, event.token_ids)))
                if result is not None:
                    left -= 1
                    results[index] = result
                    completion_tokens += len(result.token_ids)
                    self.metrics.finished(model, ticket, result)
            yield envelope.chunk([], usage(prompt_tokens, completion_tokens, cached_tokens(results, n)))
        finally:  # the client may have gone: its rows leave the batch
            for t in job.tickets:
                t.cancel()
            for task in tasks:
                task.cancel()

    async def respond(self, request: Request, job: Job, model: str, key: Key = OPEN) -> Response:
        """The response to an admitted request (`quotas.admit(key)`), counted done at its end."""
        if job.body.stream:
            include = bool(job.body.stream_options and job.body.stream_options.include_usage)
            return StreamingResponse(self._counted(self.stream(job, include, model), job, key),
                                     media_type="text/event-stream")
        try:
            collecting = asyncio.ensure_future(self.full_response(job, model))
            while not (await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():  # the client gave up: its rows leave the batch
                    collecting.cancel()
                    return Response(status_code=499)
            return JSONResponse(collecting.result())
        finally:
            self.quotas.done(key, job.tokens)

    async def _counted(self, events: AsyncIterator[str], job: Job, key: Key) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            self.quotas.done(key, job.tokens)

    async def full_response(self, job: Job, model: str) -> dict[str, Any]:
        """The non-streaming response object: every choice (its echoed prompt, then its result), and the usage."""
        try:
            echoes = await asyncio.to_thread(self.echoes, job) if job.echo else []
        except BaseException:  # scoring failed (or the client left): the choices' rows leave the batch
            for t in job.tickets:
                t.cancel()
            raise
        results: list[GenerationResult] = list(await self.collect(job.tickets)) if job.tickets else []
        for ticket, result in zip(job.tickets, results):
            self.metrics.finished(model, ticket, result)
        n, choices = job.body.n, []
        for i in range(len(job.prompts) * n):
            echo = echoes[i // n] if echoes else Echo("", [], [])
            result = results[i] if results else None
            ids = echo.ids + (result.token_ids if result else [])
            entries = echo.logprobs + ((result.logprobs or []) if result else [])
            text = echo.text + (result.text if result else "")
            choices.append(job.envelope.choice(i, text, result.finish_reason if result else "length",
                                               logprobs=self.choice_logprobs(job, ids, entries)))
        # n choices of one prompt share its prompt tokens: count them once per prompt
        prompt_tokens = sum(len(ids) for ids in job.prompts)
        completion_tokens = sum(len(r.token_ids) for r in results)
        return job.envelope.response(choices, usage(prompt_tokens, completion_tokens, cached_tokens(results, n)))

    # --- adapters -----------------------------------------------------------------------------

    def check_admin(self, key: Key) -> None:
        """403 unless adapter admin is on and `key` is an admin's."""
        if not self.access.adapter_admin:
            raise ApiError(403, "adapters cannot be registered or deleted over HTTP on this server (start it with "
                                "--allow-adapter-admin)", "permission_error", code="adapter_admin_disabled")
        if not key.admin:
            raise ApiError(403, "this key may not register or delete adapters (an admin key may)", "permission_error",
                           code="permission_denied")

    def load_adapter(self, body: AdapterLoad) -> dict[str, Any]:
        if self.adapters_dir is None:
            raise ApiError(403, "this server was started without an adapters folder", code="adapters_disabled")
        if body.name == self.model_name:
            raise ApiError(409, f"{body.name!r} is the base model's name", param="name", code="name_taken")
        try:
            path = (self.adapters_dir / (body.path or f"{body.name}.safetensors")).resolve()
            if not path.is_relative_to(self.adapters_dir):
                raise ApiError(400, f"path must be inside the adapters folder {self.adapters_dir}", param="path")
            is_file = path.is_file()
        except OSError as e:  # a name too long for the file system, say
            raise ApiError(400, f"path cannot name a file: {e.strerror}", param="path") from None
        if not is_file:
            raise ApiError(404, f"no adapter bundle at {path.relative_to(self.adapters_dir)} in {self.adapters_dir}",
                           param="path", code="adapter_not_found")
        bundle = self.engine.add_adapter(body.name, path)
        return self.adapter_object(body.name) | {"kind": bundle.kind, "n_virtual": bundle.n_virtual,
                                                 "bytes": bundle.nbytes, "peft_type": bundle.metadata["peft_type"]}

    def model_object(self, name: str) -> dict[str, Any]:
        adapter = name != self.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "prefixport",
                "root": self.model_name, "parent": self.model_name if adapter else None}

    def adapter_object(self, name: str) -> dict[str, Any]:
        return self.model_object(name) | {"object": "adapter"}

    def register_folder(self) -> list[str]:
        """Register every NAME.safetensors in the adapters folder; a bad one is logged and skipped."""
        if self.adapters_dir is None or not self.adapters_dir.is_dir():
            return []
        names = []
        for path in sorted(self.adapters_dir.glob("*.safetensors")):
            if path.stem == self.model_name:
                log.warning("skipping adapter %s: it has the base model's name", path)
                continue
            try:
                self.engine.add_adapter(path.stem, path)
                names.append(path.stem)
            except PrefixportError as e:
                log.warning("skipping adapter %s: %s", path, e)
        return names


def create_app(engine: Engine, settings: ServerSettings = ServerSettings(), *, access: Access | None = None,
               register_adapters: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` as `settings` say (batching, speculation, limits, body
    size, who may call it: `ServerSettings`). With `register_adapters`, every bundle in the
    adapters folder is registered now, named after its file. `access` is the one the settings
    describe, made by the caller (who keeps it to reload its keys); by default made here."""
    access = access or settings.access.build()
    server = Server(engine, settings, access)
    if register_adapters:
        server.register_folder()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.scheduler.close()

    app = FastAPI(title="prefixport", lifespan=lifespan)
    app.state.server = server

    def authorize(request: Request) -> Key:
        return access.authorize(request.headers.get("authorization", ""))

    def operator(request: Request) -> None:
        access.check_operator(request.headers.get("authorization", ""))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(PrefixportError)
    async def library_error(_: Request, e: PrefixportError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(invalid_body(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        return error_response(e)

    app.add_middleware(CountRequests, metrics=server.metrics)
    app.add_middleware(LimitBody, limit=settings.max_body_bytes)
    app.add_middleware(PenaltyBox, access=access)  # added last: runs first, before any body is read

    v1 = [Depends(authorize)]

    async def generate(body: GenerationRequest, request: Request, key: Key) -> Response:
        adapter = server.check(body, key)
        request.state.model = body.model

        def start() -> Job:
            prompts, max_tokens = server.prompts(body, adapter)
            return server.start(body, prompts, adapter, max_tokens, key)

        server.quotas.admit(key)  # 429 at a limit of this key's
        try:
            job = await asyncio.to_thread(start)
        except BaseException:
            server.quotas.done(key, 0)
            raise
        return await server.respond(request, job, body.model, key)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: Key = Depends(authorize)) -> Response:
        return await generate(body, request, key)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, key: Key = Depends(authorize)) -> Response:
        return await generate(body, request, key)

    @app.get("/v1/models")
    async def models(key: Key = Depends(authorize)) -> dict[str, Any]:
        return {"object": "list", "data": [server.model_object(n) for n in server.visible(key)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, key: Key = Depends(authorize)) -> dict[str, Any]:
        server.adapter_for(model, key)
        return server.model_object(model)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad, key: Key = Depends(authorize)) -> dict[str, Any]:
        server.check_admin(key)
        loaded = await asyncio.to_thread(server.load_adapter, body)
        audit("adapter_registered", key_id=key.id, adapter=body.name, path=body.path or f"{body.name}.safetensors")
        return loaded

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, key: Key = Depends(authorize)) -> dict[str, Any]:
        server.check_admin(key)
        if name not in engine.adapters:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="name", code="adapter_not_found")
        engine.remove_adapter(name)
        audit("adapter_deleted", key_id=key.id, adapter=name)
        return {"id": name, "object": "adapter", "deleted": True}

    app.include_router(tokenizer_router(engine, v1))

    @app.get("/health", dependencies=[Depends(operator)])
    async def health() -> JSONResponse:
        ok = server.scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": server.model_name,
                "adapters": len(engine.adapters), "running": server.scheduler.running,
                "waiting": server.scheduler.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(operator)])
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
