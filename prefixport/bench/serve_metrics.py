"""The serving benchmark's metrics: per request (TTFT, inter-token gaps, time per output token,
end-to-end latency, tokens), per sweep point (throughputs, distributions, goodput) and the
options that shape them (--slo, --concurrency, --rate). Percentiles: `measure.percentile`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .measure import percentile, summary
from .serve_client import StreamResult
from .serve_data import BenchRequest

SLO_KEYS = {"ttft": "time to first token", "itl": "the request's p99 inter-token latency",
            "tpot": "time per output token", "e2e": "end-to-end latency"}
QUANTILES = (0.5, 0.9, 0.99)
_BOUND = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)")


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=2s,itl=200ms,...` -> {key: seconds}; keys `SLO_KEYS`, each with a unit, ms or s.
    ValueError saying what is wrong; "" -> {}."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"{item!r}: give KEY=BOUND, e.g. ttft=2s,itl=200ms")
        if key not in SLO_KEYS:
            raise ValueError(f"{item!r}: unknown key {key!r}; the keys are {', '.join(SLO_KEYS)}")
        if key in out:
            raise ValueError(f"{key} is given twice")
        m = _BOUND.fullmatch(value)
        if m is None:
            raise ValueError(f"{item!r}: the bound must be a number with a unit, ms or s (e.g. {key}=200ms or "
                             f"{key}=0.2s)")
        seconds = float(m[1]) / (1000 if m[2] == "ms" else 1)
        if not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"{item!r}: the bound must be above 0")
        out[key] = seconds
    return out


def format_slo(slo: dict[str, float]) -> str:
    """{key: seconds} back to `ttft=2000ms,...` (the report's spelling)."""
    return ",".join(f"{k}={v * 1000:g}ms" for k, v in slo.items())


def parse_concurrency(text: str) -> list[int]:
    """`1,4,16` -> [1, 4, 16]: whole numbers of at least 1. ValueError otherwise."""
    try:
        values = [int(v) for v in _items(text)]
    except ValueError:
        raise ValueError(f"{text!r}: give whole numbers separated by commas, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise ValueError(f"{text!r}: each concurrency must be at least 1")
    return values


def parse_rates(text: str) -> list[float]:
    """`0.5,1,inf` -> [0.5, 1.0, inf]: requests per second above 0, `inf` for all at once."""
    try:
        values = [float(v) for v in _items(text)]
    except ValueError:
        raise ValueError(f"{text!r}: give request rates per second separated by commas, e.g. 0.5,1,2,inf") from None
    if not values or any(not v > 0 for v in values):  # NaN fails too
        raise ValueError(f"{text!r}: each rate must be above 0 (inf: all at once)")
    return values


def _items(text: str) -> list[str]:
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):
        raise ValueError(text)
    return items


@dataclass(frozen=True)
class RequestMetrics:
    """One answered request's figures, in seconds and tokens."""

    ttft_s: float
    e2e_s: float
    gaps_s: list[float]
    tpot_s: float | None  # (e2e - ttft) / (output tokens - 1); None for a single token
    input_tokens: int
    output_tokens: int
    output_from_usage: bool
    cached_tokens: int | None

    def itl_p99_s(self) -> float | None:
        return percentile(self.gaps_s, 0.99) if self.gaps_s else None

    def meets(self, slo: dict[str, float]) -> bool:
        """Whether every bound of `slo` holds (itl: the request's own p99 gap; a request of one
        output chunk has no gap, and one of one token no tpot: those bounds hold)."""
        itl, tpot = self.itl_p99_s(), self.tpot_s
        measured = {"ttft": self.ttft_s, "e2e": self.e2e_s, "itl": itl, "tpot": tpot}
        return all(measured[key] is None or measured[key] <= bound for key, bound in slo.items())  # type: ignore[operator]


def request_metrics(request: BenchRequest, result: StreamResult, count: Callable[[str], int]) -> RequestMetrics:
    """The figures of an answered request (no error, at least one output chunk): tokens from the
    server's usage where it sent one, else `count` (the benchmark's tokenizer) of the prompt and the
    text."""
    usage = result.usage or {}
    completion = usage.get("completion_tokens")
    output = int(completion) if isinstance(completion, int) else count(result.text)
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    ttft = result.ttft_s
    assert ttft is not None, "an answered request has a first chunk"
    tpot = (result.latency_s - ttft) / (output - 1) if output > 1 else None
    return RequestMetrics(ttft, result.latency_s, result.gaps_s, tpot,
                          int(prompt) if isinstance(prompt, int) else request.input_len, output,
                          isinstance(completion, int), cached if isinstance(cached, int) else None)


def failure(result: StreamResult) -> str | None:
    """Why a request counts as failed: its error, or no output at all."""
    if result.error is not None:
        return result.error
    if not result.chunk_times_s:
        return f"no output text (finish_reason {result.finish_reason!r})"
    return None


def point_metrics(requests: Sequence[BenchRequest], results: Sequence[StreamResult], count: Callable[[str], int],
                  slo: dict[str, float], errors_kept: int = 3) -> dict[str, Any]:
    """One sweep point's report from its requests and results (in the same order): counts, the
    first distinct error texts, the duration (the first request sent to the last answer), the
    throughputs over it, the distributions in ms (mean, p50, p90, p99, min, max, n), goodput."""
    answered: list[RequestMetrics] = []
    errors: list[str] = []
    for request, result in zip(requests, results):
        why = failure(result)
        if why is None:
            answered.append(request_metrics(request, result, count))
        elif why not in errors and len(errors) < errors_kept:
            errors.append(why)
    starts = [r.start for r in results]
    duration = max(r.start + r.latency_s for r in results) - min(starts) if results else 0.0
    output = sum(m.output_tokens for m in answered)
    inputs = sum(m.input_tokens for m in answered)
    from_usage = sum(m.output_from_usage for m in answered)
    cached = [m.cached_tokens for m in answered if m.cached_tokens is not None]

    def per_s(x: float) -> float | None:
        return x / duration if duration > 0 else None

    point: dict[str, Any] = {
        "requests": {"sent": len(results), "ok": len(answered), "failed": len(results) - len(answered),
                     "errors": errors},
        "duration_s": duration,
        "request_throughput": per_s(len(answered)),
        "output_throughput": per_s(output),
        "total_token_throughput": per_s(inputs + output),
        "input_tokens": inputs,
        "output_tokens": output,
        "output_tokens_from": ("usage" if from_usage == len(answered) else "tokenizer" if from_usage == 0
                               else f"usage for {from_usage} of {len(answered)}, else tokenizer"),
        "cached_tokens": sum(cached) if cached else None,
        "ttft_ms": summary([m.ttft_s for m in answered], 1000, QUANTILES),
        "itl_ms": summary([g for m in answered for g in m.gaps_s], 1000, QUANTILES),
        "tpot_ms": summary([m.tpot_s for m in answered if m.tpot_s is not None], 1000, QUANTILES),
        "e2e_ms": summary([m.e2e_s for m in answered], 1000, QUANTILES),
    }
    if slo:
        met = sum(m.meets(slo) for m in answered)
        point["goodput"] = {"requests_met": met, "fraction": met / len(results) if results else None,
                            "requests_per_s": per_s(met)}
    return point
