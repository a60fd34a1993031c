"""Stage timing and progress messages, shared by the exporter and the CLI."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    """Times named stages; reports each start and end through `echo` with the elapsed time."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.echo = echo or (lambda message: None)
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        self.echo(f"[{self.elapsed():7.1f}s] {message}")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        begun = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - begun
        self.say(f"{name}: done in {self.seconds[name]:.1f}s")
