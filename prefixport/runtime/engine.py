"""`Engine`: an export folder opened for generation (manifest + tokenizer + backend + adapter store),
the facade over the runtime's parts: requests checked (`requests.py`), rows generated
(`generation.py`) in KV caches (`kv_cache.py`), text and results (`text.py`, `results.py`).

Thread-safe: many threads may call `generate`, `generate_batch` and `stream` on one Engine and
register or unregister adapters meanwhile; each request keeps the adapter it started with.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, Unpack, cast

import numpy as np

from .. import manifest as mf
from ..adapters.bundle import Bundle, make_bundle
from ..adapters.prompt_format import choose as choose_format
from ..adapters.prompt_format import render as render_prompt
from ..errors import AdapterError, ContextLengthError, InputError, PrefixportError
from .backends import Backend, load_backend
from .generation import Proposer, RowRequest, generate_rows, prefill_new, score_row
from .grammar import CACHE_SIZE as GRAMMAR_CACHE_SIZE
from .grammar import Grammar, GrammarVocab
from .kv_cache import CachePool, CacheSettings, KVCache, slot_limit
from .kv_scales import KVScales
from .logprobs import TokenLogprob, check_top
from .prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from .prompt_cache import PromptCache
from .requests import Message, Prompt, check_fits, check_settings
from .results import GenerationResult, Score
from .sampling import SamplingParams
from .settings import SPECULATIVE, EngineSettings, GenerationSettings, Speculative
from .speculative import DraftModel, PromptLookup, check_draft
from .stats import EngineStats, KVStats, LRUStats, SpeculationStats
from .store import AdapterStore
from .text import RowText, TextStream
from .tokenizer import Tokenizer

SPECULATE_MAX_BATCH = 2  # speculate while at most this many rows decode (measured: docs/benchmarks.md, "Speculative decoding")


class Engine:
    """Generation from one export folder. Load with `Engine.load(folder)`; close with `close()` or
    a `with` block."""

    def __init__(self, folder: Path, manifest: mf.Manifest, tokenizer: Tokenizer, backend: Backend,
                 generation_config: dict[str, Any], adapter_budget_bytes: int | None = None,
                 cache_settings: CacheSettings | None = None, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 draft: DraftModel | None = None) -> None:
        self.folder, self.manifest, self.tokenizer, self.backend = folder, manifest, tokenizer, backend
        self.cache_settings = cache_settings or CacheSettings()
        # every KV cache this engine makes (counted in stats()), one kept for the next direct call
        self.kv_caches = CachePool(backend, manifest, self.cache_settings, self.context_limit)
        self.generation_config = generation_config
        eos = generation_config.get("eos_token_id", manifest.eos_token_ids)
        self.eos_token_ids: list[int] = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
        self.kv_scales = KVScales.load(folder, manifest)  # an int8 cache's (prefix adapters are quantised with them)
        self.store = AdapterStore(backend, manifest, adapter_budget_bytes, self.kv_scales)
        # prompt prefixes' keys and values, shared by every call and scheduler (None: off)
        self.prompt_cache = PromptCache(manifest, prompt_cache_bytes) if prompt_cache_bytes else None
        # speculative decoding's proposers: `speculative="prompt-lookup"`, and "draft" if a draft export was loaded
        self.prompt_lookup, self.draft = PromptLookup(), draft
        self.speculate_max_batch = SPECULATE_MAX_BATCH  # direct calls speculate while at most this many rows decode
        self._grammar_vocab: GrammarVocab | None = None  # built on the first structured request (~1 s)
        self._grammar_lock = threading.Lock()  # its own: stats() must not wait for that build
        self.closed = False

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", adapter_budget_bytes: int | None = None,
             cache_settings: CacheSettings | None = None, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
             draft: str | Path | None = None, settings: EngineSettings | None = None, **options: Any) -> "Engine":
        """Open an export folder with `backend` "onnxruntime" or "tensorrt". `adapter_budget_bytes`
        caps the adapters kept resident (LRU); `cache_settings` bound each KV cache (rows, slots per row,
        MiB; default: a 2 GiB budget); `prompt_cache_bytes` caps the prompt cache (default 512 MiB;
        0 turns it off); `draft`, another export of the same base model (int8, int4), opened
        alike for `speculative="draft"`; `options` go to the backend: ONNX Runtime takes
        `provider="cpu"|"cuda"|"tensorrt"` and `threads=N`; TensorRT takes `precision="fp32"|"fp16"`.
        Or all of them as one `settings` (`EngineSettings`, what the CLI and the server pass), alone."""
        if settings is not None:
            if options or backend != "onnxruntime" or adapter_budget_bytes is not None or cache_settings is not None \
                    or prompt_cache_bytes != DEFAULT_PROMPT_CACHE_BYTES or draft is not None:
                raise PrefixportError("give Engine.load settings or its keywords, not both")
            backend, options = settings.backend.load_kwargs()
            return cls.load(folder, backend, settings.adapter_budget_bytes, settings.cache_settings,
                            settings.prompt_cache_bytes, settings.draft, **options)
        folder = Path(folder)
        manifest = mf.Manifest.load(folder)
        tokenizer = Tokenizer(folder)
        gen_path = folder / "generation_config.json"
        generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        proposer = None
        if draft is not None:
            draft = Path(draft)
            draft_manifest = mf.Manifest.load(draft)
            check_draft(folder, manifest, draft, draft_manifest)
            if backend == "onnxruntime":  # two sessions taking turns: threads spin during runs only (design.md)
                options = {**options, "spinning": "run"}
            proposer = DraftModel(load_backend(backend, draft, draft_manifest, **options))
        return cls(folder, manifest, tokenizer, load_backend(backend, folder, manifest, **options),
                   generation_config, adapter_budget_bytes, cache_settings, prompt_cache_bytes, proposer)

    # --- adapters ---------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | Path | None = None, bundle: Bundle | None = None) -> Bundle:
        """Register a bundle (a file, or one in memory, which stays pinned) under `name`, checked
        against this export: fingerprint, shapes, dtype, NaN/Inf. The base model is not touched.
        A replaced adapter's prompt cache entries and prompt lookup history are dropped."""
        self._check_open()
        bundle = self.store.register(name, path, bundle)
        self._forget(name)
        return bundle

    def remove_adapter(self, name: str) -> None:
        """Unregister, dropping its prompt cache entries and prompt lookup's history of it; requests
        already using the adapter finish with it."""
        self.store.unregister(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop what the caches hold of adapter `name` (unregistered or replaced)."""
        if self.prompt_cache is not None:
            self.prompt_cache.drop(name)
        self.prompt_lookup.forget(name)

    @property
    def adapters(self) -> list[str]:
        return self.store.names()

    def bake_prefix(self, bundle: Bundle) -> Bundle:
        """A soft-prompt bundle turned into a prefix bundle: the graph run once over the virtual
        tokens alone. Same outputs, and the virtual tokens are not recomputed per request."""
        if bundle.kind != "prompt":
            raise AdapterError(f"only a soft prompt can be baked into a prefix; {bundle.name} is a {bundle.kind}")
        m = self.manifest
        embeds = self.backend.upload(bundle.tensors["prompt_embeds"][None].astype(m.dtype))
        _, cache = prefill_new(self.backend, [[]], embeds, extra=0)
        names = mf.past_names(m.num_layers)
        meta = {k: v for k, v in bundle.metadata.items() if k not in ("kind", "n_virtual", "dtype")}
        meta["baked_from"] = "prompt"
        arrays = cache.read(0)
        if self.kv_scales is not None:  # an int8 cache: the values its attention reads (they quantise back exactly)
            arrays = [a.astype(m.dtype) for a in self.kv_scales.dequantize(arrays)]
        return make_bundle(kind="prefix", tensors=dict(zip(names, arrays)), **meta)

    @property
    def context_limit(self) -> int:
        """Positions a row may use (virtual tokens + prompt + new tokens): the model's, or fewer
        where a TensorRT engine was built for less."""
        limits = self.backend.limits
        return min(self.manifest.max_positions, limits.context) if limits else self.manifest.max_positions

    def room(self, prompt_tokens: int, n_virtual: int = 0) -> int:
        """New tokens a request may ask for after `n_virtual` virtual tokens and its prompt: what the
        context, the KV cache's `max_context` and its budget (for one row) leave; <= 0 if nothing."""
        return slot_limit(self.manifest, self.cache_settings, self.context_limit) - n_virtual - prompt_tokens

    @property
    def max_batch(self) -> int | None:
        """Most rows one call may hold (a TensorRT engine's limit), or None for any."""
        return self.backend.limits.max_batch if self.backend.limits else None

    def stats(self) -> EngineStats:
        """Adapter store counters (per adapter: bytes, resident, hits, misses, evictions), the KV
        caches (bytes in all, and each cache's rows and capacity), the prompt cache (None: off),
        the speculative proposers and memory; `.to_dict()` for JSON (`runtime/stats.py`)."""
        caches = self.kv_caches.stats()
        kv = KVStats(bytes=sum(c.bytes for c in caches), budget_bytes_each=self.cache_settings.budget_bytes,
                     caches=caches)
        speculative = SpeculationStats(prompt_lookup=self.prompt_lookup.stats(),
                                       draft=self.draft.stats() if self.draft is not None else None)
        vocab = self._grammar_vocab
        grammars = vocab.cache.stats() if vocab is not None else LRUStats(0, 0, 0, GRAMMAR_CACHE_SIZE, None, 0)
        return EngineStats(adapters=self.store.stats(), kv_cache=kv,
                           prompt_cache=self.prompt_cache.stats() if self.prompt_cache is not None else None,
                           speculative=speculative, grammars=grammars, memory=self.backend.memory_stats(),
                           backend=self.backend.name)

    # --- KV caches ------------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        """A KV cache of its own under this engine's settings (a scheduler keeps one for its life);
        counted in `stats()`."""
        return self.kv_caches.new()

    # --- generation -------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool | None = None, adapter: str | None = None,
               limit: int | None = None) -> list[int]:
        """Token ids for a prompt: text or chat messages in a prompt format (`format_prompt`), or ids.
        With `limit` (the context, for a prompt to generate from), a text that certainly gives more
        tokens raises ContextLengthError before it is tokenized whole (`Tokenizer.encode`)."""
        if isinstance(prompt, str):
            return self.format_prompt(prompt, chat, adapter, limit)
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return self.format_prompt(cast(list[Message], items), chat, adapter, limit)
        if all(isinstance(t, (int, np.integer)) for t in items):
            ids = [int(t) for t in cast(list[int], items)]
            vocab = self.manifest.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
            return ids
        raise InputError("a prompt is a string, a list of token ids, or a list of chat messages")

    def grammar(self, response_format: dict[str, Any] | None, tenant: str = "") -> Grammar | None:
        """The compiled grammar of an OpenAI `response_format` (None: free text), cached per schema
        (a `tenant`'s fair share of the cache); SchemaError for one that cannot be used (docs/api.md,
        "Structured output")."""
        if response_format is None:
            return None
        with self._grammar_lock:
            if self._grammar_vocab is None:
                self._grammar_vocab = GrammarVocab.from_tokenizer(self.tokenizer, self.eos_token_ids)
        return Grammar.from_response_format(response_format, self._grammar_vocab, tenant)

    def format_prompt(self, prompt: str | Sequence[Message], chat: bool | None = None,
                      adapter: str | None = None, limit: int | None = None) -> list[int]:
        """Token ids of a text or chat messages in the format `adapters.prompt_format.choose` picks:
        `chat` True the chat template, False raw; None (the default everywhere) the `adapter`'s
        recorded format, else raw for a text and the chat template for messages."""
        recorded = self.store.prompt_format(adapter) if adapter is not None else None
        fmt = choose_format(chat, recorded, messages=not isinstance(prompt, str))
        text = render_prompt(prompt, fmt, self.tokenizer.apply_chat_template)
        return self.tokenizer.encode(text, add_special_tokens=not fmt.chat, limit=limit)

    def prepare(self, prompt: Prompt, *, adapter: str | None = None, max_new_tokens: int = 128,
                 chat: bool | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, repetition_penalty: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, logprobs: int | None = None,
                 response_format: dict[str, Any] | None = None, speculative: Speculative | None = None,
                 timeout: float | None = None, stop: str | Sequence[str] = (),
                 cache_salt: str | None = None, tenant: str | None = None) -> RowRequest:
        """A request checked completely, before any work (keywords as `generate`), holding its adapter."""
        self._check_open()
        check_top(logprobs, "logprobs")
        if timeout is not None and not timeout > 0:
            raise InputError(f"timeout must be > 0 seconds (or None), got {timeout!r}")
        proposer = self.proposer(speculative)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                repetition_penalty=repetition_penalty)
        grammar = self.grammar(response_format, tenant or "")
        ids = self.encode(prompt, chat=chat, adapter=adapter, limit=self.context_limit)
        if not ids:
            raise InputError("the prompt is empty: it encodes to no tokens")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        feed = self.store.acquire(adapter) if adapter is not None else None
        n_virtual = feed.n_virtual if feed else 0
        check_fits(self.manifest, self.cache_settings, self.context_limit, self.backend.limits, n_virtual, len(ids),
                   max_new_tokens)
        stop_ids = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        return RowRequest(ids, max_new_tokens, params, stop_ids, feed, top_logprobs=logprobs,
                          grammar=grammar.matcher() if grammar is not None else None, proposer=proposer,
                          deadline=None if timeout is None else time.perf_counter() + timeout,
                          adapter=adapter, stop=(stop,) if isinstance(stop, str) else tuple(stop),
                          cache_salt=cache_salt or "", tenant=tenant or "")

    def proposer(self, speculative: Speculative | None) -> Proposer | None:
        """The proposer of a speculative decoding method (`SPECULATIVE`); None for None."""
        if speculative is not None and speculative not in SPECULATIVE:
            raise InputError(f"speculative must be None or one of {', '.join(SPECULATIVE)}, got {speculative!r}")
        if speculative == "draft" and self.draft is None:
            raise InputError('speculative="draft" needs a draft export: Engine.load(..., draft=EXPORT_DIR) '
                             "(prefixport generate --speculative draft:EXPORT_DIR)")
        return {None: None, "prompt-lookup": self.prompt_lookup, "draft": self.draft}[speculative]

    def score(self, prompt: str | Sequence[int], continuation: str | Sequence[int] | None = None, *,
              adapter: str | None = None, top_logprobs: int = 0) -> Score:
        """Score `prompt` + `continuation` (text, encoded raw, or token ids): every token's logprob
        given those before it, through `adapter`, with its `top_logprobs` likeliest alternatives
        (at least one); `.continuation_logprob` and `.greedy` are what evaluation harnesses ask
        for. A prefill with logits at every position (docs/design.md, "The graph contract")."""
        check_top(top_logprobs, "top_logprobs")
        ids = self.encode(prompt, chat=False, limit=self.context_limit)
        start = len(ids)
        if continuation is not None:
            ids += (self.tokenizer.encode(continuation, add_special_tokens=False, limit=self.context_limit)
                    if isinstance(continuation, str)
                    else self.encode(continuation))
        request = self.prepare(ids, adapter=adapter, max_new_tokens=1)  # the checks (one slot to spare)
        return Score(ids, self.run_score(request, top_logprobs), start)

    def run_score(self, request: RowRequest, top_logprobs: int = 0) -> list[TokenLogprob | None]:
        """Score a prepared request's prompt (`prepare(ids, max_new_tokens=1)` holds its adapter):
        each token's logprob given those before it, None for the first; at least one alternative."""
        limits, m = self.backend.limits, self.manifest
        cache = self.kv_caches.borrow()
        try:
            row = cache.admit(request.need)
            if row is None:
                raise ContextLengthError(f"{len(request.prompt_ids)} tokens do not fit the KV cache's budget")
            try:
                # at least one alternative: `Score.greedy` compares each token with the likeliest
                return score_row(self.backend, cache, row, request.prompt_ids, request.feed, max(top_logprobs, 1),
                                 m.pad_token_id or 0, min(256, limits.max_seq) if limits else 256)
            finally:
                cache.release(row)
        finally:
            self.kv_caches.give_back(cache)

    def run_rows(self, requests: list[RowRequest]) -> Iterator[tuple[int, int]]:
        """Generate for prepared requests together; yields (index in `requests`, token) as produced."""
        m = self.manifest
        cache = self.kv_caches.borrow()
        try:
            yield from generate_rows(self.backend, cache, requests, m.hidden_size, np.dtype(m.dtype),
                                     m.pad_token_id or 0, self.prompt_cache, self.speculate_max_batch)
        finally:
            self.kv_caches.give_back(cache)

    def stream(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> TextStream:
        """Like `generate`, but iterate it for text deltas; the result is on `.result` after.
        `close()` (or leaving a `with` block) stops it early."""
        request = self.prepare(prompt, **check_settings(settings))
        return TextStream(self.run_rows([request]), request, RowText(self.tokenizer, request.stop))

    def generate(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> GenerationResult:
        """Generate from one prompt; greedy by default.

        Settings (`SETTINGS`; another keyword is an `InputError` naming the closest): max_new_tokens
        (128), chat (`format_prompt`: None picks the adapter's recorded format, else raw for a text
        and the chat template for messages), temperature (0 = greedy), top_k, top_p, seed,
        repetition_penalty, stop_token_ids (default: the generation config's EOS ids), stop (stop
        strings, cut from the text), adapter (a registered name), logprobs (alternatives per token:
        fills `.logprobs`), response_format (OpenAI's: JSON output constrained by a grammar),
        speculative ("prompt-lookup", or "draft" with a draft export loaded: while at most
        `speculate_max_batch` rows decode, each verifies proposed tokens several per pass; greedy rows
        give the same tokens, sampled rows the tokens their seed gives), timeout (seconds: the
        row ends at the first token after it, finish reason "timeout"), cache_salt (the prompt
        cache and prompt lookup share only between requests of the same salt: a tenant's).
        """
        stream = self.stream(prompt, **settings)
        for _ in stream:
            pass
        return stream.result  # type: ignore[return-value]

    def generate_batch(self, prompts: Sequence[Prompt], adapters: Sequence[str | None] | None = None,
                       per_row: Sequence[GenerationSettings] | None = None,
                       **settings: Unpack[GenerationSettings]) -> list[GenerationResult]:
        """Generate for many prompts in one batch, each row with its own adapter (or None).

        Every row gives what it gives alone (greedy tokens; logits within ~1e-4 when padded).
        `settings` as `generate`, for every row; `per_row`, one dict of settings per prompt,
        overrides them row by row (`per_row=[{"max_new_tokens": 2}, {"max_new_tokens": 30}]`).
        """
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        rows: list[GenerationSettings] = list(per_row) if per_row is not None else [{}] * len(prompts)
        if len(adapters) != len(prompts) or len(rows) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(adapters)} adapters and {len(rows)} per-row settings")
        if self.max_batch is not None and len(prompts) > self.max_batch:
            raise InputError(f"{len(prompts)} prompts in one batch, but the TensorRT engine takes at most "
                             f"{self.max_batch} rows; split the batch or rebuild with a larger --max-batch")
        # an adapter in `settings` or a row's settings wins over `adapters`
        merged = [check_settings(GenerationSettings(adapter=a) | settings | row) for a, row in zip(adapters, rows)]
        requests = [self.prepare(p, **m) for p, m in zip(prompts, merged)]
        texts = [RowText(self.tokenizer, r.stop) for r in requests]
        start = time.perf_counter()
        first: list[float | None] = [None] * len(requests)
        last = [start] * len(requests)
        for i, token in self.run_rows(requests):
            now = time.perf_counter()
            first[i] = first[i] or now
            texts[i].push(token)
            if texts[i].stopped:
                requests[i].done = True
            if requests[i].done:
                last[i] = now
        for t in texts:
            t.finish()
        return [t.result(r, start, f or l, l) for r, t, f, l in zip(requests, texts, first, last)]

    def close(self) -> None:
        """Free the sessions; the engine then refuses every request. Idempotent; `with
        Engine.load(...) as engine:` closes it on leaving the block."""
        if self.closed:
            return
        self.closed = True
        self.backend.close()
        if self.draft is not None:
            self.draft.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise PrefixportError("this engine is closed; load the export again (Engine.load)")
