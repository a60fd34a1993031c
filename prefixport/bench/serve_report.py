"""The serving benchmark's report: serve.json, serve.md and serve.png (latency and throughput
against load; matplotlib, when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))


def load_label(load: dict[str, Any]) -> str:
    """A sweep point's load in words: `concurrency 4`, `rate 2/s`, `rate inf (max concurrency 8)`."""
    if "concurrency" in load:
        return f"concurrency {load['concurrency']}"
    rate = load["rate"]
    text = "rate inf" if rate == "inf" else f"rate {rate:g}/s"
    return text + (f" (max concurrency {load['max_concurrency']})" if load.get("max_concurrency") else "")


def _num(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(r: dict[str, Any]) -> str:
    """The report as Markdown: the setup, a throughput table and a latency table per sweep point."""
    d, m = r["dataset"], r["client_machine"]
    lengths = (f"lengths from {d['lengths_file']}" if d["kind"] == "file" else
               f"input {d['input_len'][0]}:{d['input_len'][1]} tokens, output {d['output_len'][0]}:{d['output_len'][1]}")
    extra = (f", a shared prefix of {d['prefix_len']} tokens" if d["kind"] == "shared-prefix" else
             f", adapters {', '.join(d['adapters'])} in turn" if d["kind"] == "adapters" else "")
    slo = r["slo"]
    lines = [f"# prefixport bench serve: {r['label']}", "",
             f"{r['model']} at {r['base_url']} ({r['endpoint']} endpoint, streamed, greedy"
             f"{', ignore_eos' if r['ignore_eos'] else ''}); dataset {d['kind']}: {d['num_prompts']} requests per "
             f"point, {lengths}{extra}; seed {d['seed']}, {r['warmup']} warm-up request(s). "
             f"Client: {m['cpu']}, {m['cores']} cores. {r['started']}.", "",
             f"Goodput SLO: {slo['spec'] or 'none'}"
             + (f" ({'; '.join(slo['meaning'])})" if slo["spec"] else "") + ".", "",
             "| load | ok / failed | duration s | req/s | output tok/s | total tok/s | goodput req/s |",
             "|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        q = p["requests"]
        good = p.get("goodput")
        lines.append(f"| {load_label(p['load'])} | {q['ok']} / {q['failed']} | {p['duration_s']:.2f} | "
                     f"{_num(p['request_throughput'], '.2f')} | {_num(p['output_throughput'])} | "
                     f"{_num(p['total_token_throughput'])} | "
                     f"{_num(good['requests_per_s'], '.2f') if good else '–'} |")
    lines += ["", "Latency (ms):", "", "| load | metric | mean | p50 | p90 | p99 | n |", "|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        for key, name in METRICS:
            s = p[key]
            if s is None:
                lines.append(f"| {load_label(p['load'])} | {name} | – | – | – | – | 0 |")
            else:
                lines.append(f"| {load_label(p['load'])} | {name} | {s['mean']:.1f} | {s['p50']:.1f} | "
                             f"{s['p90']:.1f} | {s['p99']:.1f} | {s['n']} |")
    failed = [p for p in r["points"] if p["requests"]["errors"]]
    if failed:
        lines += ["", "Errors (the first of each point):", ""]
        for p in failed:
            for e in p["requests"]["errors"]:
                lines.append(f"- {load_label(p['load'])}: `{e[:300]}`")
    sources = {p["output_tokens_from"] for p in r["points"] if p["requests"]["ok"]}
    lines += ["", f"Output tokens counted from: {', '.join(sorted(sources)) or '–'}. {r['definitions']}", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path | None:
    """serve.png: TTFT, ITL and TPOT, end-to-end latency and output tokens/s against the sweep's load
    (p50 and p99; TPOT mean); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = r["points"]
    x = list(range(len(points)))
    ticks = [str(p["load"].get("concurrency", p["load"].get("rate"))) for p in points]
    xlabel = "concurrency" if r["sweep"] == "concurrency" else "request rate (req/s)"

    def series(key: str, stat: str) -> list[float]:
        return [p[key][stat] if p[key] else float("nan") for p in points]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(axes[0][0], "time to first token (ms)", [("ttft_ms", "p50"), ("ttft_ms", "p99")]),
              (axes[0][1], "inter-token latency, TPOT (ms)", [("itl_ms", "p50"), ("itl_ms", "p99"), ("tpot_ms", "mean")]),
              (axes[1][0], "end-to-end latency (ms)", [("e2e_ms", "p50"), ("e2e_ms", "p99")])]
    for ax, title, lines in panels:
        for key, stat in lines:
            ax.plot(x, series(key, stat), "o-" if stat == "p50" else "s--" if stat == "p99" else "^:",
                    label=f"{key.split('_')[0].upper()} {stat}")
        ax.set_title(title)
        ax.legend()
    ax = axes[1][1]
    ax.plot(x, [p["output_throughput"] or float("nan") for p in points], "o-", label="output tok/s")
    if any(p.get("goodput") for p in points):
        ax2 = ax.twinx()
        ax2.plot(x, [p["goodput"]["requests_per_s"] or 0.0 for p in points], "s--", color="tab:green",
                 label="goodput req/s")
        ax2.set_ylabel("goodput (req/s)")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="lower right")
    ax.set_title("output throughput (tokens/s)")
    ax.legend(loc="upper left")
    for ax in (a for row in axes for a in row):
        ax.set_xticks(x, ticks)
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{r['label']}: {r['model']}, dataset {r['dataset']['kind']}, {r['endpoint']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(r: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """DIR/serve.json, DIR/serve.md and DIR/serve.png (where matplotlib is installed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "serve.json", "markdown": out / "serve.md"}
    written["json"].write_text(json.dumps(r, indent=2, allow_nan=False) + "\n")
    written["markdown"].write_text(markdown(r))
    png = plot(r, out / "serve.png")
    if png is not None:
        written["plot"] = png
    return written
