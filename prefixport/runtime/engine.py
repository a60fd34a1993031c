"""`Engine`: an export folder opened for generation (manifest + tokenizer + backend)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import manifest as mf
from ..adapters.bundle import Bundle, check_bundle, check_fits, load_bundle, make_bundle
from ..errors import AdapterError, InputError
from .backends import Backend, load_backend
from .generation import generate_tokens, prefill
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only (a final stop token included)
    text: str  # decoded new tokens, special tokens skipped
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    timings: dict[str, float] = field(default_factory=dict)  # seconds; and decode tokens/s


class TextStream:
    """Iterates text deltas as tokens are produced; `.result` is set once it is exhausted."""

    def __init__(self, engine: "Engine", tokens: Iterator[int], prompt_len: int, stop_ids: set[int]):
        self._tokens, self._decoder = tokens, IncrementalDecoder(engine.tokenizer)
        self._prompt_len, self._stop_ids = prompt_len, stop_ids
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        first = None
        for token in self._tokens:
            first = first or time.perf_counter()
            delta = self._decoder.push(token)
            if delta:
                yield delta
        end = time.perf_counter()
        tail = self._decoder.finish()
        if tail:
            yield tail
        ids = self._decoder.ids
        n_decode = max(len(ids) - 1, 0)
        decode_s = end - (first or end)
        self.result = GenerationResult(
            token_ids=list(ids),
            text=self._decoder.emitted,
            prompt_tokens=self._prompt_len,
            finish_reason="stop" if ids and ids[-1] in self._stop_ids else "length",
            timings={
                "prefill_s": (first or end) - start,
                "decode_s": decode_s,
                "decode_tokens_per_s": n_decode / decode_s if decode_s > 0 else 0.0,
            },
        )


class Engine:
    """Generation from one export folder. Load with `Engine.load(folder)`."""

    def __init__(self, folder: Path, manifest: mf.Manifest, tokenizer: Tokenizer, backend: Backend,
                 generation_config: dict) -> None:
        self.folder, self.manifest, self.tokenizer, self.backend = folder, manifest, tokenizer, backend
        self.generation_config = generation_config
        eos = generation_config.get("eos_token_id", manifest.eos_token_ids)
        self.eos_token_ids: list[int] = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
        self.adapters: dict[str, Bundle] = {}

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", **options) -> "Engine":
        """Open an export folder; `options` go to the backend (e.g. `device="cpu"`, `threads=2`)."""
        folder = Path(folder)
        manifest = mf.Manifest.load(folder)
        tokenizer = Tokenizer(folder)
        gen_path = folder / "generation_config.json"
        generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls(folder, manifest, tokenizer, load_backend(backend, folder, manifest, **options),
                   generation_config)

    def add_adapter(self, name: str, path: str | Path | None = None, bundle: Bundle | None = None) -> Bundle:
        """Register an adapter bundle (a file, or one in memory) under `name`, checked against this
        export: base-model fingerprint, shapes, dtype, NaN/Inf. The base model is not touched."""
        if (path is None) == (bundle is None):
            raise AdapterError("add_adapter takes a path or a bundle")
        if bundle is None:
            bundle = load_bundle(path, self.manifest)
        else:
            check_bundle(bundle, name)
            check_fits(bundle, self.manifest, name)
        self.adapters[name] = bundle
        return bundle

    def remove_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise AdapterError(f"no adapter named {name!r} is registered")

    def _adapter(self, name: str | None) -> Bundle | None:
        if name is None:
            return None
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterError(f"no adapter named {name!r} is registered (registered: {known}); "
                               "add it with Engine.add_adapter")
        return self.adapters[name]

    def bake_prefix(self, bundle: Bundle) -> Bundle:
        """A soft-prompt bundle turned into a prefix bundle: the graph run once over the virtual
        tokens alone. Same outputs, and the virtual tokens are not recomputed per request."""
        if bundle.kind != "prompt":
            raise AdapterError(f"only a soft prompt can be baked into a prefix; {bundle.name} is a {bundle.kind}")
        m = self.manifest
        embeds = bundle.tensors["prompt_embeds"][None].astype(m.dtype)
        _, state = prefill(self.backend, [[]], embeds, m.pad_token_id or 0)
        arrays = self.backend.past_to_numpy(state.past)
        names = [n for i in range(m.num_layers) for n in (mf.past_key_name(i), mf.past_value_name(i))]
        meta = {k: v for k, v in bundle.metadata.items() if k not in ("kind", "n_virtual", "dtype")}
        meta["baked_from"] = "prompt"
        return make_bundle(kind="prefix", tensors={n: a[0] for n, a in zip(names, arrays)}, **meta)

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids for a prompt: text (raw, or wrapped in the chat template), chat messages, or ids."""
        if isinstance(prompt, str):
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(text, add_special_tokens=False)
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(items), add_special_tokens=False)
        if all(isinstance(t, (int, np.integer)) for t in items):
            ids = [int(t) for t in items]
            vocab = self.manifest.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
            return ids
        raise InputError("a prompt is a string, a list of token ids, or a list of chat messages")

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 128,
        chat: bool = False,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        adapter: str | None = None,
    ) -> TextStream:
        """Like `generate`, but iterate it for text deltas; the result is on `.result` after."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        bundle = self._adapter(adapter)
        n_virtual = bundle.n_virtual if bundle else 0
        ids = self.encode(prompt, chat=chat)
        if not ids:
            raise InputError("the prompt is empty: it encodes to no tokens")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.manifest.max_positions
        if n_virtual + len(ids) + max_new_tokens > limit:
            raise InputError(
                f"the adapter's virtual tokens ({n_virtual}) plus the prompt ({len(ids)} tokens) plus "
                f"max_new_tokens ({max_new_tokens}) exceed the model's context of {limit} positions; "
                "shorten the prompt or lower max_new_tokens"
            )
        stop_ids = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        m = self.manifest
        embeds = np.zeros((1, 0, m.hidden_size), np.dtype(m.dtype))
        past, past_len = None, 0
        if bundle is not None and bundle.kind == "prompt":
            embeds = bundle.tensors["prompt_embeds"][None].astype(m.dtype)
        elif bundle is not None:
            past, past_len = self.backend.to_past([t[None] for t in bundle.prefix(m.num_layers)]), n_virtual
        tokens = generate_tokens(self.backend, ids, embeds, max_new_tokens, params, stop_ids,
                                 m.pad_token_id or 0, past, past_len)
        return TextStream(self, tokens, len(ids), stop_ids)

    def generate(self, prompt: Prompt, **kwargs) -> GenerationResult:
        """Generate from a prompt (see `stream` for the arguments); greedy by default."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def close(self) -> None:
        self.backend.close()
