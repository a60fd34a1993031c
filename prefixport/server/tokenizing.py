"""vLLM's tokenizer routes: /tokenize, /detokenize, /tokenizer_info. Evaluation harnesses use
them to count and align tokens with the server's own tokenizer (lm-evaluation-harness's
`local-completions` finds them by itself and then needs no local copy of the tokenizer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import InputError
from ..runtime import Engine
from .protocol import Body, ChatMessage


class TokenizeRequest(Body):
    model: str | None = None  # accepted, not used: every adapter shares the base model's tokenizer
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


def tokenizer_router(engine: Engine, dependencies: list[Any]) -> APIRouter:
    """The three routes over `engine`'s tokenizer, behind `dependencies` (the API key)."""
    router = APIRouter(dependencies=dependencies)
    tokenizer = engine.tokenizer

    @router.post("/tokenize")
    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise InputError("send exactly one of prompt and messages")
        if body.messages is not None:
            text = tokenizer.apply_chat_template([m.plain() for m in body.messages], body.add_generation_prompt)
            ids = tokenizer.encode(text, add_special_tokens=False, limit=engine.context_limit)
        else:  # a text over the context is a 400 (megabytes would take seconds to tokenize)
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens, limit=engine.context_limit)
        return {"count": len(ids), "max_model_len": engine.context_limit, "tokens": ids}

    @router.post("/detokenize")
    def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        engine.encode(body.tokens)  # ids out of the vocabulary: a clear 400
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @router.get("/tokenizer_info")
    def tokenizer_info() -> dict[str, Any]:
        return {**tokenizer.special_tokens, "chat_template": tokenizer.chat_template,
                "model_max_length": engine.context_limit, "vocab_size": engine.manifest.vocab_size}

    return router
