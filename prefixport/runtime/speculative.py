"""Speculative decoding's proposers (docs/design.md, "Speculative decoding").

`DecodeBatch.advance` feeds a row's last token and the tokens its proposer proposes in one run of
the graph (logits at every position), and `sample` chooses at each position, given the proposal
there, until its choice differs: a greedy row gives the tokens it gives without speculation, a
sampled row tokens distributed as without it, in fewer passes over the weights.

- `PromptLookup` proposes the tokens that followed the latest earlier occurrence of the row's
  last n tokens (n from `max_ngram` down to 1), searched in the row's own prompt and output, then
  in the recent outputs of the same adapter: extraction adapters repeat their output's structure
  from one request to the next.
- `DraftModel` proposes the greedy continuation of another export of the same base model (int8
  or int4 weights: `check_draft`), run with the row's own adapter inputs in a KV cache of its own.
"""

from __future__ import annotations

import json
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf
from ..errors import InputError
from .generation import prefill
from .kv_cache import CacheSettings, KVCache
from .lru import FairLRU
from .stats import ProposerStats

if TYPE_CHECKING:
    from .backends import Backend
    from .generation import RowRequest


class Counters:
    """Verification counters shared by the proposers; `stats()` as in `Engine.stats().speculative`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = {"passes": 0, "proposed": 0, "accepted": 0}

    def count(self, proposed: int, accepted: int) -> None:
        """One verification pass: `proposed` tokens checked, `accepted` of them kept."""
        with self._lock:
            self.counters["passes"] += 1
            self.counters["proposed"] += proposed
            self.counters["accepted"] += accepted

    def stats(self) -> ProposerStats:
        with self._lock:
            c = dict(self.counters)
        return ProposerStats(passes=c["passes"], proposed=c["proposed"], accepted=c["accepted"],
                             acceptance_rate=c["accepted"] / c["proposed"] if c["proposed"] else 0.0,
                             mean_accepted=c["accepted"] / c["passes"] if c["passes"] else 0.0)


class PromptLookup(Counters):
    """Proposes up to `tokens` tokens per pass from n-gram matches (n <= `max_ngram`) in the
    row's prompt and output and in the last `history` outputs of its adapter under its salt.
    Those outputs are kept in a `FairLRU` of at most `max_keys` (adapter, salt) pairs and
    `max_tokens` tokens in all, shared fairly between tenants (docs/security.md, "Bounded state").
    Thread-safe."""

    def __init__(self, tokens: int = 5, max_ngram: int = 3, history: int = 16, max_keys: int = 1024,
                 max_tokens: int = 1 << 20) -> None:
        super().__init__()
        self.tokens, self.max_ngram, self.history = tokens, max_ngram, history
        # (adapter name, identity) -> its recent outputs, each at most `history`
        self._outputs: FairLRU[tuple[str, str], tuple[list[int], ...]] = FairLRU(max_keys, max_tokens)

    def propose(self, request: RowRequest, limit: int) -> list[int]:
        """At most `limit` tokens likely to follow the row's tokens so far (maybe none)."""
        limit = min(limit, self.tokens)
        if limit < 1:
            return []
        seq = request.prompt_ids + request.tokens
        sources = [seq, *reversed(self._outputs.get(_identity(request)) or ())]
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for source in sources:
                found = _follows(source, tail, limit, own=source is seq)
                if found:
                    return found
        return []

    def finished(self, request: RowRequest) -> None:
        """Remember a row's output under its adapter and salt (not a failed row's)."""
        if not request.tokens or request.error is not None:
            return
        key = _identity(request)
        with self._lock:  # one read-modify-write at a time
            outputs = (*(self._outputs.get(key) or ()), list(request.tokens))[-self.history:]
            self._outputs.put(key, outputs, request.tenant, sum(map(len, outputs)))

    def forget(self, adapter: str) -> None:
        """Drop what the adapter's rows left (it was unregistered or replaced)."""
        self._outputs.drop(lambda key: key[0] == adapter)

    def stats(self) -> ProposerStats:
        return dataclasses.replace(super().stats(), history=self._outputs.stats())


@dataclass
class _Row:
    """A request's row in the draft's cache and the tokens (after its virtual ones) it holds."""

    row: int
    fed: list[int] = field(default_factory=list)


class DraftModel(Counters):
    """Proposes up to `tokens` tokens: the greedy continuation of a draft export of the target's
    base model (`check_draft`), run with each row's adapter inputs as the target's backend holds
    them (a LoRA or IA3 only where the draft was exported with the same --lora; a draft without
    proposes from the base model for such rows: still exact, fewer accepted). Each speculating request keeps a row of the draft's own KV cache (bounded by `cache_settings`:
    8 rows and 2 GB by default; the least recently used row is dropped for a new one and rebuilt
    if it comes back; a request that does not fit gets no proposals), holding its prompt and
    tokens; a pass feeds what the row gained since (the accepted proposals and the target's token)
    and decodes `tokens` - 1 more. Thread-safe (one pass at a time)."""

    def __init__(self, backend: Backend, tokens: int = 4, cache_settings: CacheSettings | None = None) -> None:
        super().__init__()
        self.backend, self.manifest, self.tokens = backend, backend.manifest, tokens
        m = self.manifest
        self.cache = KVCache(backend, m, cache_settings or CacheSettings(max_rows=8), m.max_positions)
        self._rows: OrderedDict[int, _Row] = OrderedDict()  # id(request) -> its row, least recent first
        self._none = np.zeros((1, 0, m.hidden_size), np.dtype(m.dtype))
        self._pad = m.pad_token_id or 0

    def propose(self, request: RowRequest, limit: int) -> list[int]:
        """The draft's greedy continuation of the row's tokens so far: at most `limit` tokens."""
        limit = min(limit, self.tokens)
        if limit < 1:
            return []
        seq = request.prompt_ids + request.tokens
        with self._lock:
            state = self._row(request)
            if state is None:
                return []
            feed, cache = request.feed, self.cache
            keep = min(_common(state.fed, seq), len(seq) - 1)  # at least the last token runs: its logits
            if keep == 0 and feed is not None and feed.past is not None:  # a fresh row: the prefix first
                cache.write(state.row, feed.past)
            if keep == 0 and cache.weight_rows is not None:  # a LoRA's or IA3's tables (a draft made with --lora)
                cache.set_adapter(state.row, feed)
            soft = keep == 0 and feed is not None and feed.prompt_embeds is not None
            base = feed.n_virtual if feed is not None else 0
            cache.lengths[state.row] = (0 if soft else base) + keep
            embeds, virtual = (feed.prompt_embeds, feed.virtual) if soft and feed is not None else (self._none, 0)
            logits = prefill(self.backend, cache, state.row, [seq[keep:]], embeds, virtual, self._pad)
            state.fed = list(seq)
            proposals = [int(logits[0].argmax())]
            while len(proposals) < limit:
                state.fed.append(proposals[-1])
                logits = prefill(self.backend, cache, state.row, [proposals[-1:]], self._none, 0, self._pad)
                proposals.append(int(logits[0].argmax()))
            return proposals

    def stats(self) -> ProposerStats:
        with self._lock:
            nbytes = self.cache.nbytes
        return dataclasses.replace(super().stats(), kv_cache_bytes=nbytes)

    def finished(self, request: RowRequest) -> None:
        """Free the request's row."""
        with self._lock:
            state = self._rows.pop(id(request), None)
            if state is not None:
                self.cache.release(state.row)

    def close(self) -> None:
        self.backend.close()

    def _row(self, request: RowRequest) -> _Row | None:
        """The request's row: its own, a free one, or the least recently used one's. Lock held."""
        state = self._rows.get(id(request))
        if state is not None:
            self._rows.move_to_end(id(request))
            return state
        if not self.cache.fits_alone(request.need):
            return None
        row = self.cache.admit(request.need)
        if row is None and self._rows:
            self.cache.release(self._rows.popitem(last=False)[1].row)
            row = self.cache.admit(request.need)
        if row is None:
            return None
        state = self._rows[id(request)] = _Row(row)
        return state


def check_draft(target: Path, target_manifest: mf.Manifest, draft: Path, draft_manifest: mf.Manifest) -> None:
    """Refuse a draft export that cannot propose for the target with the target's adapters: another
    base model (fingerprint), another dtype, other LoRA/IA3 tables, or another tokenizer."""
    if draft_manifest.fingerprint != target_manifest.fingerprint:
        raise InputError(f"the draft export {draft} is of another base model (fingerprint "
                         f"{draft_manifest.fingerprint[:19]}, the target's {target_manifest.fingerprint[:19]}): "
                         "a draft must be an export of the same model (e.g. --quantize int8), so that the "
                         "target's adapters fit it")
    if draft_manifest.dtype != target_manifest.dtype:
        raise InputError(f"the draft export {draft} computes in {draft_manifest.dtype}, the target in "
                         f"{target_manifest.dtype}; export the draft with --dtype {target_manifest.dtype}")
    # The draft's cache takes the target's prefix adapters as the target holds them: the same dtype
    # and, for int8, the same scales (calibrated on the float model: equal for every weight recipe).
    draft_kv, target_kv = draft_manifest.kv_dtype, target_manifest.kv_dtype
    scales = [(m.kv_quantization or {}).get("scales_sha256") for m in (draft_manifest, target_manifest)]
    if draft_kv != target_kv or scales[0] != scales[1]:
        other = " with other scales" if draft_kv == target_kv else ""
        raise InputError(f"the draft export {draft} has a {draft_kv} KV cache, the target a {target_kv} one{other}; "
                         f"export the draft with --kv-cache-dtype {target_kv} from the same model")
    if draft_manifest.weight_adapters and draft_manifest.weight_adapters != target_manifest.weight_adapters:
        raise InputError(f"the draft export {draft} takes other LoRA/IA3 tables than the target ({draft_manifest.weights}"
                         f" against {target_manifest.weights}); export the draft with the target's --lora options, "
                         "or without --lora (its proposals then leave the LoRA out)")
    if _tokenizer(draft) != _tokenizer(target):
        raise InputError(f"the draft export {draft} has another tokenizer than {target}: its token ids would not "
                         "be the target's")


def parse_method(value: str | None) -> tuple[str | None, Path | None]:
    """A command line's `--speculative` (prompt-lookup, or draft:EXPORT_DIR) as the Engine's method
    and draft folder."""
    if value is None or value == "prompt-lookup":
        return value, None
    if value.startswith("draft:") and len(value) > len("draft:"):
        return "draft", Path(value[len("draft:"):])
    raise InputError(f"--speculative takes prompt-lookup or draft:EXPORT_DIR, got {value!r}")


def _tokenizer(folder: Path) -> Any:
    """An export's tokenizer.json, parsed (so that formatting does not count)."""
    path = folder / "tokenizer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _identity(request: RowRequest) -> tuple[str, str]:
    """Whose outputs a row's proposals may come from: its adapter's (name, and identity under its
    cache salt: a tenant's)."""
    feed = request.feed
    if feed is None or feed.name is None:
        return "", "|" + request.cache_salt
    return feed.name, feed.identity + "|" + request.cache_salt


def _follows(source: list[int], tail: list[int], limit: int, own: bool) -> list[int]:
    """What follows the latest occurrence of `tail` in `source` (in the row's own sequence, not the
    occurrence that ends it), up to `limit` tokens; [] if none."""
    n = len(tail)
    last = len(source) - n - (1 if own else 0)
    first = tail[0]
    for i in range(last, -1, -1):
        if source[i] == first and source[i : i + n] == tail:
            found = source[i + n : i + n + limit]
            if found:
                return found
    return []
