"""The public runtime API as a service author types it: checked by `mypy --strict` (tests/test_typing.py),
never run. A signature that loses its types, or a result field that changes type, fails the check."""

from __future__ import annotations

import asyncio
import json

from prefixport.errors import InputError, PrefixportError
from prefixport.runtime import (AsyncEngine, CacheSettings, Engine, EngineStats, FinishReason, GenerationResult,
                                Scheduler, Score, TextStream, Ticket)
from prefixport.runtime.settings import GenerationSettings


def sync_service(folder: str) -> list[str]:
    with Engine.load(folder, adapter_budget_bytes=64 << 20, cache_settings=CacheSettings(max_rows=8)) as engine:
        engine.add_adapter("date", f"{folder}/adapters/date-prefix.safetensors")
        result: GenerationResult = engine.generate("Date: 4 August 2008\nISO:", adapter="date", max_new_tokens=16,
                                                   temperature=0.7, top_p=0.9, seed=1, stop=["\n"], timeout=5.0)
        reason: FinishReason = result.finish_reason
        stream: TextStream = engine.stream("Hello", max_new_tokens=8)
        with stream:
            deltas = [d for d in stream]
        rows: list[GenerationSettings] = [{"max_new_tokens": 2}, {"max_new_tokens": 30, "adapter": "date"}]
        batch = engine.generate_batch(["a", "b"], per_row=rows, stop_token_ids=[])
        score: Score = engine.score("The sky is", " blue")
        greedy: bool = score.greedy
        stats: EngineStats = engine.stats()
        hits: int = stats.adapters.adapters["date"].hits
        rss: int = stats.memory["rss_bytes"]
        proposer = stats.speculative.method("prompt-lookup")
        rate = proposer.acceptance_rate if proposer is not None else 0.0
        budget: int | None = stats.kv_cache.budget_bytes_each
        print(json.dumps(stats.to_dict()), hits, rss, rate, budget, greedy)
        with Scheduler(engine, max_batch=8) as scheduler:
            ticket: Ticket = scheduler.submit("Hi", max_new_tokens=4)
            try:
                ticket.result(timeout=1.0)
            except TimeoutError:
                ticket.cancel()
        return [reason, result.text, *deltas, *(r.text for r in batch)]


async def async_service(folder: str) -> str:
    async with AsyncEngine.load(folder, scheduler={"max_batch": 8}) as engine:
        try:
            result = await asyncio.wait_for(engine.generate("Hello", max_new_tokens=64), timeout=2.0)
        except (TimeoutError, InputError, PrefixportError):
            return ""
        parts = [delta async for delta in engine.stream("Tell me", max_new_tokens=8, timeout=1.0)]
        return result.text + "".join(parts)
