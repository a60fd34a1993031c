"""An export made with `--merge-lora` against PEFT (docs/export.md, "Merging one LoRA"): the export's
logits at every position of a few prompts and their greedy continuations against PEFT's unmerged
forward (`PeftModel.from_pretrained`) and its `merge_and_unload()`, the greedy tokens (teacher-forced
and free-running), and the fingerprint against that of PEFT's merged weights.

    python -m benchmarks.merge_lora --make-lora /tmp/smol-lora      # a random r=8 all-linear LoRA
    prefixport export /tmp/merge-default --merge-lora /tmp/smol-lora
    python -m benchmarks.merge_lora /tmp/merge-default /tmp/smol-lora [--model smollm2-135m-instruct] [--tokens 32]

The LoRA of --make-lora is PEFT's LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
init_lora_weights=False) on the model, seed 0: A and B random, so that the merge changes every
linear weight.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def make_lora(model_spec: str, out: str) -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    from prefixport.exporter.loading import load

    torch.manual_seed(0)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules="all-linear")
    get_peft_model(load(model_spec).model, config).save_pretrained(out)
    print(f"saved a random LoRA (r=8, all-linear) of {model_spec} to {out}")


def compare(export: str, ckpt: str, model_spec: str, n: int) -> None:
    from peft import PeftModel

    from prefixport.exporter.export import fingerprint
    from prefixport.exporter.loading import load
    from prefixport.runtime import Engine
    from prefixport.runtime.agreement import PROMPTS
    from prefixport.runtime.generation import decode_step, prefill_new

    engine = Engine.load(export)
    m = engine.manifest
    prompts = [engine.encode(p, chat=True) for p in PROMPTS] + [
        engine.encode("The capital of France is", chat=False), engine.encode("def fibonacci(n):", chat=False)]
    tokens = []
    for ids in prompts:  # the export's greedy continuation, n tokens
        logits, cache = prefill_new(engine.backend, [ids], extra=n)
        out = []
        for _ in range(n):
            out.append(int(logits[0].argmax()))
            logits = decode_step(engine.backend, cache, np.array(out[-1:], np.int64), m.hidden_size,
                                 np.dtype(m.dtype))
        tokens.append(out)
    ort = [prefill_new(engine.backend, [ids + t[:-1]], every=True)[0][0] for ids, t in zip(prompts, tokens)]
    base = load(model_spec).model
    with torch.no_grad():
        effect = max(float(np.abs(base(torch.tensor([ids + t[:-1]])).logits[0].numpy() - o).max())
                     for ids, t, o in zip(prompts, tokens, ort))
    base_fp = fingerprint(base)
    print(f"{len(prompts)} prompts x {n} greedy tokens; the LoRA moves the logits by up to {effect:.1f} from the base")
    unmerged = PeftModel.from_pretrained(base, ckpt).eval()
    for label in ("PEFT unmerged", "PEFT merge_and_unload"):
        model = unmerged if label == "PEFT unmerged" else unmerged.merge_and_unload()
        diffs, agree, identical = [], 0, 0
        for ids, t, o in zip(prompts, tokens, ort):
            with torch.no_grad():
                ref = model(torch.tensor([ids + t[:-1]])).logits[0].numpy()
                free = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(ids):].tolist()
            diffs.append(float(np.abs(ref - o).max()))
            agree += sum(int(a) == b for a, b in zip(ref[len(ids) - 1:].argmax(-1), t))
            identical += free == t
        print(f"  {label}: logits max abs diff {max(diffs):.2e} (per prompt {', '.join(f'{d:.1e}' for d in diffs)}); "
              f"teacher-forced greedy agreement {agree}/{n * len(prompts)}; free-running greedy identical "
              f"{identical}/{len(prompts)}")
    print(f"fingerprint: export {m.fingerprint[:23]}, PEFT's merged weights {fingerprint(model)[:23]}, "
          f"base {base_fp[:23]}")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", nargs="?")
    parser.add_argument("ckpt", nargs="?", help="the PEFT LoRA folder the export merged")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the export's model spec")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--make-lora", metavar="DIR", help="save a random r=8 all-linear LoRA of --model to DIR")
    args = parser.parse_args()
    if args.make_lora:
        make_lora(args.model, args.make_lora)
    elif args.export and args.ckpt:
        compare(args.export, args.ckpt, args.model, args.tokens)
    else:
        parser.error("give EXPORT and CKPT, or --make-lora DIR")


if __name__ == "__main__":
    main()
