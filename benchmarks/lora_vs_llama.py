"""8 concurrent requests, each through another rank-16 LoRA, served by `prefixport serve` (the int8
export made with --lora) and by llama.cpp's `llama-server` (Q8_0, the same LoRAs converted by its
own convert_lora_to_gguf.py, given with `--lora` and chosen per request by `"lora": [{"id", "scale"}]`),
one server at a time, driven by `prefixport bench serve`'s streamed client (docs/benchmarks.md,
"LoRA and IA3").

    python -m benchmarks.lora_vs_llama --export EXPORT_INT8_LORA [--rounds 3] [--threads 2]

EXPORT_INT8_LORA: `prefixport export DIR --lora --quantize int8`. The LoRAs: real PEFT checkpoints
(r 16, all-linear, random A and B; `benchmarks.lora_cost.peft_loras`). llama.cpp's converter needs
the base model's config and tokenizer only; they are saved from the GGUF. The workload:
benchmarks/lora_workload.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.common import (RESULTS, alternate, command, free_port, machine, machine_line, median, rel, say,
                               write_report)
from benchmarks.llama_cpp import LlamaServer, build, gguf
from benchmarks.lora_workload import NEW, PROMPTS, ROWS, peft_loras
from benchmarks.serving import ServerProcess
from prefixport.adapters import convert_checkpoint
from prefixport.bench.serve_client import api_url, closed_loop, new_client, request_body, stream_request


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
    """All bodies at once, streamed; (seconds, completion tokens)."""
    async def run() -> list:
        async with new_client(len(bodies) + 2, timeout_s=600) as client:
            return await closed_loop(lambda body: stream_request(client, api_url(url, "completions"), body), bodies,
                                     len(bodies))

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    failed = [r.error for r in results if r.error or not r.usage]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return seconds, sum(int(r.usage["completion_tokens"]) for r in results)


def rate(side: str, seconds: float, tokens: int) -> float:
    """A round's output tokens/s, said."""
    say(f"   {side}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s")
    return tokens / seconds


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

        def prefixport_side() -> float:
            port = free_port()
            server = ServerProcess(["serve", str(args.export), "--host", "127.0.0.1", "--port", str(port), "--threads",
                                    str(args.threads), "--max-batch", str(ROWS), "--adapters", str(adapters),
                                    "--model-name", "smollm2-135m-instruct"], work / "prefixport.log")
            bodies = [request_body("completions", p.name, prompt, NEW) for p, prompt in zip(checkpoints, PROMPTS)]
            with server:
                url = f"http://127.0.0.1:{port}"
                server.wait_healthy(url, 300)
                run_round(url, bodies[:2])  # warm
                return rate("prefixport", *run_round(url, bodies))

        def llama_side() -> float:
            extra = [a for g in ggufs for a in ("--lora", str(g))] + ["--lora-init-without-apply"]
            bodies = [request_body("completions", "smollm2-135m-instruct", prompt, NEW)
                      | {"lora": [{"id": i, "scale": 1.0}]} for i, prompt in enumerate(PROMPTS)]
            with LlamaServer(gguf("q8_0"), work / "llama.log", threads=args.threads, parallel=ROWS,
                             slot_ctx=256, extra=extra) as llama:
                run_round(llama.base_url, bodies[:2])
                return rate("llama-server", *run_round(llama.base_url, bodies))

        rates = alternate({"prefixport": prefixport_side, "llama-server": llama_side}, args.rounds)
    ours, theirs = median(rates["prefixport"]), median(rates["llama-server"])
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
