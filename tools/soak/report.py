"""The soak's Markdown report: the server soak's tables, the engine soak's phases, the machine."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import cell, machine_line


def markdown(result: dict[str, Any]) -> str:
    """The report of a soak result (either part may be missing: --skip-server, --skip-engine)."""
    lines = [f"# Soak: `prefixport serve` under mixed load, and adapter churn in the engine"
             f"{' (quick smoke run)' if result['quick'] else ''}", ""]
    s = result.get("server")
    if s:
        lat, ttft, rss, ch = s["latency_ms"] or {}, s["ttft_ms"] or {}, s["rss_mib"], s["adapter_churn"]
        det, cpu = s["deterministic"], s["cpu"]
        lines += [
            f"## Server: {s['requests_sent']} requests, {s['clients']} concurrent clients ({s['model']}, "
            f"`{s['export']}`)", "",
            f"Server: `{s['server_command']}`. Mix (not counting the bad ones): "
            + ", ".join(f"{k} x{v}" for k, v in s["mix"].items())
            + f"; {s['with_stop_strings']} with stop strings; max_tokens 16-24. Latency: send to last byte of "
            "the answers that completed (ok); TTFT: streamed ones, send to the first chunk carrying output text.", "",
            "| requests | ok | errors | cancelled on purpose | bad, expected 4xx ok | wall s | req/s | gen tok/s | "
            "latency p50 / p95 / p99 ms | TTFT p50 / p95 / p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {s['requests_sent']} | {s['ok']} | {s['errors']} | {s['cancelled']} | "
            f"{s['bad_expected_ok']}/{s['bad_sent']} | {s['wall_s']:.0f} | {s['requests_per_s']:.2f} | "
            f"{s['completion_tokens_per_s']:.1f} | {cell(lat.get('p50'), '.0f')} / {cell(lat.get('p95'), '.0f')} / "
            f"{cell(lat.get('p99'), '.0f')} | {cell(ttft.get('p50'), '.0f')} / {cell(ttft.get('p95'), '.0f')} / "
            f"{cell(ttft.get('p99'), '.0f')} |", "",
            f"| server RSS MiB (loaded, before any request: {cell(rss['loaded'])}) | start (idle, after a full-width "
            f"warm-up of {2 * s['clients']} requests, {cell(rss['warm_up_s'], '.0f')} s) | end (idle) | max | "
            "slope during the load |",
            "|---|---|---|---|---|",
            f"| /metrics `prefixport_memory_bytes{{kind=\"rss\"}}` | {cell(rss['start'])} | {cell(rss['end'])} | "
            f"{cell(rss['max'])} | {cell(rss['slope_per_min'], '+.2f')} MiB/min ({rss['samples']} samples; second "
            f"half {cell(rss['slope_per_min_second_half'], '+.2f')} MiB/min; {cell(rss['at_quarter'])} MiB a quarter "
            "of the way in) |",
            f"| /proc/PID/status VmRSS | {cell(rss['vmrss_start'])} | {cell(rss['vmrss_end'])} | "
            f"{cell(rss['vmrss_max'])} | "
            f"{cell(rss['vmrss_slope_per_min'], '+.2f')} MiB/min |", "",
            f"Adapter churn over HTTP: {ch['cycles']} register/delete cycles of hot adapters "
            f"(POST p50 {cell((ch['post_ms'] or {}).get('p50'), '.0f')} ms, DELETE p50 "
            f"{cell((ch['delete_ms'] or {}).get('p50'), '.0f')} ms), {ch['hot_requests']} requests on hot adapters; "
            f"{ch['deleted_with_requests_running']} deletes happened with requests running on the adapter: "
            f"{ch['requests_running_at_delete']} such requests, outcomes "
            + (", ".join(f"{k} {v}" for k, v in ch["of_which"].items()) or "-") + ".",
            "",
            f"Determinism: {det['requests']} greedy or seeded requests from {det['templates_repeated']} templates "
            f"sent more than once; templates whose texts differed: greedy {det['greedy_differing']} of "
            f"{det['greedy_templates']}, seeded {det['seeded_differing']} of {det['seeded_templates']}"
            + (" (not errors: this export is quantized, and ONNX Runtime's MatMulNBits gives a row different "
               "logits in a batch than alone, so the batch composition changes greedy and seeded texts)"
               if s["quantized"] else
               " (not errors: in some batches a row's fp32 logits differ from alone by ~3e-5, which can flip a "
               "seeded sample across a boundary of the cumulative distribution, to the next token id that carries "
               "probability; greedy texts must not differ)")
            + ".", "",
            f"End: /health {json.dumps({k: s['health_end'].get(k) for k in ('status', 'running', 'waiting', 'adapters')})}"
            f"; max running {cell(s['max_running'], '.0f')}, max waiting {cell(s['max_waiting'], '.0f')}; server "
            f"request counters by status during the load: {json.dumps(s['server_status_counts'])} (client's view, "
            f"adapter POST/DELETE included, abandoned = 499: {json.dumps(s['client_status_counts'])}"
            f"{'' if s['status_counts_agree'] else ': they differ'}); server-side "
            f"cancellations {s['server_cancelled']:.0f} (client cancelled {s['cancelled']}).", "",
            f"CPU s during the load: server {cell(cpu['server_s'])}, client {cell(cpu['client_s'])}, other processes "
            f"{cell(cpu['others_s'])} ({100 * (cpu['others_share'] or 0):.0f}% of the cores)"
            + ("; busiest others: " + "; ".join(f"`{p['command'][:60]}` {p['cpu_s']} s" for p in cpu["busiest_others"])
               if cpu["busiest_others"] else "") + ".", "",
            "| outcome by kind | " + " | ".join(["ok", "error", "cancelled", "cancel_came_too_late",
                                                 "bad_expected_ok"]) + " |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in s["by_kind"].items():
            lines.append(f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in
                                                  ("ok", "error", "cancelled", "cancel_came_too_late",
                                                   "bad_expected_ok")) + " |")
        if s["first_errors"]:
            lines += ["", "First errors:", ""] + [f"- `{e[:300]}`" for e in s["first_errors"]]
        if s["bounded_out"]:
            lines += ["", f"**Bounded out:** {s['bounded_out']}."]
        lines.append("")
    e = result.get("engine")
    if e:
        lines += [f"## Engine: adapter register/unregister cycles (`{e['export']}`, in process)", "",
                  "| phase | cycles | wall s | cycles/s | evictions | re-reads | generation checks ok | errors | "
                  "RSS MiB start / end (growth) | RSS slope MiB/1000 cycles | fds start / end | maps start / end | "
                  "after close: RSS MiB / fds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, p in e["phases"].items():
            lines.append(
                f"| {label} | {p['cycles']} | {p['wall_s']:.1f} | {cell(p['cycles_per_s'], '.0f')} | "
                f"{p['evictions']} | "
                f"{p['misses']} | {p['generation_checks'] - len(p['check_mismatches'])}/{p['generation_checks']} | "
                f"{p['n_errors']} | {p['start']['rss_mib']:.1f} / {p['end']['rss_mib']:.1f} "
                f"({p['rss_growth_mib']:+.1f}) | {cell(p['rss_slope_mib_per_1000_cycles'], '+.3f')} | "
                f"{p['start']['fds']} / {p['end']['fds']} | {p['start']['maps']} / {p['end']['maps']} | "
                f"{p['after_close']['rss_mib']:.1f} / {p['after_close']['fds']} |")
        first = next(iter(e["phases"].values()), None)
        lines += ["", "Per cycle: register a bundle (prompt and prefix alternating, 8 names, 3 registered at once), "
                  "unregister the oldest; a lookup every 7 cycles, a replacement every 25, a truncated bundle refused "
                  "every 100; greedy generation checks (base, both anchors, the newest churned name; 8 tokens) every "
                  f"{result['args']['check_every']} cycles against the reference made at the start. Operations "
                  f"(first phase): {json.dumps(first and first['operations'])}. RSS after gc.collect(), sampled every "
                  f"{result['args']['sample_cycles']} cycles: "
                  + "; ".join(f"{label}: " + ", ".join(f"{x['rss_mib']:.1f}" for x in p["samples"])
                              for label, p in e["phases"].items()) + "."]
        for label, p in e["phases"].items():
            if p["errors"] or p["check_mismatches"]:
                lines += ["", f"{label}: errors {p['errors'][:3]}, mismatches {p['check_mismatches'][:2]}"]
        cut = [label for label, p in e["phases"].items() if p["bounded_out"]]
        if cut or len(e["phases"]) < 2:
            lines += ["", f"**Bounded out:** --max-seconds cut the engine soak short ({', '.join(cut) or 'a phase skipped'})."]
        ecpu = [p["cpu"] for p in e["phases"].values()]
        lines += ["", "CPU s by other processes during the engine phases: "
                  + ", ".join(f"{cell(c['others_s'])} ({100 * (c['others_share'] or 0):.0f}% of the cores"
                              + "".join(f"; `{p['command'][:60]}` {p['cpu_s']} s" for p in c["busiest_others"][:3])
                              + ")" for c in ecpu), ""]
    lines += [f"{machine_line(result['machine'])} Run began {result['began_utc']}.", "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all)", ""]
    return "\n".join(lines)
