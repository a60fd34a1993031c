"""Decode speed of prefixport's runtime beside its peers, side by side in one run on one machine.

Sides: prefixport's `Engine` (one per export folder given, labelled by precision);
onnxruntime-genai on the same model, built by its model builder for the CPU at fp32 and int4;
transformers eager (the GGUF-loaded model, a greedy loop with cache) and PEFT eager (a
PeftModel with a prompt-tuning adapter: PeftModel.forward prefills, the base model decodes from
its cache, since PEFT's generate() is broken for these adapters on transformers 5); llama.cpp's
`llama-bench` (benchmarks/llama_cpp.py: built once from source, outside the checkout) on the same
model's GGUF at the precision of each quantised export given (Q8_0 beside int8, Q4_1 beside int4):
batch-1 cases only, one `llama-bench -p 0 -n N -d C -r 1` per repetition, interleaved like the
other sides, where the depth C is the case's prompt tokens (prefilled untimed; N decode steps
timed), so its tok/s is decode alone as for the others; it reports no TTFT and no tokens.

Every side gets the same prompt token ids (8 different raw-text prompts; batch 1 uses the first;
with a context C > 0 each prompt is preceded by a long passage cut so that the row holds C
prompt tokens), decodes greedily and makes exactly N new tokens (EOS ignored by prefixport and the torch loops,
suppressed by genai's min_length). Decode tokens/s = batch * (N - 1) / (time of the last token
- time of the first), so prefill is excluded; time to first token (TTFT) is reported apart. Sides
are interleaved over R repetitions (their order rotated each time), after a warm-up, and reported
as medians with ratios vs prefixport (same precision if given, else the first export). Every
side runs with --threads intra-op threads (default: all cores): genai's built genai_config.json
sets none, and genai then decoded at one-thread speed on a 2-core machine.

    python -m benchmarks.peer_speed --prefixport fp32=exports/smollm2-135m-instruct \\
        [--prefixport int4=exports/smollm2-int4] [--cases 1x0 1x1600 8x1100] [--quick] [--out benchmarks/results]
        [--llama-gguf q8_0 q4_1 | --no-llama-cpp]

A case BxC is B rows of C prompt tokens (C = 0: the short prompts as they are). Each side's
slowdown from the short context to the longest one at batch 1 is reported beside the ratios.

Writes OUT/peer_speed.json and OUT/peer_speed.md. Needs the `export` and `bench` extras (torch,
transformers, peft, onnxruntime-genai). The genai models are built once under --genai-dir
(default exports/genai/, git-ignored) from a Hugging Face folder written there from the
GGUF-loaded model (the builder's own GGUF path takes only float GGUFs and fetches the config
from the hub). Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import collections
import copy
import functools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import RESULTS, ROOT, alternate, cell, machine, rel, say, write_report
from prefixport.bench.measure import spread
from prefixport.manifest import Manifest
from prefixport.runtime import Engine

PROMPTS = [  # raw text, different lengths; none holds the pad/EOS token, which genai pads with
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three most important inventions of the nineteenth century were",
    "To bake a loaf of bread at home, you first need to",
    "The history of the Roman Empire spans many centuries, from the founding of the city to",
    "In the year 2050, cities will look very different because",
    "A good software engineer always",
    "The mountains in the north of the country are covered with snow for most of the year, and the people who live there",
    "Photosynthesis is the process by which plants",
]


@dataclass
class Run:
    ttft_s: float | None  # None: the side does not report it (llama-bench)
    decode_tokens_per_s: float  # all rows together
    tokens: list[list[int]]  # new tokens, per row


Side = Callable[[list[list[int]], int], "Run | None"]  # (prompt ids per row, new tokens) -> Run,
# None where the side does not measure that case (llama-bench: batch 1 only)


# --- prefixport ------------------------------------------------------------------------------

def prefixport_side(engine: Engine) -> Side:
    def run(rows: list[list[int]], n: int) -> Run:
        if len(rows) == 1:
            r = engine.generate(rows[0], max_new_tokens=n, stop_token_ids=[])
            return Run(r.timings["prefill_s"], r.timings["decode_tokens_per_s"], [r.token_ids])
        results = engine.generate_batch(rows, max_new_tokens=n, stop_token_ids=[])
        # rows are prefilled one by one, then all first tokens come out of one step
        first = max(r.timings["prefill_s"] for r in results)
        last = max(r.timings["prefill_s"] + r.timings["decode_s"] for r in results)
        return Run(first, len(rows) * (n - 1) / (last - first), [r.token_ids for r in results])
    return run


# --- onnxruntime-genai -------------------------------------------------------------------------

def build_genai(source: str, genai_dir: Path, precision: str, say: Callable[[str], None]) -> tuple[Path, str]:
    """genai_dir/<model>/cpu-<precision>, built with genai's model builder unless already there;
    returns the folder and the builder's arguments."""
    base = genai_dir / Path(source).name.replace(".gguf", "")
    out, hf = base / f"cpu-{precision}", base / "hf"
    flags = f"-i {rel(hf)} -o {rel(out)} -p {precision} -e cpu -c {rel(base / 'builder-cache')}"
    if (out / "genai_config.json").is_file():
        return out, flags
    if not (hf / "config.json").is_file():
        say(f"writing a Hugging Face folder for the genai builder to {hf} ...")
        write_hf_folder(source, hf)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(base / "builder-cache")]
    say(f"building {out} ({' '.join(command[1:])}) ...")
    log = base / f"build-{precision}.log"
    with open(log, "w") as f:
        if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"the genai model builder failed; see {log}")
    tmp.rename(out)
    return out, flags


def write_hf_folder(source: str, folder: Path) -> None:
    """A GGUF-loaded model refuses save_pretrained (docs/design.md): rebuild a plain model from its
    config without quantization_config, load the de-quantized weights, save it and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefixport.exporter.loading import load

    loaded = load(source)
    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict(), strict=True)
    plain.generation_config = loaded.model.generation_config
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)  # sets config.architectures, which the builder dispatches on
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def genai_side(folder: Path, threads: int) -> Side:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:  # genai_config.json sets none: genai then ran at one-thread speed on 2 cores
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)

    def run(rows: list[list[int]], n: int) -> Run:
        # genai pads a batch itself, as Tokenizer.encode_batch does: right-padded with its pad id
        ids = np.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        length = ids.shape[1] + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(rows))
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # the prefill
        stamps, tokens = [], []
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            tokens.append(generator.get_next_tokens().copy())
        assert len(stamps) == n, (len(stamps), n)
        return Run(stamps[0] - start, len(rows) * (n - 1) / (stamps[-1] - stamps[0]),
                   np.array(tokens).T.tolist())
    return run


def folder_mb(folder: Path) -> float:
    """MB on disk of a folder's graph and weights (model.onnx and any external data)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 1e6


def genai_graph(folder: Path) -> dict[str, Any]:
    """Op-type counts of a genai model.onnx and the session options in its genai_config.json."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in graph.node)
    config = json.loads((folder / "genai_config.json").read_text())
    return {"op_types": dict(ops.most_common()), "inputs": [i.name for i in graph.input][:3],
            "session_options": config["model"]["decoder"]["session_options"],
            "search": config["search"]}


# --- llama.cpp's llama-bench ------------------------------------------------------------------------

def llama_bench_side(binary: Path, model: Path, threads: int, info: dict[str, Any]) -> Side:
    """One `llama-bench` process per call: batch 1 only; the depth (-d) is the row's prompt tokens,
    prefilled untimed, then n decode steps timed (-p 0 -n n), one repetition (the script repeats and
    interleaves). `info` keeps the last run's settings as llama-bench reports them."""

    def run(rows: list[list[int]], n: int) -> Run | None:
        if len(rows) != 1:
            return None
        command = [str(binary), "-m", str(model), "-p", "0", "-n", str(n), "-d", str(len(rows[0])), "-r", "1",
                   "-o", "json", *(["-t", str(threads)] if threads else [])]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"llama-bench failed ({out.returncode}): {' '.join(command)}\n{out.stderr[-2000:]}")
        test = json.loads(out.stdout)[-1]
        info.update({k: test.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "n_threads",
                                              "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "model_type",
                                              "model_size", "n_gen", "n_depth")})
        return Run(None, float(test["avg_ts"]), [])
    return run


# --- transformers and PEFT eager ---------------------------------------------------------------

def torch_side(model: Any, base: Any, pad_id: int, n_virtual: int = 0) -> Side:
    """Greedy loop with cache: `model` prefills (the base model, or a PeftModel that prepends its
    soft prompt), `base` decodes. Rows are left-padded and masked."""
    import torch

    def run(rows: list[list[int]], n: int) -> Run:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        with torch.no_grad():
            start = time.perf_counter()
            if n_virtual:  # PEFT: [virtual | pads | real] at positions 0.., as PeftModel.forward does
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                mask = torch.cat([torch.ones((len(rows), n_virtual), dtype=torch.long), mask], dim=1)
                position = torch.full((len(rows), 1), mask.shape[1], dtype=torch.long)
            else:
                out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            use_cache=True)
                position = mask.sum(-1, keepdim=True)
            token = out.logits[:, -1:].argmax(-1)
            stamps, tokens = [time.perf_counter()], [token]
            for _ in range(n - 1):
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
                out = base(input_ids=token, attention_mask=mask, position_ids=position, cache=out.cache,
                           use_cache=True)
                token, position = out.logits[:, -1:].argmax(-1), position + 1
                stamps.append(time.perf_counter())
                tokens.append(token)
        return Run(stamps[0] - start, len(rows) * (n - 1) / (stamps[-1] - stamps[0]),
                   torch.cat(tokens, dim=1).tolist())
    return run


# --- the run ---------------------------------------------------------------------------------

LONG = ("The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
        "Constantinople, with emperors, senators, soldiers, merchants and farmers all playing a part. Its roads, "
        "laws, languages and buildings shaped Europe, North Africa and the Near East long after its end. ")


def case_rows(rows: list[list[int]], long: list[int], batch: int, context: int) -> list[list[int]]:
    """`batch` rows; with `context`, each is a slice of the long passage then its prompt, `context` tokens in all."""
    picked = rows[:batch]
    if not context:
        return picked
    return [long[i * 7 : i * 7 + context - len(r)] + r for i, r in enumerate(picked)]


def agreement(reference: list[list[int]], tokens: list[list[int]], eos: set[int]) -> str:
    """Rows whose tokens equal the reference's up to its first EOS (genai never emits one)."""
    same = 0
    for ref, got in zip(reference, tokens):
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        same += ref[:cut] == got[:cut]
    return f"{same}/{len(reference)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefixport", action="append", required=True, metavar="PRECISION=FOLDER",
                        help="a prefixport export folder, labelled by its precision (repeatable)")
    parser.add_argument("--genai-dir", type=Path, default=ROOT / "exports" / "genai")
    parser.add_argument("--genai-precision", nargs="*", default=["fp32", "int4"], choices=["fp32", "int4", "int8"])
    parser.add_argument("--peft-adapter", type=Path, default=ROOT / "demo" / "adapters" / "json-prompt",
                        help="a PEFT prompt-tuning checkpoint for the PEFT side ('' to skip PEFT)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers and PEFT sides")
    parser.add_argument("--llama-gguf", nargs="*", choices=["q8_0", "q4_1"], metavar="KIND",
                        help="llama-bench sides on the default model's GGUF at these precisions (q8_0, q4_1; "
                             "default: those of the exports given, int8 -> q8_0, int4 -> q4_1)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama-bench sides")
    parser.add_argument("--tokens", type=int, help="new tokens per row (default 64, --quick 16)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 5, --quick 3)")
    parser.add_argument("--cases", nargs="*", default=["1x0", "8x0", "1x1600", "8x1100"], metavar="BxC",
                        help="B rows of C prompt tokens each (C = 0: the short prompts)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op threads for every side (default: all cores; 0: each runtime's default)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (~1-2 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n = args.tokens or (16 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)
    cases = [tuple(map(int, c.split("x"))) for c in args.cases]
    if max(b for b, _ in cases) > len(PROMPTS):
        parser.error(f"at most {len(PROMPTS)} rows (one per prompt)")
    began = time.perf_counter()

    exports = dict(item.split("=", 1) for item in args.prefixport)
    engines = {p: Engine.load(folder, threads=args.threads or None) for p, folder in exports.items()}
    first = next(iter(engines.values()))
    manifest: Manifest = first.manifest
    rows = [first.encode(p) for p in PROMPTS]
    long = first.encode(LONG * 80)
    inputs = {f"{b}x{c}": case_rows(rows, long, b, c) for b, c in cases}
    eos = set(first.eos_token_ids)
    sides: dict[str, Side] = {f"prefixport {p}": prefixport_side(e) for p, e in engines.items()}
    precision_of = {f"prefixport {p}": p for p in engines}
    model_mb = {f"prefixport {p}": folder_mb(Path(folder)) for p, folder in exports.items()}

    genai: dict[str, Any] = {}
    for precision in args.genai_precision:
        folder, flags = build_genai(manifest.source, args.genai_dir, precision, say)
        genai[precision] = {"folder": rel(folder), "builder": f"python -m onnxruntime_genai.models.builder {flags}",
                            **genai_graph(folder), "intra_op_num_threads_overlay": args.threads or None}
        sides[f"onnxruntime-genai {precision}"] = genai_side(folder, args.threads)
        model_mb[f"onnxruntime-genai {precision}"] = folder_mb(folder)
        precision_of[f"onnxruntime-genai {precision}"] = precision

    llama: dict[str, Any] = {}
    kind_of = {"int8": "q8_0", "int4": "q4_1"}  # an export's precision -> the GGUF's (int4-rtn too)
    kinds = [] if args.no_llama_cpp else args.llama_gguf if args.llama_gguf is not None else \
        list(dict.fromkeys(kind_of[p[:4]] for p in exports if p[:4] in kind_of))
    if kinds:
        from benchmarks import llama_cpp  # serving.py's httpx: only where llama-bench runs

        bench = llama_cpp.build()["llama-bench"]
        llama = {"build": llama_cpp.record(), "ggufs": {}, "llama_bench": {}}
        for kind in kinds:
            model = llama_cpp.gguf(kind)
            name = f"llama.cpp {kind.upper()} (llama-bench)"
            wanted = {v: k for k, v in kind_of.items()}[kind]
            precision_of[name] = wanted if wanted in engines else next(
                (p for p in engines if p.startswith(wanted)), wanted)
            llama["llama_bench"][name] = {}
            sides[name] = llama_bench_side(bench, model, args.threads, llama["llama_bench"][name])
            model_mb[name] = model.stat().st_size / 1e6
            llama["ggufs"][kind] = llama_cpp.shown(model)
        llama["command"] = (f"llama-bench -m GGUF -p 0 -n {n} -d C -r 1 -o json"
                            + (f" -t {args.threads}" if args.threads else "") + ", C the case's prompt tokens")

    if not args.no_torch:
        import torch

        from prefixport.exporter.loading import load

        say("loading the transformers model ...")
        if args.threads:
            torch.set_num_threads(args.threads)
        base = load(manifest.source).model
        pad = manifest.pad_token_id or 0
        sides["transformers eager"] = torch_side(base, base, pad)
        precision_of["transformers eager"] = "fp32"
        if str(args.peft_adapter):
            from peft import PeftModel

            peft = PeftModel.from_pretrained(base, str(args.peft_adapter)).eval()
            n_virtual = peft.active_peft_config.num_virtual_tokens
            sides[f"peft eager ({args.peft_adapter.name})"] = torch_side(peft, base, pad, n_virtual)
            precision_of[f"peft eager ({args.peft_adapter.name})"] = "fp32"

    say(f"warming up {len(sides)} sides ...")
    for side in sides.values():
        for case in inputs.values():
            side(case, 4)
    def every_case(name: str) -> dict[str, Run | None]:
        say(f"  {name}")
        return {case: sides[name](case_input, n) for case, case_input in inputs.items()}

    say(f"{repeats} repetitions of {len(sides)} sides, their order rotated each time ...")
    rounds = alternate({name: functools.partial(every_case, name) for name in sides}, repeats)
    runs = {name: {case: [r[case] for r in done if r[case] is not None] for case in inputs}  # None: not measured
            for name, done in rounds.items()}
    names = list(sides)

    def reference(name: str) -> str:
        wanted = f"prefixport {precision_of[name]}"
        return wanted if wanted in sides else names[0]

    results: dict[str, Any] = {}
    for name in names:
        results[name] = {}
        for case in inputs:
            done = runs[name][case]
            if not done:  # a case this side does not measure
                continue
            ref = reference(name)
            tps = spread([r.decode_tokens_per_s for r in done])
            ref_tps = spread([r.decode_tokens_per_s for r in runs[ref][case]])["p50"]
            ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
            results[name][case] = {
                "decode_tokens_per_s": tps, "ttft_s": spread(ttfts) if ttfts else None,
                "ratio_vs": ref, "ratio": tps["p50"] / ref_tps,
                "same_tokens_as_ratio_ref": None if name.startswith("peft") or not done[-1].tokens else
                agreement(runs[ref][case][-1].tokens, done[-1].tokens, eos)}
    ones = sorted(c for b, c in cases if b == 1)
    slowdown = {}
    if len(ones) > 1:  # decode tok/s at the short context over that at the longest, batch 1
        short, longest = f"1x{ones[0]}", f"1x{ones[-1]}"
        slowdown = {"from": short, "to": longest, "by_side": {
            name: results[name][short]["decode_tokens_per_s"]["p50"] / results[name][longest]["decode_tokens_per_s"]["p50"]
            for name in names if short in results[name] and longest in results[name]}}

    threads: dict[str, Any] = {"intra_op_num_threads (prefixport, genai)": args.threads or "each runtime's default"}
    if llama:
        threads["llama-bench -t"] = args.threads or "llama-bench's default"
    if not args.no_torch:
        threads["torch"] = torch.get_num_threads()
    result = {
        "benchmark": "peer_speed", "quick": args.quick, "model": manifest.source,
        "prefixport_exports": exports, "new_tokens": n, "repeats": repeats, "cases": list(inputs),
        "prompt_tokens": {case: [len(r) for r in rows] for case, rows in inputs.items()}, "prompts": PROMPTS,
        "slowdown_short_to_long_context": slowdown,
        "decode_tokens_per_s": "batch * (new_tokens - 1) / (last token time - first token time)",
        "results": results, "model_mb": model_mb, "genai": genai, "llama_cpp": llama, "threads": threads,
        "machine": machine("onnxruntime-genai", "peft", "onnx"),
        "seconds": time.perf_counter() - began,
    }
    table = markdown(result)
    write_report(args.out, "peer_speed", result, table)
    print(table)
    say(f"wrote {args.out / 'peer_speed.json'} and peer_speed.md in {result['seconds']:.0f} s")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    threads = ", ".join(f"{k} {v}" for k, v in result["threads"].items())
    lines = [f"# Decode speed beside peers ({result['model']})", "",
             f"{result['new_tokens']} new tokens per row, greedy, {result['repeats']} interleaved repetitions; "
             "cases BxC: B rows of C prompt tokens (C = 0: the short prompts, "
             f"{min(result['prompt_tokens'].get('1x0', [0]) or [0])}+ tokens); "
             f"{m['cpu']}, {m['cores']} cores; threads: {threads}; onnxruntime {m['versions'].get('onnxruntime')}, "
             f"onnxruntime-genai {m['versions'].get('onnxruntime-genai')}, torch {m['versions'].get('torch')}, "
             f"transformers {m['versions'].get('transformers')}.", "",
             "| side | case | decode tok/s (median) | min-max | TTFT ms (median) | decode vs | ratio | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_case in result["results"].items():
        for batch, r in by_case.items():
            t = r["decode_tokens_per_s"]
            lines.append(f"| {name} | {batch} | {t['p50']:.1f} | {t['min']:.1f}-{t['max']:.1f} | "
                         f"{cell(r['ttft_s'] and 1000 * r['ttft_s']['p50'], '.0f')} | {r['ratio_vs']} | {r['ratio']:.2f}x | "
                         f"{r['same_tokens_as_ratio_ref'] or '-'} |")
    llama = result.get("llama_cpp") or {}
    if llama:
        build = llama["build"]
        lines += ["", f"llama.cpp {build['binaries']['llama-bench']} (llama-cpp-python {build['llama_cpp_python']}'s "
                  f"vendored source, built here: benchmarks/llama_cpp.py), batch 1 only: {llama['command']}; "
                  "decode tok/s = its avg_ts over the n timed tokens; no TTFT."]
    sizes = result.get("model_mb") or {}
    if sizes:
        lines += ["", "Model on disk (graph and weights, tokenizer apart): "
                  + ", ".join(f"{name} {mb:.1f} MB" for name, mb in sizes.items())]
    slow = result.get("slowdown_short_to_long_context")
    if slow:
        lines += ["", f"Decode slowdown from {slow['from']} to {slow['to']}: "
                  + ", ".join(f"{name} {x:.2f}x" for name, x in slow["by_side"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
