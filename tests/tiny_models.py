"""Tiny random-initialised models of each supported architecture, saved as Hugging Face folders.

They share a small byte-level BPE tokenizer trained here on a few sentences, with a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefix tuning learns keys and values for every layer; prompt tuning learns input embeddings.",
    "Un café, s'il vous plaît. Grüße aus München! 東京は晴れです。 🙂",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256, initializer_range=0.2)


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def configs(vocab: int) -> dict[str, object]:
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": LlamaConfig(**SMALL, **ids),
        "qwen2": Qwen2Config(**SMALL, **ids),
        "mistral": MistralConfig(**SMALL, **ids, sliding_window=8),
        "phi3": Phi3Config(**SMALL, **ids),
        "gemma3_text": Gemma3TextConfig(
            **{**SMALL, "num_hidden_layers": 4}, **ids, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **ids),
    }


ARCHITECTURES = ["gemma3_text", "gpt2", "llama", "mistral", "phi3", "qwen2"]


def build(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random `arch` model with its tokenizer to `folder`."""
    tok = tokenizer()
    config = configs(len(tok))[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
