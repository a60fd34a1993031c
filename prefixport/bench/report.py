"""Benchmark outputs: JSON, a Markdown table, PNG plots (matplotlib, when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.1f}"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    grown = "VRAM" if r["device"] == "cuda" else "RSS"
    lines = [f"# prefixport bench: {r['model']} on {r['device']} ({r.get('backend', 'onnxruntime')})", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; "
             f"{', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Memory: {r['memory_counter']}.", ""]
    s = r["swap"]
    lines += ["## Adapter swap: time to first token after switching adapter (64-token prompt)", "",
              "| way | p50 ms | p95 ms | × resident |", "|---|---|---|---|"]
    for key, label in (("resident_s", "prefixport, adapter resident"), ("from_disk_s", "prefixport, read from disk"),
                       ("peft_set_adapter_s", "PEFT on PyTorch, set_adapter"),
                       ("naive_new_session_s", "naive: a new session (engine) per adapter")):
        if key in s:
            ratio = s["ratios_vs_resident"].get(key, 1.0)
            lines.append(f"| {label} | {_ms(s[key]['p50'])} | {_ms(s[key]['p95'])} | {ratio:.1f} |")
    mem = r["memory"]
    lines += ["", f"## Memory per adapter ({mem['bundle']}, bundle {mem['bundle_bytes']:,} bytes)", "",
              f"| adapters | prefixport store MB (exact) | prefixport {grown} growth MB | PEFT MB (extrapolated) "
              "| naive N models MB (extrapolated) |", "|---|---|---|---|---|"]
    peft = mem.get("peft_extrapolated")
    for i, p in enumerate(mem["points"]):
        peft_mb = f"{peft[i]['bytes'] / 1e6:.1f}" if peft else "–"
        lines.append(f"| {p['adapters']} | {p['store_resident_bytes'] / 1e6:.1f} | {p['rss_bytes'] / 1e6:.1f} | "
                     f"{peft_mb} | {mem['naive_extrapolated'][i]['bytes'] / 1e6:.0f} |")
    low, high = mem["rss_adapters"]
    lines += ["", f"Per registered adapter: the store's exact count **{mem['store_per_adapter_bytes']:,.0f} bytes**; "
              f"{grown} growth **{mem['rss_per_adapter_bytes']:,.0f} bytes** "
              f"({mem['rss_per_adapter_over_bundle_bytes']:.2f} × the bundle), the slope from {low} to {high} "
              f"adapters in a fresh process ({mem['rss_expected_growth_bytes'] / 1e6:.0f} MB by the store's count"
              + (", far above the heap's noise; the first rows show free heap absorbing small growth)."
                 if mem["rss_expected_growth_bytes"] >= 32e6 else
                 ": too little to rise above the heap's noise, so a rough figure)."), "",
              "## Latency at batch 1 (ms)", "", "| prompt tokens | config | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |",
              "|---|---|---|---|---|---|"]
    for length, row in r["latency"].items():
        for label, v in row.items():
            itl = v["itl_s"] or {}
            lines.append(f"| {length} | {label} | {_ms(v['ttft_s']['p50'])} | {_ms(v['ttft_s']['p95'])} | "
                         f"{_ms(itl.get('p50'))} | {_ms(itl.get('p95'))} |")
    lines += ["", "## Throughput (generated tokens/s, p50)", "", "| batch | one adapter | adapter per row |",
              "|---|---|---|"]
    for batch, v in r["throughput"].items():
        lines.append(f"| {batch} | {v['one adapter']['tokens_per_s']['p50']:.1f} | "
                     f"{v['adapter per row']['tokens_per_s']['p50']:.1f} |")
    f = r["floor"]
    if "skipped" in f:
        lines += ["", "## Floor", "", f"Not measured: {f['skipped']}.", ""]
    else:
        bw = f["bandwidth"]
        probes = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in bw["probes"].items())
        lines += ["", "## Floor", "", f"Read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s, the fastest of "
                  f"{len(bw['probes'])} probes over {bw['array_mb']} MB on {bw['threads']} threads (GB/s: {probes}); "
                  f"weights {f['weight_bytes'] / 1e6:.0f} MB → decode floor {_ms(f['decode_floor_s'])} ms/token; "
                  f"measured {_ms(f['decode_step_p50_s'])} ms = **{f['measured_over_floor']:.2f} × the floor**."]
        if f["beaten"]:
            lines.append("**The measured decode beat this floor: the probes read slower than the model does on this "
                         "machine, so it is not a floor.**")
        lines.append("")
    if not r["peft"]["available"]:
        lines.append(f"PEFT and transformers columns skipped: {r['peft']['reason']}.")
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    s = r["swap"]
    keys = [k for k in ("resident_s", "from_disk_s", "peft_set_adapter_s", "naive_new_session_s") if k in s]
    labels = {"resident_s": "prefixport\nresident", "from_disk_s": "prefixport\nfrom disk",
              "peft_set_adapter_s": "PEFT\nset_adapter", "naive_new_session_s": "naive\nnew session"}
    ax1.bar([labels[k] for k in keys], [s[k]["p50"] * 1000 for k in keys],
            yerr=[[0] * len(keys), [(s[k]["p95"] - s[k]["p50"]) * 1000 for k in keys]], color="tab:blue")
    ax1.set_ylabel("time to first token after a swap (ms, p50; bar to p95)")
    ax1.set_yscale("log")
    ax1.set_title("Adapter swap")
    mem = r["memory"]
    n = [p["adapters"] for p in mem["points"]]
    ax2.plot(n, [p["store_resident_bytes"] / 1e6 for p in mem["points"]], "o-", label="prefixport (store bytes)")
    rss = [(p["adapters"], p["rss_bytes"] / 1e6) for p in mem["points"] if p["rss_bytes"] > 0]
    if rss:
        ax2.plot(*zip(*rss), "x:", label="prefixport (measured RSS growth)")
    ax2.plot(n, [p["bytes"] / 1e6 for p in mem["naive_extrapolated"]], "s--", label="naive N models (extrapolated)")
    if "peft_extrapolated" in mem:
        ax2.plot(n, [p["bytes"] / 1e6 for p in mem["peft_extrapolated"]], "^--", label="PEFT (extrapolated)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("adapters registered")
    ax2.set_ylabel("MB")
    ax2.set_title("Memory for N adapters")
    ax2.legend()
    fig.suptitle(f"{r['model']} on {r['device']} ({r['machine']['cpu']}, {r['machine']['cores']} cores)")
    fig.tight_layout()
    paths.append(out / "swap_memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = list(r["throughput"])
    for label in ("one adapter", "adapter per row"):
        ax.plot([int(b) for b in batches], [r["throughput"][b][label]["tokens_per_s"]["p50"] for b in batches],
                "o-", label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens/s (p50)")
    ax.set_title("Throughput")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(r: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(r))
    written = {"json": out / "bench.json", "markdown": out / "bench.md"}
    written.update({p.stem: p for p in plots(r, out)})
    return written
