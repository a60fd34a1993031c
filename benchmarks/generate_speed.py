"""Decode speed of `prefixport generate` (ONNX Runtime) against transformers' `generate`.

Same model, prompt and number of new tokens, greedy, runs interleaved in one process so both see
the same machine load. Decode tokens/s = (new tokens - 1) / (time of last token - time of first):
prefill is excluded on both sides. Prints a Markdown table, then one JSON line.

    python -m benchmarks.generate_speed EXPORT_DIR [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS, alternate, machine
from prefixport.bench.measure import spread

PROMPT = "Write a short story about a lighthouse keeper."


class _Clock:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put() is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "generate_speed.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from prefixport.exporter.loading import resolve
    from prefixport.manifest import Manifest
    from prefixport.runtime import Engine

    manifest = Manifest.load(args.export_dir)
    source = resolve(manifest.source)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file).eval()
    engine = Engine.load(args.export_dir)
    ids = engine.encode(PROMPT, chat=True)
    n = args.tokens

    def ours() -> float:
        r = engine.generate(ids, max_new_tokens=n, stop_token_ids=[])
        return r.timings["decode_tokens_per_s"]

    def theirs() -> float:
        clock = _Clock()
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                           pad_token_id=0)
        return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])

    ours(), theirs()  # warm-up
    runs = alternate({"prefixport (onnxruntime cpu)": ours, "transformers eager": theirs}, args.repeats)
    stats = {k: spread(v) for k, v in runs.items()}
    ratio = stats["prefixport (onnxruntime cpu)"]["p50"] / stats["transformers eager"]["p50"]
    result = {
        "benchmark": "generate_speed",
        "model": manifest.source,
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "decode_tokens_per_s": stats,
        "ratio_prefixport_over_transformers": ratio,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
    }
    print("| runtime | decode tok/s (median) | min | max |\n|---|---|---|---|")
    for k, s in stats.items():
        print(f"| {k} | {s['p50']:.1f} | {s['min']:.1f} | {s['max']:.1f} |")
    print(f"\nratio prefixport / transformers: {ratio:.2f}x ({args.repeats} interleaved runs, "
          f"{n} new tokens, {len(ids)} prompt tokens; {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
