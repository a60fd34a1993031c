"""Graph passes after tracing: ONNX Runtime's fused ops, and weight-only quantisation.

Attention is fused while tracing (`attention.py`); here onnxscript's rewriter fuses RMSNorm
(+ residual add) into (Skip)SimplifiedLayerNormalization and the rotary embedding into
RotaryEmbedding with a cos/sin table, and ONNX Runtime's MatMulNBits quantiser rewrites the weight
MatMuls to int8 or int4. The graph's inputs and outputs never change.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize as onnxscript_optimize
from onnxscript.rewriter import _fusion_utils, _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from . import blocks

QUANTIZATIONS = {"int8": 8, "int4": 4}
# --quantize NAME -> (kind, algorithm): chosen by measurement (docs/export.md, "Quantisation")
RECIPES = {"int8": ("int8", "rtn"), "int4": ("int4", "blocks"), "int4-rtn": ("int4", "rtn")}
QUANT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits' int8 dot products (docs/export.md, "Quantisation")


class _RotaryTable(pattern.RewriteRuleClassBase):
    """transformers' rotary angles (`position_ids[..., None].float() * inv_freq`, concatenated
    twice, cos/sin) feeding a rotary fusion -> com.microsoft.RotaryEmbedding over a constant
    cos/sin table indexed by position_ids (onnxscript's own rule matches the older MatMul form)."""

    def __init__(self, name: str, max_positions: int, cast: bool) -> None:
        super().__init__(name, remove_nodes=False)  # cos/sin are shared by all layers
        self.max_positions, self.cast = max_positions, cast
        self._tables: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads, dtype):
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)
        angles = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Cos(angles), op.Sin(angles)
        if self.cast:
            cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
        return op.RotaryEmbedding(x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]), interleaved=interleaved,
                                  num_heads=num_heads, _domain="ai.onnxruntime._fusion")

    def check(self, context, position_ids, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2) or not _ir_utils.is_singleton_value(axes, lambda a: a in (-1, 2)):
            return result.fail("position_ids is not [batch, seq] unsqueezed last", position_ids)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().ndim != 1:
            return result.fail("inv_freq is not a 1-D constant", inv_freq)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, dtype=None, **_):
        if inv_freq not in self._tables:
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq.const_value.numpy()
            cos, sin = op.Constant(value=ir.tensor(np.cos(angles))), op.Constant(value=ir.tensor(np.sin(angles)))
            if self.cast:
                cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
            self._tables[inv_freq] = (cos, sin)
        cos, sin = self._tables[inv_freq]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain="com.microsoft")

    def cleanup(self) -> None:
        self._tables.clear()


class _PackedRotary(pattern.RewriteRuleClassBase):
    """[B, S, N*D] -> [B, N, S, D] -> rotary -> [B, S, N*D] (the attention takes packed heads)
    -> one RotaryEmbedding on the packed [B, S, N*D] tensor: four reshapes/transposes fewer."""

    def pattern(self, op, x, heads_shape, packed_shape, position_ids, cos, sin, interleaved, num_heads):
        split = op.Transpose(op.Reshape(x, heads_shape), perm=[0, 2, 1, 3])
        rotated = op.RotaryEmbedding(split, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                     _domain="com.microsoft")
        return op.Reshape(op.Transpose(rotated, perm=[0, 2, 1, 3]), packed_shape)

    def check(self, context, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(x, 3):
            return result.fail("input is not [batch, seq, heads * head_dim]", x)
        return result

    def rewrite(self, op, x, position_ids, cos, sin, interleaved, num_heads, **_):
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain="com.microsoft")


def fuse(path: Path, max_positions: int) -> dict[str, int]:
    """Rewrite the graph at `path` in place; returns the number of nodes of each fused op type."""
    model = ir.load(path)
    common_passes.ShapeInferencePass()(model)
    onnxscript_optimize(model)
    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)
    fuse_rotary_embedding(model)
    tables = pattern.RewriteRuleSet([_RotaryTable.rule(f"RotaryTable{'Cast' if c else ''}", max_positions, c)
                                     for c in (True, False)])
    _fusion_utils.apply_fusion_rules(tables)(model)
    _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([_PackedRotary.rule()]))(model)
    onnxscript_optimize(model)  # inlines any half-fused rotary left over, drops dead nodes
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    rotary_into_attention(model.graph)
    onnxscript_optimize(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    ir.save(model, path)
    return _fused_counts(model)


def rotary_into_attention(graph: ir.Graph) -> int:
    """GroupQueryAttention(RotaryEmbedding(q), RotaryEmbedding(k), v, ...) -> one GroupQueryAttention
    that rotates q and k itself (`do_rotary`, the same cos/sin tables and positions: exact), fed the
    q, k, v projections packed into one MatMul where they are three bias-free MatMuls of one
    activation (`packed QKV`). Returns how many attention nodes were rewritten.

    Measured on the default model (2 cores): 60 RotaryEmbedding and 60 MatMul nodes fewer, and the
    reshapes around them (what onnxruntime-genai's builder emits for this model)."""
    done = 0
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) != 7:
            continue
        q_rot, k_rot = (v.producer() if v is not None else None for v in node.inputs[:2])
        if not all(r is not None and r.op_type == "RotaryEmbedding" and r.domain == "com.microsoft"
                   for r in (q_rot, k_rot)):
            continue
        if q_rot.inputs[1:] != k_rot.inputs[1:] or (q_rot.attributes.get_int("interleaved", 0)
                                                     != k_rot.attributes.get_int("interleaved", 0)):
            continue
        positions, cos, sin = q_rot.inputs[1:4]
        q, k, v = q_rot.inputs[0], k_rot.inputs[0], _through_reshapes(node.inputs[2])
        packed = _pack(graph, node, [q, k, v])
        if packed is None:  # an export with --lora: each projection then gains its row's LoRA and IA3
            _pack_bases(graph, [q, k, v])
        qkv = [packed, None, None] if packed is not None else [q, k, v]
        attributes = [a for a in node.attributes.values() if a.name not in ("do_rotary", "rotary_interleaved")]
        attributes += [ir.AttrInt64("do_rotary", 1),
                       ir.AttrInt64("rotary_interleaved", q_rot.attributes.get_int("interleaved", 0))]
        fused = ir.Node("com.microsoft", "GroupQueryAttention", [*qkv, *node.inputs[3:7], cos, sin, positions],
                        attributes=attributes, num_outputs=len(node.outputs), name=f"{node.name}.rotary")
        graph.insert_before(node, fused)
        for old, new in zip(node.outputs, fused.outputs):
            new.shape, new.type, name = old.shape, old.type, old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = f"{name}.replaced", name  # present.{i}.*: the contract's names
        graph.remove(node, safe=True)
        done += 1
    return done


def _through_reshapes(value: ir.Value) -> ir.Value:
    """`value`, or what a chain of Reshapes made it from when that has the same rank-3 shape (the
    [B, S, N*D] -> [B, S, N, D] -> [B, S, N*D] round trip of transformers' view and our packing)."""
    source = value
    while source.producer() is not None and source.producer().op_type == "Reshape":
        source = source.producer().inputs[0]
    shape, want = source.shape, value.shape
    if source is value or shape is None or want is None or len(shape) != 3 or len(want) != 3:
        return value
    return source if shape[2] == want[2] and isinstance(shape[2], int) else value


def _pack(graph: ir.Graph, before: ir.Node, values: list[ir.Value]) -> ir.Value | None:
    """One MatMul over the concatenated weights when `values` are bias-free MatMuls of one
    activation with constant 2-D weights; None otherwise."""
    nodes = [v.producer() for v in values]
    if not all(n is not None and n.op_type == "MatMul" and n.domain == "" for n in nodes):
        return None
    activation = nodes[0].inputs[0]
    weights = [n.inputs[1].const_value for n in nodes]
    if any(n.inputs[0] is not activation for n in nodes) or any(w is None or len(w.shape) != 2 for w in weights):
        return None
    name = f"{nodes[0].name}.qkv"
    weight = ir.Value(name=f"{name}.weight", const_value=ir.tensor(np.concatenate([w.numpy() for w in weights], 1)))
    graph.register_initializer(weight)
    matmul = ir.Node("", "MatMul", [activation, weight], name=name)
    graph.insert_before(before, matmul)
    return matmul.outputs[0]


def _base_matmul(value: ir.Value) -> ir.Node | None:
    """The weight MatMul under a projection's per-row LoRA (`y + delta`) and IA3 (`y * scale`)
    (exporter/weights.py): the first input of each Add and Mul, up to a MatMul; None otherwise."""
    node = value.producer()
    while node is not None and node.op_type in ("Add", "Mul") and node.domain == "":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node if node is not None and node.op_type == "MatMul" and node.domain == "" else None


def _pack_bases(graph: ir.Graph, values: list[ir.Value]) -> bool:
    """Where q, k and v are LoRA/IA3-adapted projections of one activation, their three weight
    MatMuls become one over the concatenated weights and a Split (the same packed GEMM as the export
    without --lora, so a row without an adapter computes the same bits). Returns whether it did."""
    nodes = [_base_matmul(v) for v in values]
    if not all(n is not None for n in nodes) or len({id(n) for n in nodes}) < 3:
        return False
    activation = nodes[0].inputs[0]
    weights = [n.inputs[1].const_value for n in nodes]
    if any(n.inputs[0] is not activation for n in nodes) or any(w is None or len(w.shape) != 2 for w in weights):
        return False
    order = {id(n): i for i, n in enumerate(graph)}
    first = min(nodes, key=lambda n: order[id(n)])
    name = f"{nodes[0].name}.qkv"
    weight = ir.Value(name=f"{name}.weight", const_value=ir.tensor(np.concatenate([w.numpy() for w in weights], 1)))
    sizes = ir.Value(name=f"{name}.sizes", const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)))
    graph.register_initializer(weight)
    graph.register_initializer(sizes)
    matmul = ir.Node("", "MatMul", [activation, weight], name=name)
    split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=3,
                    name=f"{name}.split")
    graph.insert_before(first, [matmul, split])
    for old, new in zip(nodes, split.outputs):
        new.shape, new.type = old.outputs[0].shape, old.outputs[0].type
        ir.convenience.replace_all_uses_with(old.outputs[0], new)
        graph.remove(old, safe=True)
    return True


def without_weight_adapters(path: Path, target: Path, names: set[str]) -> int:
    """Write to `target` the graph at `path` without its LoRA and IA3 inputs `names` (an export with
    --lora; docs/design.md, "LoRA and IA3"): each projection's `y + delta` becomes `y` and each
    `x * scale` becomes `x`, the nodes computing only from those inputs go, and q, k and v, split
    from one packed MatMul for their own deltas, feed attention packed again. What is left is the
    export without --lora, node for node, so it computes the same bits. Returns the joins removed."""
    model = ir.load(path)
    graph = model.graph
    derived = {v for v in graph.inputs if v.name in names}
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    for node in graph:  # the tracer may read the batch size off a table ([B, n, dim]): read it off input_ids
        if (node.op_type == "Shape" and node.inputs[0] in derived and node.attributes.get_int("start", 0) == 0
                and node.attributes.get_int("end", 0) == 1):
            node.replace_input_with(0, ids)
    joins = 0
    for node in list(graph):  # in graph order: a node's inputs are known before it
        inputs = [v for v in node.inputs if v is not None]
        adapted = [v for v in inputs if v in derived]
        if not adapted:
            continue
        plain = [v for v in inputs if v not in derived]
        if node.op_type in ("Add", "Mul") and node.domain == "" and len(plain) == len(adapted) == 1:
            ir.convenience.replace_all_uses_with(node.outputs[0], plain[0])  # y + delta -> y; x * scale -> x
            joins += 1
        else:  # the deltas (x @ A^T @ B) and the shapes computed from the tables
            derived.update(node.outputs)
    graph.inputs[:] = [v for v in graph.inputs if v.name not in names]
    for node in graph:  # GroupQueryAttention(Split(qkv)) -> GroupQueryAttention(qkv), as without --lora
        split = node.inputs[0].producer() if node.op_type == "GroupQueryAttention" and node.inputs[0] else None
        if split is not None and split.op_type == "Split" and list(node.inputs[:3]) == list(split.outputs):
            for index, value in enumerate((split.inputs[0], None, None)):
                node.replace_input_with(index, value)
    common_passes.RemoveUnusedNodesPass()(model)
    left = [node.name for node in graph if any(v in derived for v in node.inputs if v is not None)]
    if left or any(v in derived for v in graph.outputs):
        raise ValueError(f"the graph uses LoRA/IA3 inputs other than through `y + delta` and `x * scale` "
                         f"(nodes {', '.join(left[:3]) or 'none'}); no plain graph can be cut from it")
    ir.save(model, target)
    return joins


def _fused_counts(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in model.graph if node.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def quantize(path: Path, kind: str, *, block_size: int = QUANT_BLOCK_SIZE, algorithm: str = "rtn") -> int:
    """Weight-only quantisation of the constant-weight MatMuls into MatMulNBits, activations kept
    in float; returns how many MatMuls were quantised. Algorithms (measured side by side in
    docs/export.md, "Quantisation"): "rtn", round-to-nearest, symmetric, per-block scales (int8's
    choice); "blocks", the weights' own Q4_1/Q8_0 blocks, exact for the default model
    (`blocks.py`; int4's choice; each weight keeps the bits of its blocks, whatever `kind`).
    Int8 dot products (accuracy_level 4), the tied lm_head included. MatMuls sharing an input are
    packed first (see `pack_matmuls`)."""
    import onnx

    if algorithm not in ("rtn", "blocks"):
        raise ValueError(f"unknown quantisation algorithm {algorithm!r} (rtn, blocks)")
    graph_ir = ir.load(path)
    pack_matmuls(graph_ir.graph)
    untie_transposed_weights(graph_ir.graph)
    if algorithm == "blocks":
        four, eight = blocks.quantize(graph_ir.graph, ACCURACY_LEVEL)
        graph_ir.opset_imports.setdefault("com.microsoft", 1)
        ir.save(graph_ir, path)
        return four + eight
    model = ir.to_proto(graph_ir)  # the quantiser takes a ModelProto: converted in memory, not re-read
    quantizer = _quantizer_class()(model, bits=QUANTIZATIONS[kind], block_size=block_size, is_symmetric=True,
                                   accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    out = quantizer.model.model
    onnx.save(out, str(path))
    return sum(node.op_type == "MatMulNBits" for node in out.graph.node)


def pack_matmuls(graph: ir.Graph) -> int:
    """MatMuls that read one activation with constant weights (q/k/v; gate/up) become one MatMul
    over the concatenated weights and a Split; returns how many were packed. Measured: no gain in
    float32, 8-14% faster decode in int4 (MatMulNBits at accuracy level 4 quantises its
    activation once per call), so the quantiser packs and plain float graphs stay unpacked."""
    groups: dict[ir.Value, list[ir.Node]] = collections.defaultdict(list)
    for node in graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
        if weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
            groups[node.inputs[0]].append(node)
    packed = 0
    for activation, nodes in groups.items():
        if len(nodes) < 2:
            continue
        arrays = [n.inputs[1].const_value.numpy() for n in nodes]
        name = nodes[0].name
        weight = ir.Value(name=f"{name}.packed_weight", const_value=ir.tensor(np.concatenate(arrays, axis=1)))
        widths = np.array([a.shape[1] for a in arrays], np.int64)
        sizes = ir.Value(name=f"{name}.packed_sizes", const_value=ir.tensor(widths))
        graph.register_initializer(weight)
        graph.register_initializer(sizes)
        matmul = ir.Node("", "MatMul", [activation, weight], name=f"{name}.packed")
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                        num_outputs=len(nodes), name=f"{name}.split")
        graph.insert_before(nodes[0], [matmul, split])  # before the first reader of `activation`'s group
        for node, out in zip(nodes, split.outputs):
            ir.convenience.replace_all_uses_with(node.outputs[0], out)
        graph.remove(nodes, safe=True)
        packed += len(nodes)
    return packed


def _quantizer_class():
    """ONNX Runtime's MatMulNBitsQuantizer, imported without the root-logger set-up its module
    does on import (logging.basicConfig at INFO would make every library in the process chatty)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def untie_transposed_weights(graph: ir.Graph) -> None:
    """MatMul(x, Transpose(W)) with W an initializer (a tied lm_head: W is also the embedding
    table) gets its own transposed initializer, so the quantiser can take it. The embedding
    Gather keeps reading the float table, a few rows per step."""
    for node in list(graph):
        transpose = node.inputs[1].producer() if node.op_type == "MatMul" and node.inputs[1] is not None else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0].const_value is None:
            continue
        weight = transpose.inputs[0].const_value.numpy()
        perm = transpose.attributes.get_ints("perm", None)
        if weight.ndim != 2 or perm not in (None, (1, 0)):
            continue
        untied = ir.Value(name=f"{transpose.inputs[0].name}.T", const_value=ir.tensor(np.ascontiguousarray(weight.T)))
        graph.register_initializer(untied)
        node.replace_input_with(1, untied)
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
