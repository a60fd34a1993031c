"""asyncio face of the runtime: `AsyncEngine`, on the scheduler's continuous batching.

Every request joins the one running batch between two decode steps (`Scheduler`), so concurrent
`await engine.generate(...)` calls share decode steps instead of queueing behind each other.
The event loop is never blocked: the scheduler thread runs the model and wakes the loop per step.
A request whose consumer goes away (its task cancelled, as `asyncio.wait_for` does on a timeout;
a stream closed or abandoned) leaves the batch at the next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Unpack

from .engine import Engine
from .requests import Prompt
from .results import GenerationResult
from .scheduler import Scheduler, Ticket
from .settings import GenerationSettings


class AsyncTextStream:
    """Text deltas of one request, `async for delta in stream`; `.result` once exhausted (its
    `finish_reason` says why it ended: a stream that runs out of time just ends, "timeout").
    `aclose()` (or leaving `async with`) cancels it, and `.result` then holds what was made
    ("cancelled"), as `TextStream.close` does; cancelling the iterating task cancels it too."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.result: GenerationResult | None = None
        self._events = ticket.aevents()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        async for event in self._events:
            if event.error is not None:
                raise event.error
            if event.result is not None:
                self.result = event.result
            if event.text:
                yield event.text

    async def aclose(self) -> None:
        """Cancel the request if it is still running; `.result` then holds what it made, finish
        reason "cancelled" (it waits for the row to leave the batch: the scheduler's next step).
        Where the request failed instead, `.result` stays None (iterating raises the error)."""
        if self.result is None:
            self.ticket.cancel()
        await self._events.aclose()  # type: ignore[attr-defined]
        if self.result is None:
            try:
                self.result = await self.ticket.aresult()
            except Exception:  # noqa: BLE001 - the request's own error, not the closing's
                pass

    async def __aenter__(self) -> "AsyncTextStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncEngine:
    """An Engine served to asyncio code through a Scheduler of its own.

        async with AsyncEngine.load("exports/smollm2-135m-instruct") as engine:
            result = await engine.generate("Hello", max_new_tokens=32, timeout=10)
            async for delta in engine.stream("Tell me a story", adapter="json-prompt"):
                print(delta, end="")

    Settings are `Engine.generate`'s (`timeout` included). `scheduler` options: `max_batch`,
    `prefill_budget`, `max_waiting`, `speculative`, `speculate_max_batch` (`Scheduler`).
    """

    def __init__(self, engine: Engine, **scheduler: Any) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, **scheduler)

    @classmethod
    def load(cls, folder: str | Path, *, scheduler: dict[str, Any] | None = None, **options: Any) -> "AsyncEngine":
        """`Engine.load(folder, **options)` wrapped; closing the AsyncEngine closes that engine too."""
        engine = Engine.load(folder, **options)
        try:
            wrapped = cls(engine, **(scheduler or {}))
        except Exception:
            engine.close()
            raise
        wrapped._owns_engine = True
        return wrapped

    _owns_engine = False

    def submit(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> Ticket:
        """Queue a request; bad input raises here, before any work."""
        return self.scheduler.submit(prompt, **settings)

    async def generate(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> GenerationResult:
        """The result of one request; cancelling the awaiting task cancels the request."""
        stream = self.stream(prompt, **settings)
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> AsyncTextStream:
        """`async for delta in engine.stream(...)`; the request is queued at once."""
        return AsyncTextStream(self.submit(prompt, **settings))

    def close(self) -> None:
        """Stop the scheduler (what still runs fails with a shutdown error); and the engine, if
        `load` opened it."""
        self.scheduler.close()
        if self._owns_engine:
            self.engine.close()

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
