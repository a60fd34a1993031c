"""A real tiny causal LM in numpy, run through the graph contract (docs/design.md, "The graph
contract") as a `prefixport.runtime.backends.Backend`: the unit layer's stand-in for an ONNX
Runtime session.

The model: token embeddings plus sinusoidal positions, `layers` pre-norm blocks (grouped-query
causal attention over the row's cache slots, a tanh MLP), a final norm and a vocabulary head; fixed
random weights from a seed. It computes in float64 and keeps the cache in the export's dtype
(float32), so every key and value a row reads is the one the cache holds, whichever call wrote it.

Each position is computed with the same numpy shapes whatever the call (its row, the batch, how the
prompt was cut into calls): matrix products are stacked per position (`x[:, None, :] @ w`, one
vector product each) and attention runs position by position over slots `0..position`. So a row's
logits are bitwise those of the same request alone, and a test may compare two paths exactly; a
runtime that feeds a wrong slot, position, soft prompt or prefix changes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from prefixport import manifest as mf
from prefixport.runtime.limits import Limits


@dataclass(frozen=True)
class ToyShape:
    """Sizes of the toy model (attention heads share KV heads in groups: GQA)."""

    vocab_size: int
    hidden_size: int = 16
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    ffn_size: int = 32


def _rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, a] @ w [a, b], one vector product per row (bitwise independent of n)."""
    return (x[:, None, :] @ w)[:, 0, :]


def _norm(x: np.ndarray) -> np.ndarray:
    """RMSNorm without weights, row by row (a stacked product per row: bitwise independent of n)."""
    return x / np.sqrt((x[:, None, :] @ x[:, :, None])[:, 0] / x.shape[1] + 1e-6)


def _positions(positions: np.ndarray, hidden: int) -> np.ndarray:
    """Sinusoidal position encodings [n, hidden] (scaled down: tokens still dominate)."""
    freqs = 1.0 / 10000 ** (np.arange(0, hidden, 2) / hidden)
    angles = positions[:, None].astype(np.float64) * freqs[None, :]
    out = np.empty((len(positions), hidden))
    out[:, 0::2], out[:, 1::2] = np.sin(angles), np.cos(angles)
    return 0.5 * out


class ToyModel:
    """Fixed random weights (float64) of a `ToyShape`, from `seed`."""

    def __init__(self, shape: ToyShape, seed: int = 0) -> None:
        self.shape = shape
        rng = np.random.default_rng(seed)
        h, f = shape.hidden_size, shape.ffn_size
        q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim

        def w(a: int, b: int) -> np.ndarray:
            return rng.standard_normal((a, b)) / np.sqrt(a)

        self.embed = rng.standard_normal((shape.vocab_size, h))
        self.layers = [dict(q=w(h, q), k=w(h, kv), v=w(h, kv), o=w(q, h), up=w(h, f), down=w(f, h))
                       for _ in range(shape.num_layers)]
        self.head = w(h, shape.vocab_size) * 3.0  # logits of a few units: sampling has choices, greedy a clear top

    @property
    def fingerprint(self) -> str:
        """sha256 over the weights (as an export's manifest records its base model's)."""
        digest = hashlib.sha256(self.embed.tobytes() + self.head.tobytes())
        for layer in self.layers:
            for name in sorted(layer):
                digest.update(layer[name].tobytes())
        return digest.hexdigest()

    def manifest(self, *, max_positions: int = 256, cache: str = "shared", eos_token_id: int = 0,
                 pad_token_id: int = 0) -> mf.Manifest:
        """The manifest an export of this model would carry."""
        s = self.shape
        return mf.Manifest(architecture="toy-numpy", num_layers=s.num_layers, num_kv_heads=s.num_kv_heads,
                           head_dim=s.head_dim, hidden_size=s.hidden_size, vocab_size=s.vocab_size, dtype="float32",
                           max_positions=max_positions, eos_token_ids=[eos_token_id], pad_token_id=pad_token_id,
                           bos_token_id=None, fingerprint=self.fingerprint, source="tests/unit/numpy_model.py",
                           cache=cache)

    def forward_row(self, x: np.ndarray, past_length: int, keys: Sequence[np.ndarray],
                    values: Sequence[np.ndarray]) -> np.ndarray:
        """One row of a call: x [n, hidden] (soft prompt, then token embeddings) at positions
        `past_length ..`; writes each layer's keys and values into the row's cache slots
        (`keys[l]`, `values[l]`: [kv_heads, capacity, head_dim]) and attends over slots
        0..position. Returns the final hidden states [n, hidden]."""
        s = self.shape
        n, group = len(x), s.num_heads // s.num_kv_heads
        x = x + _positions(past_length + np.arange(n), s.hidden_size)
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            h = _norm(x)
            q = _rows(h, layer["q"]).reshape(n, s.num_kv_heads, group, s.head_dim)
            for cache, w in ((k_cache, layer["k"]), (v_cache, layer["v"])):  # this call's slots, in the cache's dtype
                new = _rows(h, w).reshape(n, s.num_kv_heads, s.head_dim)
                cache[:, past_length : past_length + n] = new.transpose(1, 0, 2)
            attended = np.empty((n, s.num_heads * s.head_dim))
            k_all = k_cache[:, : past_length + n].astype(np.float64)  # as the cache holds them
            v_all = v_cache[:, : past_length + n].astype(np.float64)
            for i in range(n):
                end = past_length + i + 1  # causal: the row's slots up to this position
                k, v = k_all[:, :end], v_all[:, :end]  # [kv_heads, end, head_dim]
                scores = q[i] @ k.transpose(0, 2, 1) / np.sqrt(s.head_dim)  # [kv_heads, group, end]
                weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
                weights /= weights.sum(axis=-1, keepdims=True)
                attended[i] = (weights @ v).reshape(-1)
            x = x + _rows(attended, layer["o"])
            x = x + _rows(np.tanh(_rows(_norm(x), layer["up"])), layer["down"])
        return _norm(x)


@dataclass(frozen=True)
class Call:
    """What one `run` was asked to compute (for tests that count the work)."""

    batch: int
    seq: int
    virtual: int
    past_lengths: tuple[int, ...]
    input_lengths: tuple[int, ...]
    scored: int


@dataclass
class NumpyBackend:
    """`Backend` over a `ToyModel`: numpy buffers on the "cpu", the graph contract's inputs
    checked as an ONNX Runtime session would refuse them (shapes, capacity, a past with several
    new positions at batch > 1, which ONNX Runtime's attention refuses)."""

    manifest: mf.Manifest
    model: ToyModel
    limits: Limits | None = None  # set to act as a TensorRT engine built for these shapes
    name: str = "numpy"
    device: str = "cpu"
    runs_plain: bool = False  # its manifests take no LoRA/IA3 tables
    calls: list[Call] = field(default_factory=list)
    closed: bool = False

    def run(self, inputs: dict[str, Any], past: Sequence[Any], present: Sequence[Any],
            weights: Sequence[Any] | None = ()) -> np.ndarray:
        if self.closed:
            raise RuntimeError("the backend is closed")
        m = self.manifest
        ids = np.asarray(inputs["input_ids"])
        embeds = np.asarray(inputs["prompt_embeds"])
        past_lengths, input_lengths = np.asarray(inputs["past_lengths"]), np.asarray(inputs["input_lengths"])
        index = np.asarray(inputs["logits_index"])
        batch, seq = ids.shape
        virtual = embeds.shape[1]
        names = ("input_ids", "past_lengths", "input_lengths", "logits_index")
        if any(np.asarray(inputs[n]).dtype != np.int64 for n in names) or embeds.dtype != np.dtype(m.dtype):
            raise TypeError(f"input dtypes: {[(n, np.asarray(inputs[n]).dtype) for n in inputs]}")
        if embeds.shape != (batch, virtual, m.hidden_size) or past_lengths.shape != (batch,) \
                or input_lengths.shape != (batch,) or index.ndim != 2 or index.shape[0] != batch:
            raise ValueError(f"input shapes disagree: {[(n, np.shape(v)) for n, v in inputs.items()]}")
        if len(past) != 2 * m.num_layers or len(present) != len(past):
            raise ValueError(f"{len(past)} past and {len(present)} present buffers for {m.num_layers} layers")
        capacity = past[0].shape[2]
        if any(p.shape != (batch, m.num_kv_heads, capacity, m.head_dim) for p in [*past, *present]):
            raise ValueError(f"cache buffers {[p.shape for p in past]} do not fit batch {batch}")
        if (input_lengths < 1).any() or (input_lengths > virtual + seq).any() or (past_lengths < 0).any():
            raise ValueError(f"input_lengths {input_lengths} outside 1..{virtual + seq}")
        if (past_lengths + virtual + seq > capacity).any():
            raise ValueError(f"capacity {capacity} cannot hold past {past_lengths} + {virtual + seq} positions")
        if (index < 0).any() or (index >= virtual + seq).any():
            raise ValueError(f"logits_index {index} outside 0..{virtual + seq - 1}")
        if batch > 1 and (past_lengths > 0).any() and virtual + seq > 1:
            raise ValueError("a past with several new positions runs at batch 1 only (ONNX Runtime's attention)")
        if present is not past:  # a "copy" graph: present is the past with this call's slots written
            for dst, src in zip(present, past):
                dst[...] = src
        logits = np.empty((batch, index.shape[1], m.vocab_size), np.dtype(m.dtype))
        for b in range(batch):
            x = np.concatenate([embeds[b].astype(np.float64), self.model.embed[ids[b]]])
            keys, values = [p[b] for p in present[0::2]], [p[b] for p in present[1::2]]
            hidden = self.model.forward_row(x, int(past_lengths[b]), keys, values)
            logits[b] = _rows(hidden[index[b]], self.model.head)
        self.calls.append(Call(batch, seq, virtual, tuple(map(int, past_lengths)), tuple(map(int, input_lengths)),
                               index.shape[1]))
        return logits

    def upload(self, array: np.ndarray) -> Any:
        return np.ascontiguousarray(array, np.dtype(self.manifest.dtype))

    def allocate(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, np.dtype(self.manifest.dtype))

    def copy_into(self, dst: Any, src: Any, row: int = 0, slots: int | None = None, at: int = 0,
                  src_at: int = 0) -> None:
        n = src.shape[2] - src_at if slots is None else slots
        dst[row : row + src.shape[0], :, at : at + n] = src[:, :, src_at : src_at + n]

    def to_numpy(self, buffer: Any) -> np.ndarray:
        return np.array(buffer)

    def memory_stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.closed = True
