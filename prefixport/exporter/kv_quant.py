"""The 8-bit KV cache (`prefixport export --kv-cache-dtype int8`; docs/design.md, "The int8 cache").

ONNX Runtime's GroupQueryAttention keeps its cache in int8 when given `k_scale`/`v_scale` and
`kv_cache_bit_width=8`: it writes `clip(round(x / scale), -128, 127)` (round half to even) into
the int8 past/present buffer in place and attends over `q * scale`, the new positions included
(measured on ONNX Runtime 1.32's CPU kernel against a numpy reference: 1e-6). The scales are fixed
here, at export, as graph initializers, one per layer, K and V, and per channel:
`[1, kv_heads, 1, head_dim]` (PER_CHANNEL).

Calibration runs the float-cache graph (float weights: so every weight recipe of one base model
gets the same scales, and a draft export can share its target's) over `CALIBRATION`: 8 prompts,
not the agreement prompts, in the chat template and raw alternately, each continued by the
model's own greedy decoding (`CALIBRATION_TOKENS`), and reads the row's keys and values back. A
value's scale is `MARGIN x` the largest magnitude its channel took / 127, per layer, K and V, KV
head and channel. For keys turned by a rotary embedding, each token's magnitude is the largest
its rotary pair projects on the channel at any position up to the context (`key_bound`, from the
graph's own cos/sin tables): a slowly turning pair shows at long contexts values short texts never
show (plain absmax measured 37.5% agreement at 2k tokens, this 98.4%). Adapter bundles given to
`calibrate` (`export --check-adapter`) are covered too: a prefix's keys and values, a soft
prompt's virtual tokens (docs/export.md, "int8 KV cache", has the measurements).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from .. import manifest as mf

CALIBRATION = (
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main differences between mitochondria and chloroplasts?",
    "Translate into French: The train leaves at seven o'clock tomorrow morning.",
    "Give me a recipe for a simple tomato soup.",
    "Explain the rules of chess to a ten-year-old.",
    "Convert 3.5 kilometres to miles and show the calculation.",
    "Write a haiku about autumn rain, then explain its imagery.",
)
CALIBRATION_TOKENS = 96  # greedy tokens continued per prompt
MARGIN = 1.0  # scale = MARGIN x the calibrated bound / 127 (measured: docs/export.md, "int8 KV cache")
LEVELS = 127  # the bound maps to +-127 (symmetric; -128 is reached only by clipping)


@dataclass
class Rotary:
    """How one layer's graph rotates its keys: pairs "half" (i, i + dim/2) or "interleaved" (2i, 2i + 1)
    over the first `dim` channels, pair i turning by `theta[i]` a position, for `positions` positions."""

    pairs: str
    dim: int
    theta: np.ndarray | None  # None: not read from the tables (any angle is assumed reachable)
    positions: int


@dataclass
class Calibration:
    """Per layer, K and V (`mf.past_names` order): scales [1, kv_heads, 1, head_dim] float32."""

    scales: list[np.ndarray]
    tokens: int  # calibration positions seen
    prompts: int
    rotary: str | None  # how keys' rotary pairs were found ("half", "interleaved"), None: no rotary
    margin: float
    adapters: list[str] = field(default_factory=list)  # bundles whose keys and values the scales cover

    def record(self) -> dict[str, Any]:
        keys = (" (keys: the largest magnitude the value's rotary pair reaches at any position up to the "
                "context)" if self.rotary else "")
        return {"prompts": self.prompts, "tokens": self.tokens, "greedy_tokens_per_prompt": CALIBRATION_TOKENS,
                "statistic": "per-channel absmax" + keys, "rotary_pairs": self.rotary, "margin": self.margin,
                "adapters_covered": self.adapters}


def rotary_layers(path: Path, num_layers: int) -> list[Rotary | None]:
    """Per layer, how the graph rotates its keys, from its GroupQueryAttention (do_rotary: its
    cos/sin inputs) or the RotaryEmbedding that feeds its key; None: no rotary found (GPT-2)."""
    graph = ir.load(path).graph
    layers: list[Rotary | None] = [None] * num_layers
    names = {mf.past_key_name(i): i for i in range(num_layers)}
    for node in graph:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        layer = names.get(node.inputs[3].name if node.inputs[3] is not None else "")
        if layer is None:
            continue
        if node.attributes.get_int("do_rotary", 0):
            interleaved, cos, sin = node.attributes.get_int("rotary_interleaved", 0), node.inputs[7], node.inputs[8]
        else:
            rotary = _producer_through_reshapes(node.inputs[1])
            if rotary is None or rotary.op_type != "RotaryEmbedding" or rotary.domain != "com.microsoft":
                continue
            interleaved, cos, sin = rotary.attributes.get_int("interleaved", 0), rotary.inputs[2], rotary.inputs[3]
        layers[layer] = _rotary(interleaved, cos, sin)
    return layers


def _producer_through_reshapes(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("Reshape", "Transpose"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node


def _rotary(interleaved: int, cos: ir.Value | None, sin: ir.Value | None) -> Rotary | None:
    """The rotation a cos/sin table [positions, dim / 2] applies; theta None where the tables are
    not constants linear in the position (any angle is then assumed reachable)."""
    pairs = "interleaved" if interleaved else "half"
    if cos is None or sin is None or cos.shape is None or not all(isinstance(d, int) for d in cos.shape):
        return None
    positions, half = int(cos.shape[0]), int(cos.shape[1])
    theta = None
    if cos.const_value is not None and sin.const_value is not None and positions > 1:
        c, s = cos.const_value.numpy().astype(np.float64), sin.const_value.numpy().astype(np.float64)
        step = np.arctan2(s[1], c[1])
        p = np.arange(positions)[:, None]
        if np.allclose(c, np.cos(p * step), atol=1e-3) and np.allclose(s, np.sin(p * step), atol=1e-3):
            theta = np.abs(step)
    return Rotary(pairs, 2 * half, theta, positions)


def _max_abs_cos(start: np.ndarray, span: np.ndarray) -> np.ndarray:
    """max |cos(a)| over a in [start, start + span] (span >= 0), elementwise."""
    k = np.ceil(start / np.pi)
    inside = (k * np.pi <= start + span) | (span >= np.pi)
    return np.where(inside, 1.0, np.maximum(np.abs(np.cos(start)), np.abs(np.cos(start + span))))


def key_bound(keys: np.ndarray, rotary: Rotary | None) -> np.ndarray:
    """|keys| [kv_heads, n, head_dim] (slot = position: the row's keys from slot 0), each rotated
    channel replaced by the largest magnitude it takes as its token's key at any position up to
    the table's: its rotary pair (x + iy, turning by theta a position) projected on the channel's
    axis, over the angles those positions reach. Channels past the rotary dim: |keys|."""
    out = np.abs(keys).astype(np.float64)
    if rotary is None:
        return out
    d = rotary.dim
    x, y = (keys[..., :d // 2], keys[..., d // 2:d]) if rotary.pairs == "half" else (keys[..., 0:d:2], keys[..., 1:d:2])
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = np.hypot(x, y)
    if rotary.theta is None:
        real = imag = r
    else:
        theta = rotary.theta[None, None, :]
        position = np.arange(keys.shape[-2], dtype=np.float64)[None, :, None]
        start = np.arctan2(y, x) - position * theta  # the angle at position 0
        span = (rotary.positions - 1) * theta
        real = r * _max_abs_cos(start, span)
        imag = r * _max_abs_cos(start - np.pi / 2, span)  # |sin a| = |cos(a - pi/2)|
    if rotary.pairs == "half":
        out[..., :d // 2], out[..., d // 2:d] = real, imag
    else:
        out[..., 0:d:2], out[..., 1:d:2] = real, imag
    return out


def calibrate(folder: Path, margin: float = MARGIN, prompts: tuple[str, ...] = CALIBRATION,
              tokens: int = CALIBRATION_TOKENS, adapters: Sequence[Path] = ()) -> Calibration:
    """Scales for an int8 cache from the float-cache export in `folder` (see the module docstring),
    covering also each adapter bundle's own keys and values: a prefix's tensors, a soft prompt's
    virtual tokens run through the graph (a prefix tuned freely lies far outside the model's range:
    the demo's date-prefix reaches 39x a channel's calibrated bound in layer 0's values)."""
    from ..adapters.bundle import load_bundle
    from ..runtime import Engine
    from ..runtime.generation import decode_step, prefill_new

    m = mf.Manifest.load(folder)
    rotary = rotary_layers(folder / mf.MODEL_NAME, m.num_layers)
    engine = Engine.load(folder, prompt_cache_bytes=0)
    bounds = [np.zeros((m.num_kv_heads, m.head_dim), np.float64) for _ in range(2 * m.num_layers)]

    def cover(arrays: Sequence[np.ndarray], positions: bool) -> None:
        """Widen the bounds to hold `arrays` (2L x [kv_heads, n, head_dim], from slot 0); keys at
        every position up to the context where `positions` (a prompt's: it may sit anywhere)."""
        for t, array in enumerate(arrays):
            array = np.asarray(array, np.float32)
            magnitude = key_bound(array, rotary[t // 2]) if t % 2 == 0 and positions else np.abs(array)
            bounds[t] = np.maximum(bounds[t], magnitude.max(axis=1))

    try:
        seen = 0
        chat = engine.tokenizer.chat_template is not None
        for i, prompt in enumerate(prompts):
            ids = engine.encode(prompt, chat=chat and i % 2 == 0)  # chat-formatted and raw, alternately
            logits, cache = prefill_new(engine.backend, [ids], extra=tokens)
            for _ in range(tokens - 1):  # the model's own continuation, decoded as generation does
                token = np.array([int(np.argmax(logits[0]))], np.int64)
                logits = decode_step(engine.backend, cache, token, m.hidden_size, np.dtype(m.dtype))
            arrays = cache.read(0)  # 2L x [kv_heads, n, head_dim]
            seen += arrays[0].shape[1]
            cover(arrays, positions=True)
        for path in adapters:  # a prefix's slots and a soft prompt's positions are always 0..n-1
            bundle = load_bundle(path, m)
            if bundle.kind == "prefix":
                cover(bundle.prefix(m.num_layers), positions=False)
            else:
                embeds = np.ascontiguousarray(bundle.tensors["prompt_embeds"][None], np.dtype(m.dtype))
                _, cache = prefill_new(engine.backend, [[]], embeds, extra=0)
                cover(cache.read(0), positions=False)
    finally:
        engine.close()
    tiny = 1e-6  # a channel that never moved: any positive scale
    scales = [(np.maximum(b, tiny) * (margin / LEVELS)).astype(np.float32)[None, :, None, :] for b in bounds]
    kinds = {r.pairs for r in rotary if r is not None}
    return Calibration(scales, seen, len(prompts), "/".join(sorted(kinds)) or None, margin,
                       [Path(p).stem for p in adapters])


def scales_digest(scales: list[np.ndarray]) -> str:
    """sha256 over the scales (what a draft export must share with its target)."""
    h = hashlib.sha256()
    for s in scales:
        h.update(np.ascontiguousarray(s, np.float32).tobytes())
    return "sha256:" + h.hexdigest()


def save_scales(folder: Path, scales: list[np.ndarray], num_layers: int) -> Path:
    """`kv_scales.safetensors`: `past_key_values.{i}.key` / `.value` -> [1, kv_heads, 1, head_dim]."""
    from safetensors.numpy import save_file

    path = Path(folder) / mf.KV_SCALES_NAME
    save_file({name: np.ascontiguousarray(s, np.float32) for name, s in zip(mf.past_names(num_layers), scales)},
              str(path), metadata={"format": "prefixport-kv-scales", "quant_type": "PER_CHANNEL"})
    return path


def to_int8(path: Path, scales: list[np.ndarray]) -> int:
    """Rewrite the graph at `path` in place: every GroupQueryAttention's past/present become int8
    (the graph's `past_key_values.*` inputs and `present.*` outputs with them) with the layer's
    scales as initializers `kv_scale.{i}.key` / `.value` (PER_CHANNEL, kv_cache_bit_width 8).
    Returns how many attention nodes were converted. Only the cache's dtype changes: names and
    shapes stay those of the graph contract."""
    model = ir.load(path)
    graph = model.graph
    names = {name: i for i, name in enumerate(mf.past_names(len(scales) // 2))}
    done = 0
    for node in graph:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        past_key, past_value = node.inputs[3], node.inputs[4]
        if past_key is None or past_key.name not in names or past_value is None or past_value.name not in names:
            continue
        layer_scales = []
        for past in (past_key, past_value):
            scale = ir.Value(name=past.name.replace("past_key_values.", "kv_scale."),
                             const_value=ir.tensor(np.ascontiguousarray(scales[names[past.name]], np.float32)))
            graph.register_initializer(scale)
            layer_scales.append(scale)
        for value in (past_key, past_value, node.outputs[1], node.outputs[2]):
            value.type = ir.TensorType(ir.DataType.INT8)
        if len(node.inputs) < 14:
            node.resize_inputs(14)
        node.replace_input_with(12, layer_scales[0])
        node.replace_input_with(13, layer_scales[1])
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
        node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", "PER_CHANNEL")
        node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", "PER_CHANNEL")
        done += 1
    ir.save(model, path)
    return done


def apply(folder: Path, manifest: mf.Manifest, calibration: Calibration) -> dict[str, Any]:
    """Give the export in `folder` an int8 KV cache with `calibration`'s scales: the graph
    (`to_int8`), `kv_scales.safetensors` and the manifest (`kv_dtype`, `kv_quantization`: returned,
    for the caller to add its measurements to), saved."""
    nodes = to_int8(folder / mf.MODEL_NAME, calibration.scales)
    if nodes != manifest.num_layers:
        from ..errors import ExportError

        raise ExportError(f"only {nodes} of {manifest.num_layers} attention layers are GroupQueryAttention: this "
                          "graph cannot hold an int8 KV cache; export without --kv-cache-dtype int8")
    save_scales(folder, calibration.scales, manifest.num_layers)
    manifest.kv_dtype = "int8"
    manifest.kv_quantization = {"dtype": "int8", "quant_type": "PER_CHANNEL",
                                "scale_shape": "[1, kv_heads, 1, head_dim]", "scales": mf.KV_SCALES_NAME,
                                "scales_sha256": scales_digest(calibration.scales), "calibration": calibration.record()}
    manifest.save(folder)
    return manifest.kv_quantization
