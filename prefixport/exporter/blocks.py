"""int4 from the weights' own quantisation blocks (docs/export.md, "Quantisation").

The default model ships as a GGUF whose MatMul weights are Q4_1 — blocks of 32 along the input,
`w = d * q + m` with q in 0..15 — and whose tied embedding (the lm_head) is Q8_0, `w = d * q`
with q in -127..127; the float export holds them de-quantised. Such a block gives its own
parameters back: its minimum is m (q = 0) and its maximum 15d + m (q = 15), or its largest
magnitude 127d. Each MatMul becomes a `MatMulNBits` over exactly those integers:

- Q4_1: 4 bits without zero points (MatMulNBits then takes 8: `d * sum((q - 8) x)` per block;
  explicit zero points measured 9% slower), plus `(m + 8d) * sum(x)` per block, which MatMulNBits
  cannot take (its fast kernel's zero points are integers): x's sums per block (Reshape,
  ReduceSum) times those offsets [blocks, N], added.
- Q8_0: 8 bits, zero point 128 (q + 128 stored), nothing to add.

A weight that is neither is written as Q4_1 too, by the same rule: asymmetric min-max rounding
per block, float minimums (what llama.cpp's Q4_1 does). The graph then computes the GGUF's
weights, not an approximation of them; only `accuracy_level` 4's int8 activations differ from
the float export.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

BLOCK = 32


def asymmetric(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] -> q [K, N] (0..15), scales d [K/32, N], minimums m [K/32, N]: w ~ d * q + m,
    exactly where w was Q4_1."""
    k, n = w.shape
    b = w.reshape(k // BLOCK, BLOCK, n)
    low, high = b.min(axis=1), b.max(axis=1)
    d = (high - low) / 15
    q = np.clip(np.rint((b - low[:, None]) / np.where(d == 0, 1, d)[:, None]), 0, 15)
    return q.astype(np.uint8).reshape(k, n), d.astype(np.float32), low.astype(np.float32)


def symmetric8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> q [K, N] (-127..127), scales d [K/32, N]: w ~ d * q, exactly where w was Q8_0."""
    k, n = w.shape
    b = w.reshape(k // BLOCK, BLOCK, n)
    d = np.abs(b).max(axis=1) / 127
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)[:, None]), -127, 127)
    return q.astype(np.int8).reshape(k, n), d.astype(np.float32)


def _exact(w: np.ndarray, approx: np.ndarray) -> bool:
    return bool(np.abs(approx - w).max() <= 1e-6 * max(float(np.abs(w).max()), 1e-30))


def quantize(graph: ir.Graph, accuracy_level: int = 4) -> tuple[int, int]:
    """Every MatMul with a constant 2-D weight (K a multiple of 32) becomes MatMulNBits over its
    blocks: 8-bit where the weight is exactly Q8_0 and not Q4_1, else 4-bit. Returns how many
    MatMuls became 4-bit and 8-bit. Unused initializers are dropped."""
    counts = [0, 0]
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            continue
        w = weight.const_value.numpy().astype(np.float32)
        if w.shape[0] % BLOCK:
            continue
        q, d, m = asymmetric(w)
        eight = not _exact(w, (q.reshape(-1, BLOCK, w.shape[1]) * d[:, None] + m[:, None]).reshape(w.shape))
        if eight:
            q8, d8 = symmetric8(w)
            eight = _exact(w, (q8.reshape(-1, BLOCK, w.shape[1]) * d8[:, None]).reshape(w.shape))
            if eight:
                q, d, m = (q8.astype(np.int16) + 128).astype(np.uint8), d8, None
        _replace(graph, node, q, d, m, 8 if eight else 4, accuracy_level)
        counts[eight] += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        del graph.initializers[name]
    return counts[0], counts[1]


def _replace(graph: ir.Graph, node: ir.Node, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int,
             accuracy_level: int) -> None:
    """MatMul(x, W) -> MatMulNBits(x, q, d, zero point) [+ MatMul(MatMul(x, blocks), m)]."""
    k, n = q.shape
    blocks = k // BLOCK
    name = node.name or node.inputs[1].name
    x = node.inputs[0]
    t = q.T.reshape(n, blocks, BLOCK)  # MatMulNBits' layout: [N, blocks, block bytes]
    packed = t if bits == 8 else (t[..., 0::2] & 0x0F) | (t[..., 1::2] << 4)

    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{name}.{suffix}", const_value=ir.tensor(np.ascontiguousarray(array)))
        graph.register_initializer(value)
        return value

    inputs = [x, constant("q", packed.astype(np.uint8)), constant("scales", d.T.reshape(-1))]
    if bits == 8:  # q + 128 stored, zero point 128
        inputs.append(constant("zero_points", np.full(n * blocks, 128, np.uint8)))
    else:  # no zero points: MatMulNBits takes 8, d * (q - 8); the 8 d goes with the minimums
        m = m + 8 * d
    attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                  ir.AttrInt64("block_size", BLOCK), ir.AttrInt64("accuracy_level", accuracy_level)]
    matmul = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=attributes, name=f"{name}.nbits")
    nodes, out = [matmul], matmul.outputs[0]
    if m is not None:  # x's sums per block [..., blocks], times the minimums [blocks, N]
        if x.shape is not None and len(x.shape) == 3:  # the exporter's [batch, sequence, K]
            split = ir.Node("", "Reshape", [x, constant("blocks", np.array([0, 0, blocks, BLOCK], np.int64))],
                            name=f"{name}.blocks")
            sums = ir.Node("", "ReduceSum", [split.outputs[0], constant("axis", np.array([-1], np.int64))],
                           attributes=[ir.AttrInt64("keepdims", 0)], name=f"{name}.block_sums")
            nodes.append(split)
        else:  # any rank: a MatMul by a 0/1 indicator [K, blocks]
            indicator = np.repeat(np.eye(blocks, dtype=np.float32), BLOCK, axis=0)
            sums = ir.Node("", "MatMul", [x, constant("indicator", indicator)], name=f"{name}.block_sums")
        shift = ir.Node("", "MatMul", [sums.outputs[0], constant("minimums", m)], name=f"{name}.minimums")
        add = ir.Node("", "Add", [matmul.outputs[0], shift.outputs[0]], name=f"{name}.add")
        nodes += [sums, shift, add]
        out = add.outputs[0]
    graph.insert_before(node, nodes)
    old = node.outputs[0]
    output = old in graph.outputs
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if output:  # the graph's output keeps its name (the runtime binds `logits` by name)
        out_name, old.name = old.name, f"{old.name}.replaced"
        out.name = out_name
