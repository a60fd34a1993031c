"""What LoRA served per row costs (docs/benchmarks.md, "LoRA and IA3"), side by side in one process:

1. the LoRA and IA3 inputs when no row uses them: decode of the export made with --lora against the
   export without, batch 1 and 8, no adapters (goal: at most 3% slower), as the engine runs it (the
   plain graph the export ships beside its own) and through the graph with the inputs alone
   (`plain_graph=False`); and the process memory each engine adds;
2. 8 rows with 8 different rank-16 LoRAs on every linear module against the same 8 rows without
   an adapter (goal: at most 35% slower), and against PEFT generating the same 8 requests one after
   another with `set_adapter` per request (goal: at least 3x its tokens/s);
3. memory per resident LoRA (the store's count and the process RSS, `--adapters` of them, against
   their tensors' bytes);
4. swapping LoRAs: requests alternating between two LoRAs against requests of one (at the noise floor).

    python -m benchmarks.lora_cost --plain exports/smollm2-135m-instruct --lora exports/smollm2-lora \\
        [--rounds 5] [--threads 2] [--adapters 100] [--no-peft]

The LoRAs are real PEFT checkpoints of the default model (LoraConfig r=16, all-linear, random A and
B: init_lora_weights=False), converted; the 100 for memory are copies of one with new values.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from benchmarks.common import RESULTS, alternate, command, machine, machine_line, median, rel, say, vm_rss, write_report
from benchmarks.lora_workload import NEW, PROMPTS, ROWS, peft_loras
from prefixport.adapters import Bundle, convert_checkpoint, save_bundle
from prefixport.runtime import Engine
from prefixport.runtime.generation import decode_step, prefill_new

PROMPT_TOKENS, STEPS = 64, 32


def decode_ms(engine: Engine, batch: int, rng: np.random.Generator) -> float:
    """Mean ms of a decode step of `batch` rows without adapters after 64-token prompts."""
    m = engine.manifest
    rows = [rng.integers(100, 20000, PROMPT_TOKENS).tolist() for _ in range(batch)]
    _, cache = prefill_new(engine.backend, rows, extra=STEPS + 2)
    tokens = np.full(batch, 5, np.int64)
    decode_step(engine.backend, cache, tokens, m.hidden_size, np.dtype(m.dtype))
    start = time.perf_counter()
    for _ in range(STEPS):
        decode_step(engine.backend, cache, tokens, m.hidden_size, np.dtype(m.dtype))
    return (time.perf_counter() - start) / STEPS * 1e3


def peft_side(checkpoints: list[Path], prompts: list[str], threads: int) -> float:
    """PEFT: the requests one after another, `set_adapter` to each request's LoRA first; tokens/s."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.exporter.loading import default_gguf

    torch.set_num_threads(threads)
    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model = PeftModel.from_pretrained(base, checkpoints[0], adapter_name="lora0")
    for i, path in enumerate(checkpoints[1:], 1):
        model.load_adapter(path, adapter_name=f"lora{i}")
    start, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            model.set_adapter(f"lora{i}")
            ids = torch.tensor([tok.encode(prompt)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 min_new_tokens=NEW, do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def batch_tok_s(engine: Engine, prompts: list[str], adapters: list[str | None]) -> float:
    start = time.perf_counter()
    results = engine.generate_batch(prompts, adapters, max_new_tokens=NEW, stop_token_ids=[], chat=False)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain", required=True, help="the export without --lora")
    parser.add_argument("--lora", required=True, help="the same model exported with --lora")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "lora_cost"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result: dict = {"command": command("lora_cost"), "machine": machine("peft", "torch"),
                    "plain": rel(args.plain), "lora": rel(args.lora)}
    rss = [vm_rss()]
    plain = Engine.load(args.plain, threads=args.threads, prompt_cache_bytes=0)
    rss.append(vm_rss())
    lora = Engine.load(args.lora, threads=args.threads, prompt_cache_bytes=0)
    if not lora.backend.runs_plain:
        raise SystemExit(f"{args.lora} has no plain graph (made before it): re-export it")
    rss.append(vm_rss())
    lora_graph = Engine.load(args.lora, threads=args.threads, prompt_cache_bytes=0, plain_graph=False)
    rss.append(vm_rss())
    result["engine_rss_bytes"] = {"plain": rss[1] - rss[0], "lora": rss[2] - rss[1], "lora_graph_only": rss[3] - rss[2]}
    say(f"   engine RSS: plain {(rss[1] - rss[0]) / 1e6:.0f} MB, --lora {(rss[2] - rss[1]) / 1e6:.0f} MB, "
        f"--lora without its plain graph {(rss[3] - rss[2]) / 1e6:.0f} MB")

    say("1. the inputs unused: decode, plain export against --lora export (plain graph; inputs' graph)")
    unused = {}
    for batch in (1, 8):
        times = alternate({"plain": lambda: decode_ms(plain, batch, rng), "lora": lambda: decode_ms(lora, batch, rng),
                           "lora_graph": lambda: decode_ms(lora_graph, batch, rng)}, args.rounds)
        p, q, g = median(times["plain"]), median(times["lora"]), median(times["lora_graph"])
        unused[batch] = {"plain_ms": p, "lora_ms": q, "ratio": q / p, "lora_graph_ms": g, "lora_graph_ratio": g / p,
                         "rounds": times}
        say(f"   batch {batch}: {p:.2f} ms / {q:.2f} ms = {q / p:.3f} (inputs' graph {g:.2f} ms = {g / p:.3f})")
    result["unused"] = unused
    lora_graph.close()

    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        say("2. 8 rows with 8 rank-16 LoRAs: making PEFT checkpoints")
        checkpoints = peft_loras(work, ROWS)
        names = []
        for i, path in enumerate(checkpoints):
            bundle, file = convert_checkpoint(path, args.lora, name=f"lora{i}", out=work / f"lora{i}.safetensors")
            lora.add_adapter(f"lora{i}", file)
            names.append(f"lora{i}")
        lora.generate_batch(PROMPTS[:2], names[:2], max_new_tokens=2, chat=False)  # warm
        rates = alternate({"none": lambda: batch_tok_s(lora, PROMPTS, [None] * ROWS),
                           "loras": lambda: batch_tok_s(lora, PROMPTS, names)}, args.rounds)
        none, loras = median(rates["none"]), median(rates["loras"])
        result["eight_loras"] = {"none_tok_s": none, "loras_tok_s": loras, "slowdown": none / loras,
                                 "rounds": rates, "bytes_per_lora": bundle.nbytes}
        say(f"   8 rows: {none:.1f} tok/s without adapters, {loras:.1f} with 8 LoRAs ({none / loras:.3f}x slower)")
        if not args.no_peft:
            peft = peft_side(checkpoints, PROMPTS, args.threads)
            result["eight_loras"]["peft_tok_s"] = peft
            say(f"   PEFT, set_adapter per request: {peft:.1f} tok/s; prefixport {loras / peft:.2f}x")

        say(f"3. memory: {args.adapters} resident LoRAs")
        source = Bundle(dict(bundle.tensors), dict(bundle.metadata))
        rss_before, stats_before = vm_rss(), lora.store.stats().resident_bytes
        for i in range(args.adapters):
            tensors = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 1e-3) for k, v in source.tensors.items()}
            path = save_bundle(Bundle(tensors, {**source.metadata, "name": f"m{i}"}), work / f"m{i}.safetensors")
            lora.add_adapter(f"m{i}", path)
        rss_after, stats_after = vm_rss(), lora.store.stats().resident_bytes
        per_rss = (rss_after - rss_before) / args.adapters if rss_before and rss_after else None
        per_store = (stats_after - stats_before) / args.adapters
        result["memory"] = {"adapters": args.adapters, "tensor_bytes": bundle.nbytes, "store_bytes_per_adapter": per_store,
                            "rss_bytes_per_adapter": per_rss}
        say(f"   per adapter: tensors {bundle.nbytes / 1e6:.2f} MB, store {per_store / 1e6:.2f} MB, "
            f"RSS {per_rss / 1e6 if per_rss else float('nan'):.2f} MB")

        say("4. swapping: requests alternating between two LoRAs against one LoRA")
        turns = itertools.cycle(["lora0", "lora1"])

        def request_ms(adapter: str) -> float:
            start = time.perf_counter()
            lora.generate(PROMPTS[0], adapter=adapter, max_new_tokens=16, stop_token_ids=[], chat=False)
            return (time.perf_counter() - start) * 1e3

        swap = alternate({"same": lambda: request_ms("lora0"), "alternating": lambda: request_ms(next(turns))},
                         args.rounds * 4)
        same, alternating = median(swap["same"]), median(swap["alternating"])
        result["swap"] = {"same_ms": same, "alternating_ms": alternating, "ratio": alternating / same, "requests": swap}
        say(f"   16-token request: {same:.1f} ms with one LoRA, {alternating:.1f} ms alternating")
    plain.close()
    lora.close()

    e = result["eight_loras"]
    md = [f"# LoRA served per row ({machine_line(result['machine'])})", "",
          f"Command: `{result['command']}`", "",
          "| measure | value | goal |", "|---|---|---|"]
    for batch, u in unused.items():
        md.append(f"| decode, batch {batch}, no adapter: --lora / plain | {u['lora_ms']:.2f} / {u['plain_ms']:.2f} ms = "
                  f"{u['ratio']:.3f} | ≤ 1.03 |")
        md.append(f"| the same through the graph with the inputs (`plain_graph=False`) | {u['lora_graph_ms']:.2f} ms = "
                  f"{u['lora_graph_ratio']:.3f} | |")
    r = result["engine_rss_bytes"]
    md.append(f"| process memory an engine adds: plain / --lora / --lora, `plain_graph=False` | {r['plain'] / 1e6:.0f} / "
              f"{r['lora'] / 1e6:.0f} / {r['lora_graph_only'] / 1e6:.0f} MB | |")
    md.append(f"| 8 rows, 8 rank-16 all-linear LoRAs / none | {e['loras_tok_s']:.1f} / {e['none_tok_s']:.1f} tok/s "
              f"({e['slowdown']:.3f}x slower) | ≤ 1.35x |")
    if "peft_tok_s" in e:
        md.append(f"| the same 8 requests, PEFT set_adapter per request | {e['peft_tok_s']:.1f} tok/s "
                  f"(prefixport {e['loras_tok_s'] / e['peft_tok_s']:.2f}x) | ≥ 3x |")
    mem = result["memory"]
    md.append(f"| memory per resident LoRA ({mem['adapters']}) | tensors {mem['tensor_bytes'] / 1e6:.2f} MB, store "
              f"{mem['store_bytes_per_adapter'] / 1e6:.2f} MB, RSS "
              f"{(mem['rss_bytes_per_adapter'] or 0) / 1e6:.2f} MB | = tensors |")
    s = result["swap"]
    md.append(f"| 16-token request, alternating two LoRAs / one | {s['alternating_ms']:.1f} / {s['same_ms']:.1f} ms = "
              f"{s['ratio']:.3f} | noise |")
    text = "\n".join(md) + "\n"
    print(text)
    write_report(Path(args.out), "lora_cost", result, text)


if __name__ == "__main__":
    main()
