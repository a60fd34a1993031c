"""A toy export folder for the unit layer, built in memory: a byte-level BPE tokenizer trained on a
few sentences (`tokenizers`), its chat template, the manifest of a `ToyModel`, adapter bundles,
and an `Engine` over a `NumpyBackend` made with the Engine's constructor (no ONNX file, no session).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from prefixport import manifest as mf
from prefixport.adapters.bundle import Bundle, make_bundle, save_bundle
from prefixport.runtime import Engine
from prefixport.runtime.limits import Limits
from prefixport.runtime.tokenizer import Tokenizer

from .numpy_model import NumpyBackend, ToyModel, ToyShape

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Where is parcel 12? It is in Lyon.",
    "Grüße aus München! 東京は晴れです。 🙂", "def add(a, b):\n    return a + b",
    "Numbers: 0 1 2 3 4 5 6 7 8 9", "Un café, s'il vous plaît.", "You are a careful assistant.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_SIZE = 360  # at most: the trainer stops where the corpus has no more merges


def train_tokenizer() -> HFTokenizer:
    """Byte-level BPE over `CORPUS`: multi-byte characters are split across tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def write_export(folder: Path, tokenizer: HFTokenizer, model: ToyModel, *, cache: str = "shared",
                 max_positions: int = 256) -> mf.Manifest:
    """An export folder without a graph: prefixport.json, tokenizer.json (+ config, chat template)
    and generation_config.json, as the exporter writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / mf.TOKENIZER_NAME))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "pad_token": EOS, "chat_template": CHAT_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    manifest = model.manifest(max_positions=max_positions, cache=cache)
    manifest.save(folder)
    return manifest


def toy_model(tokenizer: HFTokenizer, seed: int = 0) -> ToyModel:
    return ToyModel(ToyShape(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True)), seed)


def open_engine(folder: Path, model: ToyModel, *, limits: Limits | None = None, **options: Any) -> Engine:
    """What `Engine.load` does, with a `NumpyBackend` in place of ONNX Runtime; `options` are the
    Engine's (adapter_budget_bytes, cache_settings, prompt_cache_bytes)."""
    manifest = mf.Manifest.load(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    return Engine(folder, manifest, Tokenizer(folder), NumpyBackend(manifest, model, limits), config, **options)


def soft_prompt(manifest: mf.Manifest, n_virtual: int, seed: int, name: str = "soft",
                dtype: str = "float32") -> Bundle:
    """A soft-prompt bundle for the export: `n_virtual` random embeddings."""
    embeds = np.random.default_rng(seed).standard_normal((n_virtual, manifest.hidden_size)).astype(dtype)
    return make_bundle(name=name, kind="prompt", tensors={"prompt_embeds": embeds},
                       fingerprint=manifest.fingerprint, peft_type="PROMPT_TUNING")


def prefix(manifest: mf.Manifest, n_virtual: int, seed: int, name: str = "prefix") -> Bundle:
    """A prefix bundle for the export: random keys and values for every layer."""
    rng = np.random.default_rng(seed)
    shape = (manifest.num_kv_heads, n_virtual, manifest.head_dim)
    tensors = {n: rng.standard_normal(shape).astype(np.float32) for n in mf.past_names(manifest.num_layers)}
    return make_bundle(name=name, kind="prefix", tensors=tensors, fingerprint=manifest.fingerprint,
                       peft_type="PREFIX_TUNING")


ADAPTERS = {"soft": (soft_prompt, 4, 1), "soft6": (soft_prompt, 6, 2), "prefix": (prefix, 5, 3),
            "prefix3": (prefix, 3, 4)}  # name -> (kind, virtual tokens, seed)


def write_adapters(folder: Path, manifest: mf.Manifest) -> dict[str, Path]:
    """`ADAPTERS` saved as bundle files under folder/adapters."""
    return {name: save_bundle(make(manifest, n, seed, name), folder / "adapters" / f"{name}.safetensors")
            for name, (make, n, seed) in ADAPTERS.items()}
