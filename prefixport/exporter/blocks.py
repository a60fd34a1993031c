"""int4 from the weights' own quantisation blocks (docs/export.md, "Quantisation").

The default model ships as a GGUF whose MatMul weights are Q4_1 — blocks of 32 along the input,
`w = d * q + m` with q in 0..15 — and whose tied embedding (the lm_head) is Q8_0, `w = d * q`
with q in -127..127; d and m are float16. The float export holds them de-quantised. Such a block
gives its own parameters back: its minimum is m (q = 0) and its maximum 15d + m (q = 15), or its
largest magnitude 127d. Each MatMul becomes a `MatMulNBits` over exactly those integers:

- Q4_1: 4 bits without zero points (MatMulNBits then takes 8: `d * sum((q - 8) x)` per block;
  explicit zero points measured 9% slower), plus `(m + 8d) * sum(x)` per block, which MatMulNBits
  cannot take (its fast kernel's zero points are integers): x's sums per block (Reshape,
  ReduceSum) times those offsets [blocks, N], added.
- Q8_0: 8 bits, q + 128 stored (MatMulNBits' default zero point), nothing to add. The embedding
  Gather of the same table becomes a `GatherBlockQuantized` over those bytes: stored once.

d and m are stored as float16 where that is as exact as float32 (the GGUF's own values), and cast
to float32 in the graph; ONNX Runtime folds the casts when it loads the session, so the file is
the GGUF's size and the kernels see float32. A weight that is neither Q4_1 nor Q8_0 is written as
Q4_1 by the same rule: asymmetric min-max rounding per block, float minimums (llama.cpp's Q4_1),
then lossy. The graph computes the GGUF's weights, not an approximation of them; only
`accuracy_level` 4's int8 activations differ from the float export.
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


def _error(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> float:
    """Largest |w - (d q + m)|, relative to w's largest magnitude."""
    k, n = w.shape
    approx = q.reshape(k // BLOCK, BLOCK, n) * d[:, None] + (0 if m is None else m[:, None])
    return float(np.abs(approx.reshape(k, n) - w).max()) / max(float(np.abs(w).max()), 1e-30)


def _half(a: np.ndarray) -> np.ndarray:
    """`a` rounded to float16 (held as float32)."""
    return a.astype(np.float16).astype(np.float32)


EXACT = 1e-6  # relative: float32 rounding of the de-quantisation itself


def quantize(graph: ir.Graph, accuracy_level: int = 4) -> tuple[int, int]:
    """Every MatMul with a constant 2-D weight (K a multiple of 32) becomes MatMulNBits over its
    blocks: 8-bit where the weight is exactly Q8_0 and not Q4_1, else 4-bit. An embedding Gather
    of an 8-bit weight's table reads the same bytes. Returns how many MatMuls became 4-bit and
    8-bit. Unused initializers are dropped."""
    counts = [0, 0]
    tables: list[tuple[np.ndarray, ir.Value, ir.Value]] = []  # 8-bit weights: (w, q [N, K], d [N, blocks])
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            continue
        w = weight.const_value.numpy().astype(np.float32)
        if w.shape[0] % BLOCK:
            continue
        q, d, m = asymmetric(w)
        signed, error, eight = q, _error(w, q, d, m), False
        if error > EXACT:
            q8, d8 = symmetric8(w)
            error8 = _error(w, q8, d8, None)
            if error8 <= EXACT:
                signed, q, d, m, error, eight = q8, (q8.astype(np.int16) + 128).astype(np.uint8), d8, None, error8, True
        store = np.float32
        d16, m16 = _half(d), None if m is None else _half(m)
        if _error(w, signed, d16, m16) <= max(error, EXACT):  # float16 loses nothing
            d, m, store = d16, m16, np.float16
        table = _replace(graph, node, q, d, m, 8 if eight else 4, accuracy_level, store)
        if eight:
            tables.append((w, *table))
        counts[eight] += 1
    _share_embeddings(graph, tables)
    graph.sort()  # the embedding now reads scales cast beside the lm_head, at the graph's end
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        del graph.initializers[name]
    return counts[0], counts[1]


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, node: ir.Node, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int,
             accuracy_level: int, store: type) -> tuple[ir.Value, ir.Value]:
    """MatMul(x, W) -> MatMulNBits(x, q, d) [+ MatMul(block sums of x, m + 8d)]; d and m stored as
    `store` and cast to float32 in the graph. Returns the bytes [N, blocks, 32] and d [N, blocks]."""
    k, n = q.shape
    blocks = k // BLOCK
    name = node.name or node.inputs[1].name
    x = node.inputs[0]
    t = q.T.reshape(n, blocks, BLOCK)  # MatMulNBits' layout: [N, blocks, block bytes]
    packed = t if bits == 8 else (t[..., 0::2] & 0x0F) | (t[..., 1::2] << 4)
    nodes: list[ir.Node] = []

    def stored(suffix: str, array: np.ndarray) -> ir.Value:
        value = _constant(graph, f"{name}.{suffix}", array.astype(store))
        if store is np.float32:
            return value
        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                       name=f"{name}.{suffix}.float")
        nodes.append(cast)
        return cast.outputs[0]

    scales = stored("scales", d.T)  # [N, blocks]
    flat = ir.Node("", "Reshape", [scales, _constant(graph, f"{name}.flat", np.array([-1], np.int64))],
                   name=f"{name}.scales.flat")
    q_value = _constant(graph, f"{name}.q", packed.astype(np.uint8))
    attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                  ir.AttrInt64("block_size", BLOCK), ir.AttrInt64("accuracy_level", accuracy_level)]
    matmul = ir.Node("com.microsoft", "MatMulNBits", [x, q_value, flat.outputs[0]], attributes=attributes,
                     name=f"{name}.nbits")
    nodes += [flat, matmul]
    out = matmul.outputs[0]
    if m is not None:  # no zero points: MatMulNBits takes 8, d * (q - 8); x's block sums times m + 8d
        minimums = stored("minimums", m)  # [blocks, N]
        turned = ir.Node("", "Transpose", [scales], attributes=[ir.AttrInt64s("perm", [1, 0])], name=f"{name}.scales.t")
        eight = ir.Node("", "Mul", [turned.outputs[0], _constant(graph, f"{name}.eight", np.array(8, np.float32))],
                        name=f"{name}.eight_d")
        offsets = ir.Node("", "Add", [minimums, eight.outputs[0]], name=f"{name}.offsets")
        nodes += [turned, eight, offsets]
        if x.shape is not None and len(x.shape) == 3:  # the exporter's [batch, sequence, K]
            split = ir.Node("", "Reshape", [x, _constant(graph, f"{name}.blocks", np.array([0, 0, blocks, BLOCK], np.int64))],
                            name=f"{name}.blocks")
            sums = ir.Node("", "ReduceSum", [split.outputs[0], _constant(graph, f"{name}.axis", np.array([-1], np.int64))],
                           attributes=[ir.AttrInt64("keepdims", 0)], name=f"{name}.block_sums")
            nodes.append(split)
        else:  # any rank: a MatMul by a 0/1 indicator [K, blocks]
            indicator = np.repeat(np.eye(blocks, dtype=np.float32), BLOCK, axis=0)
            sums = ir.Node("", "MatMul", [x, _constant(graph, f"{name}.indicator", indicator)], name=f"{name}.block_sums")
        shift = ir.Node("", "MatMul", [sums.outputs[0], offsets.outputs[0]], name=f"{name}.minimums")
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
    return q_value, scales


def _share_embeddings(graph: ir.Graph, tables: list[tuple[np.ndarray, ir.Value, ir.Value]]) -> None:
    """Gather(E, ids) where E [V, K] is an 8-bit MatMul weight W [K, V] transposed (a tied
    embedding) -> GatherBlockQuantized over W's bytes and scales: exact, and E is no longer stored."""
    for node in list(graph):
        table = node.inputs[0] if node.op_type == "Gather" and node.domain == "" else None
        if table is None or table.const_value is None or node.attributes.get_int("axis", 0) != 0:
            continue
        e = table.const_value.numpy()
        match = next((t for t in tables if e.ndim == 2 and t[0].shape == e.shape[::-1] and np.array_equal(t[0].T, e)), None)
        if match is None:
            continue
        _, q_value, scales = match
        v, k = e.shape
        rows = ir.Node("", "Reshape", [q_value, _constant(graph, f"{node.name}.rows", np.array([v, k], np.int64))],
                       name=f"{node.name}.rows")
        gather = ir.Node("com.microsoft", "GatherBlockQuantized", [rows.outputs[0], node.inputs[1], scales],
                         attributes=[ir.AttrInt64("bits", 8), ir.AttrInt64("block_size", BLOCK),
                                     ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)],
                         name=f"{node.name}.blocks")
        graph.insert_before(node, [rows, gather])
        ir.convenience.replace_all_uses_with(node.outputs[0], gather.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
