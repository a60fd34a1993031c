"""The prompt cache: keys and values of prompt prefixes kept in blocks and copied into the cache
rows of later requests that start the same way (docs/design.md, "The prompt cache").

A prompt's tokens are cut into blocks of `block_tokens`. Each block is keyed by a hash chain:
its tokens hashed onto the key of the block before it, starting from a root key over the base
model (fingerprint and dtype) and the adapter (name and a digest of its tensors). A block is
therefore found only by a request with the same adapter tensors and the same tokens before it (an
adapter re-registered with other tensors starts a new chain). Blocks live where the KV cache does
(`KVCache.copy_out`). A soft prompt's virtual tokens are its chain's first block; a prefix adapter's keys and
values are already that (the adapter store holds them).

Exactness (float32, bitwise; docs/design.md, "The prompt cache", has the measurements): a row's
keys, values and logits do not depend on how the prompt is cut into prefill runs, with one
exception: the CPU attention kernels compute the last row of a run of kP + 1 rows through their
one-row path, which rounds otherwise (P a power of two: 32 on the tiny test models, 128 on
SmolLM2; a one-row run, P = 1, is the same case). So
- blocks never hold a prompt's last token (the one row that may have taken that path), nor what a
  decode step computed (one row per run);
- a hit uses as many cached tokens `c` as keep the rest's run ending the same way as the run
  without the cache: the number of cached rows of that run, c (plus a soft prompt's virtual
  tokens), is a multiple of 2^(t + 1) where 2^t is the largest power of two dividing the
  uncached run's length less one (capped at 2^MAX_TAIL_BITS), and at least MIN_REST tokens are
  left. For most prompts that is every cached block; for a few it is fewer tokens (a partial
  block is copied).

Memory: at most `budget_bytes` of blocks, least recently used evicted first. A hit touches its
chain from the last block back to the first, so a chain loses its tail before its head. Blocks
a request is copying from are pinned (never evicted meanwhile).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import PrefixportError
from .feed import AdapterFeed
from .kv_cache import KVCache, slot_bytes
from .stats import PromptCacheStats

if TYPE_CHECKING:
    from .. import manifest as mf

BLOCK_TOKENS = 32  # chosen by benchmarks/prompt_cache.py (docs/benchmarks.md, "Prompt cache")
DEFAULT_BYTES = 512 * 2**20
MIN_REST = 2  # tokens a hit leaves to prefill (see above)
MAX_TAIL_BITS = 10  # runs are assumed to end alike past 2^10 rows of period


@dataclass(eq=False)
class Block:
    """Keys and values of consecutive slots: [2 x layers, kv_heads, tokens, head_dim] on the device."""

    key: bytes
    adapter: str | None  # whose chain it is in (dropped when the adapter is unregistered)
    kv: Any
    tokens: int
    nbytes: int
    pins: int = 0


@dataclass
class Hit:
    """What a request found: its chain's keys, and the cached blocks it starts with (pinned until
    `PromptCache.release`)."""

    adapter: str | None
    virtual: int  # a soft prompt's virtual tokens (its root block's slots); 0: no soft prompt
    keys: list[bytes]  # the root key, then one per full block of the prompt but its last token
    root: Block | None = None  # a soft prompt's virtual tokens, when used
    blocks: list[Block] = field(default_factory=list)  # cached token blocks, in order
    tokens: int = 0  # prompt tokens taken from the blocks (the last block maybe in part)

    @property
    def slots(self) -> int:
        """Slots the hit fills after a prefix adapter's (virtual tokens included)."""
        return (self.root.tokens if self.root is not None else 0) + self.tokens

    @property
    def held(self) -> list[Block]:
        """The blocks the hit pins: the root (if used), then the token blocks."""
        return ([self.root] if self.root is not None else []) + self.blocks

    def copy_to(self, cache: KVCache, row: int, at: int) -> None:
        """Write the hit's slots into cache row `row` from slot `at` (after a prefix adapter's)."""
        cache.reserve(row + 1, at + self.slots)  # one growth, not one per block
        left = self.slots
        for block in self.held:  # the root whole, the token blocks up to `tokens` (the last maybe in part)
            n = min(block.tokens, left)
            cache.write(row, [block.kv[t : t + 1] for t in range(block.kv.shape[0])], at=at, slots=n)
            at, left = at + n, left - n


def _period(whole: int) -> int:
    """2^(t + 1), 2^t the largest power of two dividing `whole` - 1 (capped at 2^MAX_TAIL_BITS): a
    run of the last `whole - a` rows ends like the run of all `whole` rows where `a` is a multiple."""
    tail = ((whole - 1) & -(whole - 1)).bit_length() - 1
    return 1 << min(tail + 1, MAX_TAIL_BITS)


def usable(found: int, prompt: int, virtual: int) -> int:
    """Cached prompt tokens a hit may use out of `found` (see the module docstring): `prompt`
    tokens, `virtual` soft-prompt positions in the uncached run (0 for a prefix: it is not in the
    run). Negative: none, not even a soft prompt's root."""
    whole = virtual + prompt  # rows of the one prefill without the cache
    if whole < 2:
        return -1
    c = min(found, prompt - MIN_REST)
    return c - (virtual + c) % _period(whole)


def next_cut(at: int, whole: int, budget: int, least: int = 0) -> int:
    """Where the next prefill chunk of a prompt ends (chunked prefill, docs/design.md "Chunked
    prefill"): rows [at, end) of the prompt's uncached run of `whole` rows (a soft prompt's
    virtual tokens included), about `budget` rows and at least to `least`. As exact as one run:
    every cut is even (so no chunk but the last is a run of kP + 1 rows, whose last row would
    round otherwise) and the last chunk starts at a multiple of the run's period, as a cache hit
    does. So the last chunk may exceed the budget, by less than the period (one prompt in 2^t
    has a period of 2^(t + 1) rows). `at` is 0, a hit's rows, or an earlier cut."""
    last = (whole - 1) // _period(whole) * _period(whole) if whole >= 2 else 0  # the last chunk's start
    least += least % 2
    if at >= last or least > last or (at % _period(whole) == 0 and whole - at <= max(budget, least - at)):
        return whole
    return min(max(at + max(budget // 2 * 2, 2), least), last)


class PromptCache:
    """Blocks of prompt keys and values, by chain key, within `budget_bytes`. Thread-safe."""

    def __init__(self, manifest: mf.Manifest, budget_bytes: int = DEFAULT_BYTES,
                 block_tokens: int = BLOCK_TOKENS) -> None:
        if budget_bytes < 0 or block_tokens < 1:
            raise PrefixportError(f"a prompt cache needs budget_bytes >= 0 and block_tokens >= 1, got "
                             f"{budget_bytes} and {block_tokens}")
        self.budget_bytes, self.block_tokens = budget_bytes, block_tokens
        self.slot_bytes = slot_bytes(manifest)
        self._base = f"{manifest.fingerprint}:{manifest.dtype}:{manifest.kv_dtype}".encode()  # blocks in the cache's dtype
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.counters = dict.fromkeys(("requests", "hits", "prompt_tokens", "cached_tokens", "stored_blocks",
                                       "evicted_blocks"), 0)

    # --- a request's way through -----------------------------------------------------------------

    def lookup(self, ids: Sequence[int], feed: AdapterFeed | None, salt: str = "") -> Hit:
        """The longest cached start of the prompt `ids` under its adapter and `salt` (a tenant's:
        only requests with the same salt share blocks) that a hit may use, pinned until `release`.
        Counted in the statistics (one request)."""
        keys = self._keys(ids, feed, salt)
        with self._lock:
            hit = self._find(ids, feed, keys)
            for block in reversed(hit.held):
                self._blocks.move_to_end(block.key)  # the head most recently used: tails are evicted first
                block.pins += 1
            self.counters["requests"] += 1
            self.counters["hits"] += bool(hit.tokens)
            self.counters["prompt_tokens"] += len(ids)
            self.counters["cached_tokens"] += hit.tokens
        return hit

    def peek(self, ids: Sequence[int], feed: AdapterFeed | None, salt: str = "") -> int:
        """Prompt tokens a lookup would take from the cache now (nothing pinned or counted)."""
        keys = self._keys(ids, feed, salt)
        with self._lock:
            return self._find(ids, feed, keys).tokens

    def release(self, hit: Hit) -> None:
        """The request has copied its blocks: they may be evicted again."""
        with self._lock:
            for block in hit.held:
                block.pins -= 1

    def store(self, hit: Hit, cache: KVCache, row: int, prefix: int) -> None:
        """After the prefill of `hit`'s request into cache row `row` (after `prefix` slots of a
        prefix adapter): keep the blocks the cache lacks (a soft prompt's root included), as far
        as the budget allows."""
        start = prefix  # the row's slot where the root (or the first token block) begins
        wanted: list[tuple[bytes, int, int]] = []  # key, first slot, tokens
        if hit.virtual:
            wanted.append((hit.keys[0], start, hit.virtual))
            start += hit.virtual
        wanted += [(key, start + i * self.block_tokens, self.block_tokens) for i, key in enumerate(hit.keys[1:])]
        with self._lock:
            missing = [w for w in wanted if w[0] not in self._blocks]
        new = [Block(key, hit.adapter, cache.copy_out(row, at, n), n, n * self.slot_bytes) for key, at, n in missing
               if n * self.slot_bytes <= self.budget_bytes]
        if not new:
            return
        with self._lock:
            for block in new:
                if block.key not in self._blocks:
                    self._blocks[block.key] = block
                    self.nbytes += block.nbytes
                    self.counters["stored_blocks"] += 1
            for key, _, _ in reversed(wanted):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            self._evict()

    def _find(self, ids: Sequence[int], feed: AdapterFeed | None, keys: list[bytes]) -> Hit:
        """The hit for a prompt with chain `keys` (nothing pinned). Lock held."""
        virtual = feed.virtual if feed is not None and feed.prompt_embeds is not None else 0
        hit = Hit(feed.name if feed is not None else None, virtual, keys)
        root = self._blocks.get(hit.keys[0]) if virtual else None
        chain: list[Block] = []
        for key in hit.keys[1:] if root is not None or not virtual else ():
            block = self._blocks.get(key)
            if block is None:
                break
            chain.append(block)
        tokens = usable(len(chain) * self.block_tokens, len(ids), virtual)
        if tokens > 0 or (tokens == 0 and root is not None):
            hit.root, hit.tokens = root, tokens
            hit.blocks = chain[: -(-tokens // self.block_tokens)]
        return hit

    # --- upkeep --------------------------------------------------------------------------------

    def drop(self, adapter: str) -> None:
        """Forget every block of the adapter's chains (it was unregistered or replaced)."""
        with self._lock:
            for key in [k for k, b in self._blocks.items() if b.adapter == adapter]:
                self.nbytes -= self._blocks.pop(key).nbytes

    def stats(self) -> PromptCacheStats:
        """Counters since the start (requests, hits, prompt and cached tokens, blocks stored and
        evicted), what is held now (blocks, bytes, per adapter) and the rates."""
        with self._lock:
            c = dict(self.counters)
            blocks = len(self._blocks)
            by_adapter: dict[str, int] = {}
            for block in self._blocks.values():
                name = block.adapter or ""
                by_adapter[name] = by_adapter.get(name, 0) + block.nbytes
        return PromptCacheStats(**c, blocks=blocks, bytes=self.nbytes, budget_bytes=self.budget_bytes,
                                by_adapter=by_adapter, block_tokens=self.block_tokens,
                                hit_rate=c["hits"] / c["requests"] if c["requests"] else 0.0,
                                cached_token_rate=c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0)

    def _keys(self, ids: Sequence[int], feed: AdapterFeed | None, salt: str) -> list[bytes]:
        """The root key (base model, adapter, salt), then the chain key of each full block of `ids`
        but its last token."""
        identity = feed.identity.encode() if feed is not None else b"-"
        root = b"|".join((self._base, identity, salt.encode()))
        key = hashlib.blake2b(root, digest_size=16).digest()
        keys = [key]
        tokens = np.asarray(ids, np.int64)
        b = self.block_tokens
        for i in range((len(tokens) - 1) // b):
            key = hashlib.blake2b(key + tokens[i * b : (i + 1) * b].tobytes(), digest_size=16).digest()
            keys.append(key)
        return keys

    def _evict(self) -> None:
        """Least recently used unpinned blocks out until within the budget. Lock held."""
        for key in list(self._blocks):
            if self.nbytes <= self.budget_bytes:
                return
            block = self._blocks[key]
            if block.pins:
                continue
            del self._blocks[key]
            self.nbytes -= block.nbytes
            self.counters["evicted_blocks"] += 1
