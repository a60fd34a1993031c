"""TensorRT optimisation profiles for the graph contract (docs/design.md), planned from a few limits.

Two profiles: `prefill` (prompts, after a prefix or with a soft prompt; zero virtual tokens
included) and `decode` (one token per row). Both run on cache rows of any capacity up to the
context (the capacity is the cache's, shared by rows of every length). The runtime picks, per call, the
first profile whose ranges hold the call's shapes. Pure data and arithmetic: `prefixport.engines.build`
builds an engine with these profiles, the TensorRT backend and ONNX Runtime's TensorRT provider use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import manifest as mf
from ..errors import EngineError
from .limits import Limits

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class Profile:
    """Ranges of the four free dimensions: batch, seq (new tokens), virtual, capacity (cache slots)."""

    name: str
    batch: Range
    seq: Range
    virtual: Range
    capacity: Range
    context: int  # a row's slots never exceed it

    def holds(self, batch: int, seq: int, virtual: int, capacity: int) -> bool:
        return batch in self.batch and seq in self.seq and virtual in self.virtual and capacity in self.capacity

    def shapes(self, manifest: mf.Manifest) -> dict[str, tuple[Shape, Shape, Shape]]:
        """min/opt/max shape of every graph input under this profile."""
        b, s, v, c = self.batch, self.seq, self.virtual, self.capacity

        def at(pick: str) -> dict[str, Shape]:
            bb, ss, vv, cc = (getattr(r, pick) for r in (b, s, v, c))
            kv = (bb, manifest.num_kv_heads, cc, manifest.head_dim)
            # logits at 1 position per row up to every one (scoring): never more than seq + virtual
            scored = ss + vv if pick == "max" else 1
            shapes = {"input_ids": (bb, ss), "prompt_embeds": (bb, vv, manifest.hidden_size),
                      "past_lengths": (bb,), "input_lengths": (bb,), "logits_index": (bb, scored)}
            shapes.update({name: kv for name in mf.past_names(manifest.num_layers)})
            return shapes

        low, opt, high = at("min"), at("opt"), at("max")
        return {name: (low[name], opt[name], high[name]) for name in low}


def plan_profiles(limits: Limits) -> list[Profile]:
    """The decode profile first (the hot path), then prefill."""
    lim = limits
    decode = Profile("decode", batch=Range(1, max(1, lim.max_batch // 2), lim.max_batch), seq=Range(1, 1, 1),
                     virtual=Range(0, 0, 0), capacity=Range(1, min(lim.context, 256), lim.context),
                     context=lim.context)
    prefill = Profile("prefill", batch=Range(1, 1, lim.max_batch), seq=Range(0, min(lim.max_seq, 128), lim.max_seq),
                      virtual=Range(0, 0, lim.max_virtual), capacity=Range(1, min(lim.context, 256), lim.context),
                      context=lim.context)
    return [decode, prefill]


def choose_profile(profiles: list[Profile], batch: int, seq: int, virtual: int, capacity: int) -> int:
    """Index of the first profile that holds a call's shapes; an EngineError names the limit hit."""
    for i, profile in enumerate(profiles):
        if profile.holds(batch, seq, virtual, capacity):
            return i
    raise EngineError(
        f"a call with batch {batch}, {seq} new tokens, {virtual} virtual tokens and a cache of {capacity} slots "
        "is outside the TensorRT engine's profiles ("
        + "; ".join(f"{p.name}: batch <= {p.batch.max}, seq <= {p.seq.max}, virtual <= {p.virtual.max}, "
                    f"capacity <= {p.capacity.max}" for p in profiles)
        + "); rebuild it with larger limits: "
        "`prefixport build-engine OUTDIR --max-batch/--max-seq/--max-past/--max-virtual`"
    )


def union_shapes(profiles: list[Profile], manifest: mf.Manifest) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One profile covering all of them (for ONNX Runtime's TensorRT provider): the smallest min,
    the largest max, the first profile's opt."""
    per = [p.shapes(manifest) for p in profiles]
    out = {}
    for name in per[0]:
        lows, highs = [s[name][0] for s in per], [s[name][2] for s in per]
        out[name] = (tuple(map(min, zip(*lows))), per[0][name][1], tuple(map(max, zip(*highs))))
    return out
