"""Soak: `prefixport serve` under a long mixed load with adapters registered and deleted meanwhile,
and 10,000s of adapter register/unregister cycles in the engine; errors, latency, and whether
memory and file descriptors stay flat.

Server soak (a subprocess on a free 127.0.0.1 port, with --allow-adapter-admin and no keys so that
the churn may register and delete adapters; the fp32 export by default: its greedy texts
do not depend on the batch, so the determinism check below is a real check, and at 32 clients it
is no slower here than int8):
C asyncio clients (default 32; server --max-batch C; streamed requests through `prefixport bench
serve`'s client, prefixport.bench.serve_client) pull from one seeded list of R requests
(default 560, of which 35 bad ones) mixing
  - models: the base model, 4 adapters registered at start (the export's two bundles and a copy of
    each under another name), and "hot" adapters that a churn task registers (POST /v1/adapters,
    from a sub-folder the server does not scan) and deletes (DELETE /v1/adapters/NAME) all along;
  - /v1/chat/completions and /v1/completions, streamed (SSE, usage chunk) or not;
  - greedy, seeded sampling and unseeded sampling (temperature, top_p, top_k, repetition_penalty),
    some with stop strings, some with ignore_eos; max_tokens 16-24, prompts of a few to ~100 tokens;
  - requests the client cancels on purpose: a stream closed after its first chunks, a whole
    (non-streamed) request abandoned after a second (`cancelled`, not errors);
  - every 16th request is deliberately bad (unknown model, unknown field, out-of-range field,
    unsupported field, malformed JSON, empty messages, over the context, an adapter just deleted,
    bad adapter POST/DELETE) and its 4xx status and error code are checked (`bad_expected_ok`).
Hot-adapter requests are streamed: a request counts as running on its adapter once its response
headers arrive (the server has queued it); the churn task closes an adapter to new requests, waits
until those sent have been accepted, then deletes it while they still run: they must finish
normally. Every answer is checked (status, [DONE], usage, tokens <= max_tokens, == max_tokens with
ignore_eos and finish "length", no stop string in the text). Greedy and seeded requests are drawn
from a pool of repeated templates, and the templates whose texts differed are counted, greedy and
seeded apart (streamed or not, any adapter name over the same bundle, any batch): a row's adapter
and sampling must be kept apart from its neighbours'. Not counted as errors, since rows are not
bit-identical in every batch: with the fp32 export a row's logits in some batches of 17-32 rows
differ from alone by ~3e-5, which can flip a seeded sample across a boundary of the cumulative
distribution (to the next token id that carries probability) though greedy argmax holds; with a
quantized export ONNX Runtime's MatMulNBits differs more, and greedy texts change with the batch.
Recorded: errors (unexpected statuses, exceptions, failed checks: goal 0) with the first bodies,
latency and TTFT p50/p95/p99, throughput, the server's RSS (/metrics prefixport_memory_bytes{kind="rss"}
and /proc/PID/status VmRSS) after warm-up, every few seconds and at the end (idle), its max and
slope, /health at the end (running 0, waiting 0), the server's request counters, and the CPU used
by the server, this client and every other process on the machine (others: noise).

Engine soak (in this process): `Engine.load(EXPORT)` twice, without an adapter budget and with a
budget of about one prefix bundle plus one prompt bundle (so registering evicts), each for N
register/unregister cycles (default 10,000): alternating prompt and prefix bundles under 8 names,
3 registered at a time (register the new one, unregister the oldest), a lookup every 7 cycles (an
evicted adapter is re-read from its file), a replacement (same name, other bundle) every 25, a
truncated bundle refused every 100 (an error path), and a greedy generation check every 500 cycles
(base, two anchors, the newest churned name) that must equal the reference made at the start.
RSS (after gc), open file descriptors (/proc/self/fd) and memory maps (/proc/self/maps) at the
start, every 1,000 cycles and at the end.

    python -m tools.soak [--export exports/smollm2-135m-instruct] [--requests 560] [--concurrency 32] \\
        [--cycles 10000] [--max-seconds 900] [--quick] [--out benchmarks/results/soak]

--max-seconds bounds the whole run: the server soak stops sending at its share (--server-seconds,
default 600 s), cancels what is still running --grace-seconds (60) later, and the engine soak stops
at the bound; a run cut short says so (`bounded_out`). Writes OUT/soak.json and OUT/soak.md (--quick:
soak_quick.*, 40 requests, 8 clients, 1,000 cycles), prints the tables, then one JSON line.

The parts: workload.py (the requests, bad ones included, and how an answer is checked),
hot_adapters.py (adapters registered and deleted under the load), server.py (the server soak),
engine.py (the engine soak), report.py (the Markdown), __main__.py (the command line).
"""

BUNDLES = {"prefix": "date-prefix", "prompt": "json-prompt"}  # kind -> the export's bundle (file stem)
STATIC_ADAPTERS = {"date-prefix": "date-prefix", "json-prompt": "json-prompt",  # name -> bundle; registered at start
                   "date-prefix-copy": "date-prefix", "json-prompt-copy": "json-prompt"}
