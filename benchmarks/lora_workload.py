"""The LoRA workload the LoRA benchmarks share (lora_cost.py, lora_vs_llama.py): ROWS requests of
NEW tokens, one prompt each, and ROWS real PEFT LoRA checkpoints of the default model to serve them
through (r 16, all-linear, random A and small random B: init_lora_weights=False, B scaled by 0.02
so that the base model's text stays text).
"""

from __future__ import annotations

from pathlib import Path

ROWS, NEW = 8, 48  # requests (each through its own LoRA) and the tokens each generates
PROMPTS = [f"Write a short story about a {w} who finds a map." for w in
           ("cat", "pilot", "baker", "robot", "child", "sailor", "teacher", "fox")]


def peft_loras(work: Path, n: int) -> list[Path]:
    """n PEFT LoRA checkpoints (r 16, all-linear, random A and B) of the default model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefixport.exporter.loading import default_gguf

    gguf = default_gguf()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = None
    out = []
    for i in range(n):
        torch.manual_seed(i)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"lora{i}")
        else:
            model.add_adapter(f"lora{i}", config)
        with torch.no_grad():  # small: the base model's text stays text
            for name, p in model.named_parameters():
                if f".lora{i}." in name and "lora_B" in name:
                    p.mul_(0.02)
        model.save_pretrained(work / "peft", selected_adapters=[f"lora{i}"])
        out.append(work / "peft" / f"lora{i}")  # PEFT saves a named adapter in a folder of its name
    return out
