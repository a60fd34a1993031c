"""Metrics under Ray Serve: each replica pushes its `/metrics` body every `METRICS_PUSH_S` seconds
to a small Ray actor of its application (`MetricsBoard`, made by the ingress), whose `/metrics`
serves them merged, each sample labelled with its replica."""

import logging
import threading
import time
from typing import Callable

import ray

log = logging.getLogger(__name__)

METRICS_PUSH_S = 2.0  # how often each replica sends its metrics to the board
METRICS_NAMESPACE = "prefixport"  # the Ray namespace of the boards, one per application


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest /metrics body of each replica of one application; a replica not heard from for
    three pushes is dropped (it stopped or was replaced)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < 3 * METRICS_PUSH_S}
        return {r: text for r, (_, text) in self.texts.items()}


def board_name(app_name: str) -> str:
    return f"metrics:{app_name}"


def push_metrics(board: str, replica: str, render: Callable[[], bytes], stopped: threading.Event) -> None:
    """A replica's metrics thread: send `render()` (its /metrics body) to the application's board
    every METRICS_PUSH_S seconds until `stopped` (the board found by name each time: the ingress may
    not be up yet, or may have restarted). Any error is logged, once while it repeats, and the
    pushes go on."""
    failing: str | None = None  # the error of the last push
    while True:
        try:
            actor = ray.get_actor(board, namespace=METRICS_NAMESPACE)
            actor.put.remote(replica, render().decode())
            failing = None
        except ValueError:  # no board (yet)
            pass
        except Exception as e:
            if repr(e) != failing:
                log.exception("pushing metrics to %s failed (retrying every %s s)", board, METRICS_PUSH_S)
            failing = repr(e)
        if stopped.wait(METRICS_PUSH_S):
            return
