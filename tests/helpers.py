"""Helpers shared by tests: reference outputs from transformers, and runs through the runtime."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

from prefixport.runtime import Engine
from prefixport.runtime.generation import decode_step, prefill_new


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' logits for the last position of `ids` (one forward, no cache)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def hf_greedy(model, ids: list[int], n: int, stop_at_eos: bool = True) -> list[int]:
    """transformers' generate, greedy; `stop_at_eos=False` runs exactly n tokens."""
    kwargs = {} if stop_at_eos else {"pad_token_id": 0}
    config = model.generation_config
    saved = config.eos_token_id
    if not stop_at_eos:
        config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
    finally:
        config.eos_token_id = saved
    return out[0, len(ids):].tolist()


def greedy_choices(logits, prompt_len: int) -> list[int]:
    """Teacher-forced greedy choices (docs/design.md): from the logits of one forward over a prompt
    of `prompt_len` tokens followed by all but the last of `tokens`, the argmax after the prompt and
    after each prefix of `tokens`. A causal model's logits at a position do not depend on what
    follows, so these equal `tokens` exactly when the model's greedy loop gives `tokens`."""
    return [int(t) for t in logits[prompt_len - 1:].argmax(-1)]


def hf_greedy_choices(model, ids: list[int], tokens: list[int]) -> list[int]:
    """transformers' greedy choices after `ids` and each prefix of `tokens` (`greedy_choices`)."""
    with torch.no_grad():
        return greedy_choices(model(torch.tensor([ids + tokens[:-1]])).logits[0], len(ids))


def runtime_logits(engine: Engine, rows: list[list[int]], decode: list[int] | None = None,
                   soft: np.ndarray | None = None) -> np.ndarray:
    """Last-position logits [B, vocab] after a prefill of `rows` and optionally one decode step."""
    m = engine.manifest
    embeds = soft if soft is not None else np.zeros((len(rows), 0, m.hidden_size), np.float32)
    logits, cache = prefill_new(engine.backend, rows, embeds)
    if decode is not None:
        logits = decode_step(engine.backend, cache, np.array(decode, np.int64), m.hidden_size, np.float32)
    return logits


def runtime_greedy_batch(engine: Engine, rows: list[list[int]], n: int,
                         soft: np.ndarray | None = None) -> list[list[int]]:
    """n greedy tokens for each row of one batch (no early stop)."""
    m = engine.manifest
    embeds = soft if soft is not None else np.zeros((len(rows), 0, m.hidden_size), np.float32)
    logits, cache = prefill_new(engine.backend, rows, embeds, extra=n)
    out = []
    for _ in range(n):
        tokens = logits.argmax(-1).astype(np.int64)
        out.append(tokens)
        logits = decode_step(engine.backend, cache, tokens, m.hidden_size, np.float32)
    return np.stack(out, 1).tolist()


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
