"""Real PEFT adapters for tests: trained a few steps (so they are not their initialisation), saved
as PEFT saves them, and PEFT's own forward as the reference."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from peft import (
    IA3Config,
    LoraConfig,
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from prefixport.runtime import Engine
from prefixport.runtime.generation import prefill_new

from .helpers import greedy_choices

CAUSAL = TaskType.CAUSAL_LM
VARIANTS = {
    "prompt": lambda: PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=6),
    "ptuning-mlp": lambda: PromptEncoderConfig(task_type=CAUSAL, num_virtual_tokens=5, encoder_hidden_size=32),
    "ptuning-lstm": lambda: PromptEncoderConfig(task_type=CAUSAL, num_virtual_tokens=4, encoder_hidden_size=32,
                                                encoder_reparameterization_type="LSTM"),
    "multitask": lambda: MultitaskPromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=5, num_tasks=3,
                                                     num_ranks=2),
    "prefix": lambda: PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=7),
    "prefix-projection": lambda: PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=3, prefix_projection=True,
                                                    encoder_hidden_size=32),
    # adapters of the weights (run-time tables: `export --lora`); get_peft_model wraps a copy of the base
    "lora-all": lambda: LoraConfig(task_type=CAUSAL, r=8, lora_alpha=16, target_modules="all-linear"),
    "lora-qv-rs": lambda: LoraConfig(task_type=CAUSAL, r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     use_rslora=True),
    "lora-attn-r4": lambda: LoraConfig(task_type=CAUSAL, r=4, lora_alpha=32,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "ia3": lambda: IA3Config(task_type=CAUSAL),
}
WEIGHT_VARIANTS = ("lora-all", "lora-qv-rs", "lora-attn-r4", "ia3")  # need an export with --lora
PROMPT_VARIANTS = tuple(v for v in VARIANTS if v not in WEIGHT_VARIANTS)  # any export
TRAIN_TEXT = "Answer in JSON. Input: the cat sat on the mat. Output: {\"animal\": \"cat\", \"place\": \"mat\"}"


def train(base, variant: str, tokenizer, out: Path, steps: int = 4, lr: float = 0.05) -> Path:
    """Train a PEFT adapter of `variant` on `base` for a few steps and save it to `out` (`base`
    itself is left as it was: a LoRA or IA3 wraps a copy's modules)."""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base) if variant in WEIGHT_VARIANTS else base, VARIANTS[variant]())
    model.train()
    ids = torch.tensor([tokenizer.encode(TRAIN_TEXT)])
    kwargs = {"task_ids": torch.tensor([1])} if variant == "multitask" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    before = [p.detach().clone() for p in params]
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "training changed nothing"
    model.save_pretrained(out)
    return out


def random_checkpoint(base, config, out: Path) -> Path:
    """A real PEFT checkpoint of `config` (a LoRA or IA3) on `base`, its weights moved off their
    initialisation by seeded noise (faster than training; the conversion and the forward are what
    is tested)."""
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return out


def load_reference(base, folder: Path) -> PeftModel:
    """PEFT's model of the checkpoint in `folder` on `base` (a copy of it for a LoRA or IA3, whose
    layers PEFT wraps in place)."""
    import json

    weights = json.loads((folder / "adapter_config.json").read_text())["peft_type"] in ("LORA", "IA3")
    return PeftModel.from_pretrained(copy.deepcopy(base) if weights else base, folder).eval()


def peft_forward(model: PeftModel, ids: list[int], task: int | None = None) -> np.ndarray:
    """PeftModel.forward's logits at every position of `ids` [len(ids), vocab]."""
    kwargs = {"task_ids": torch.tensor([task])} if task is not None else {}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0].float().numpy()
    return logits[-len(ids):]  # a soft prompt's virtual positions come first


def peft_logits(model: PeftModel, ids: list[int], task: int | None = None) -> np.ndarray:
    return peft_forward(model, ids, task)[-1]


def peft_greedy_choices(model: PeftModel, ids: list[int], tokens: list[int], task: int | None = None) -> list[int]:
    """docs/design.md's reference: PEFT's greedy choices after `ids` and each prefix of `tokens`,
    teacher-forced through one PeftModel.forward (`helpers.greedy_choices`)."""
    return greedy_choices(peft_forward(model, ids + tokens[:-1], task), len(ids))


def runtime_adapter_logits(engine: Engine, name: str, ids: list[int]) -> np.ndarray:
    """Last-position logits of one prefill with the registered adapter `name`."""
    feed = engine.store.acquire(name)
    logits, _ = prefill_new(engine.backend, [ids], feed.prompt_embeds, prefix=feed.past, weights=feed)
    return logits[0]
