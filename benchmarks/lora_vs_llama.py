"""8 concurrent requests, each through another rank-16 LoRA, served by `prefixport serve` (the int8
export made with --lora) and by llama.cpp's `llama-server` (Q8_0, the same LoRAs converted by its
own convert_lora_to_gguf.py, given with `--lora` and chosen per request by `"lora": [{"id", "scale"}]`),
one server at a time, the same streamed-less completions client (docs/benchmarks.md, "LoRA and IA3").

    python -m benchmarks.lora_vs_llama --export EXPORT_INT8_LORA [--rounds 3] [--threads 2]

EXPORT_INT8_LORA: `prefixport export DIR --lora --quantize int8`. The LoRAs: real PEFT checkpoints
(r 16, all-linear, random A and B; `benchmarks.lora_cost.peft_loras`). llama.cpp's converter needs
the base model's config and tokenizer only; they are saved from the GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

from benchmarks.common import RESULTS, command, free_port, machine, machine_line, rel, say, write_report
from benchmarks.llama_cpp import LlamaServer, build, gguf
from benchmarks.lora_cost import NEW, ROWS, peft_loras
from benchmarks.serving import ServerProcess
from prefixport.adapters import convert_checkpoint

PROMPTS = [f"Write a short story about a {w} who finds a map." for w in
           ("cat", "pilot", "baker", "robot", "child", "sailor", "teacher", "fox")]


def llama_loras(work: Path, checkpoints: list[Path]) -> list[Path]:
    """The PEFT LoRAs as GGUF LoRAs, by llama.cpp's own converter (its source, vendored in the sdist)."""
    from transformers import AutoConfig, AutoTokenizer

    from prefixport.exporter.loading import default_gguf

    source = Path(build()["llama-server"]).parents[2] / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    base = work / "base"
    found = default_gguf()
    config = AutoConfig.from_pretrained(found.parent, gguf_file=found.name)
    config.architectures = ["LlamaForCausalLM"]  # the GGUF's config names none; the converter needs it
    config.save_pretrained(base)
    AutoTokenizer.from_pretrained(found.parent, gguf_file=found.name).save_pretrained(base)
    out = []
    for path in checkpoints:
        target = work / f"{path.name}.gguf"
        subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype",
                        "f32", "--outfile", str(target), str(path)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(source)})
        out.append(target)
    return out


def run_round(url: str, bodies: list[dict]) -> tuple[float, int]:
    """All bodies at once (one thread each); (seconds, completion tokens)."""
    def one(body: dict) -> int:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        tokens = sum(pool.map(one, bodies))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="an int8 export made with --lora")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "lora_vs_llama"))
    args = parser.parse_args()
    result: dict = {"command": command("lora_vs_llama"), "machine": machine(), "export": rel(args.export)}
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        say("making 8 PEFT LoRAs, converting them for both")
        checkpoints = peft_loras(work, ROWS)
        adapters = work / "bundles"
        for path in checkpoints:
            convert_checkpoint(path, args.export, name=path.name, out=adapters / f"{path.name}.safetensors")
        ggufs = llama_loras(work, checkpoints)
        rates: dict[str, list[float]] = {"prefixport": [], "llama-server": []}
        for r in range(args.rounds):
            for side in (("prefixport", "llama-server") if r % 2 == 0 else ("llama-server", "prefixport")):
                if side == "prefixport":
                    port = free_port()
                    server: ServerProcess = ServerProcess(
                        ["serve", str(args.export), "--host", "127.0.0.1", "--port", str(port), "--threads",
                         str(args.threads), "--max-batch", str(ROWS), "--adapters", str(adapters),
                         "--model-name", "smollm2-135m-instruct"], work / "prefixport.log")
                    bodies = [{"model": p.name, "prompt": prompt, "max_tokens": NEW, "temperature": 0,
                               "ignore_eos": True} for p, prompt in zip(checkpoints, PROMPTS)]
                    with server:
                        url = f"http://127.0.0.1:{port}"
                        server.wait_healthy(url, 300)
                        run_round(url, bodies[:2])  # warm
                        seconds, tokens = run_round(url, bodies)
                else:
                    extra = [a for g in ggufs for a in ("--lora", str(g))] + ["--lora-init-without-apply"]
                    bodies = [{"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": NEW,
                               "temperature": 0, "ignore_eos": True, "lora": [{"id": i, "scale": 1.0}]}
                              for i, prompt in enumerate(PROMPTS)]
                    with LlamaServer(gguf("q8_0"), work / "llama.log", threads=args.threads, parallel=ROWS,
                                     slot_ctx=256, extra=extra) as llama:
                        run_round(llama.base_url, bodies[:2])
                        seconds, tokens = run_round(llama.base_url, bodies)
                rates[side].append(tokens / seconds)
                say(f"   {side}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s")
    ours, theirs = statistics.median(rates["prefixport"]), statistics.median(rates["llama-server"])
    result |= {"rates": rates, "prefixport_tok_s": ours, "llama_server_tok_s": theirs, "ratio": ours / theirs}
    text = (f"# 8 LoRAs, 8 concurrent requests: prefixport serve (int8) beside llama-server (Q8_0) "
            f"({machine_line(result['machine'])})\n\nCommand: `{result['command']}`\n\n"
            f"| side | output tok/s (median of {args.rounds}) |\n|---|---|\n| prefixport | {ours:.1f} |\n"
            f"| llama-server | {theirs:.1f} |\n| ratio | {ours / theirs:.2f}x |\n")
    print(text)
    print(json.dumps(rates))
    write_report(Path(args.out), "lora_vs_llama", result, text)


if __name__ == "__main__":
    main()
