"""`Limits`: the shapes a TensorRT engine (or ONNX Runtime's TensorRT provider) accepts.

Plain data, owned by the runtime: a backend reports its `Limits` (`Backend.limits`) and the engine
checks requests against them; `prefixport.engines` builds engines for them and records them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import manifest as mf
from ..errors import InputError


@dataclass(frozen=True)
class Limits:
    """What an engine accepts. A decode step reads at most `max_past` cached positions, so a row's
    context (virtual tokens + prompt + new tokens) is at most `max_past + 1`."""

    max_batch: int = 8  # rows in one call
    max_seq: int = 512  # prompt tokens in one prefill
    max_past: int = 2047  # cached positions a decode step reads
    max_virtual: int = 128  # an adapter's virtual tokens (soft prompt or prefix)

    @classmethod
    def for_manifest(cls, manifest: mf.Manifest, max_batch: int = 8, max_seq: int | None = None,
                     max_past: int | None = None, max_virtual: int | None = None) -> Limits:
        """Limits checked against the export: the context never exceeds the model's positions.
        Defaults: max_past 2047, max_seq 512, max_virtual 128, each cut to what the model holds."""
        context = manifest.max_positions
        max_past = min(2048, context) - 1 if max_past is None else max_past
        max_seq = min(512, max_past) if max_seq is None else max_seq
        max_virtual = min(128, max_past) if max_virtual is None else max_virtual
        limits = cls(max_batch, max_seq, max_past, max_virtual)
        for name, value in asdict(limits).items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if max_past + 1 > context:
            raise InputError(f"max_past {max_past} + 1 exceeds the model's context of {context} positions")
        if max_seq > max_past or max_virtual > max_past:
            raise InputError(f"max_seq ({max_seq}) and max_virtual ({max_virtual}) must not exceed "
                             f"max_past ({max_past}): a prompt's cache is read by the next decode step")
        return limits

    @property
    def context(self) -> int:
        """Positions a row may use: virtual tokens + prompt + new tokens."""
        return self.max_past + 1
