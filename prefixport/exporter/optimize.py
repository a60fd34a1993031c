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

QUANTIZATIONS = {"int8": 8, "int4": 4}
QUANT_BLOCK_SIZE = 32


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
    ir.save(model, path)
    return _fused_counts(model)


def _fused_counts(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in model.graph if node.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def quantize(path: Path, kind: str, *, block_size: int = QUANT_BLOCK_SIZE, accuracy_level: int = 4,
             lm_head: bool = True, algorithm: str = "rtn") -> int:
    """Weight-only quantisation of the constant-weight MatMuls into MatMulNBits, activations kept
    in float; returns how many MatMuls were quantised. The exporter's choice (measured in
    benchmarks/quant_variants.py): round-to-nearest ("rtn"), symmetric, per-block scales, int8
    dot products (accuracy_level 4), the tied lm_head included. "asym" and "hqq" (ONNX Runtime's
    HQQ) are the alternatives measured there. MatMuls sharing an input are packed first (see
    `pack_matmuls`)."""
    import onnx

    graph_ir = ir.load(path)
    pack_matmuls(graph_ir.graph)
    if lm_head:
        _untie_transposed_weights(graph_ir.graph)
    model = ir.to_proto(graph_ir)  # the quantiser takes a ModelProto: converted in memory, not re-read
    quantizer_class = _quantizer_class()
    if algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=QUANTIZATIONS[kind])
        quantizer = quantizer_class(model, algo_config=config)
    else:
        quantizer = quantizer_class(model, bits=QUANTIZATIONS[kind], block_size=block_size,
                                    is_symmetric=algorithm == "rtn", accuracy_level=accuracy_level)
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


def _untie_transposed_weights(graph: ir.Graph) -> None:
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
