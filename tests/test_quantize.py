"""Weight-only int8 / int4 graphs of the real default model: agreement with the float graph, size,
and adapters still running on them; the export option's wiring on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from prefixport import manifest as mf
from prefixport.adapters import convert_checkpoint
from prefixport.cli import main
from prefixport.runtime import Engine
from prefixport.runtime.agreement import PROMPTS, agreement

DEMO = Path(__file__).resolve().parents[1] / "demo"
sys.path.insert(0, str(DEMO))
import tasks  # noqa: E402

# Teacher-forced top-1 agreement with the float graph over the 4 fixed prompts x 32 greedy tokens.
# Measured 94.5% (int8) and 66.4% (int4): round-to-nearest int4 of a 135M model that was already
# 4-bit in its GGUF loses a third of the greedy tokens; docs/export.md, "Quantisation".
MIN_TOP1 = {"int8": 0.90, "int4": 0.55}
MAX_SIZE = {"int8": 0.55, "int4": 0.45}  # model.onnx size relative to float32


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, default_quantized):
    return request.param, *default_quantized(request.param)


@pytest.mark.slow
def test_quantized_graph_agrees_with_float(quantized, default_export):
    kind, folder, matmuls = quantized
    assert matmuls == 30 * 4 + 1, "q|k|v, o, gate|up, down of the 30 layers (packed) and the tied lm_head"
    ops = {n.op_type for n in onnx.load(str(folder / mf.MODEL_NAME), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    size = (folder / mf.MODEL_NAME).stat().st_size / (default_export / mf.MODEL_NAME).stat().st_size
    assert size < MAX_SIZE[kind]
    reference, candidate = Engine.load(default_export), Engine.load(folder)
    prompts = [reference.encode(p, chat=True) for p in PROMPTS]
    result = agreement(reference.backend, candidate.backend, prompts, 32, 576, np.dtype("float32"))
    assert result.top1 >= MIN_TOP1[kind], result.summary()


@pytest.mark.slow
def test_adapters_run_on_quantized_graph(quantized, tmp_path):
    """The float export's bundles fit (same fingerprint). int8 keeps the prefix adapter's task
    (85% on all 40 held-out dates, as float); int4 does not (2.5%: docs/export.md, "Quantisation"), so
    for int4 only that the adapter is applied (it changes the output) is checked."""
    kind, folder, _ = quantized
    engine = Engine.load(folder)
    _, path = convert_checkpoint(DEMO / "adapters" / "date-prefix", folder, out=tmp_path / "date.safetensors")
    engine.add_adapter("date", path)
    _, test = tasks.split("date")
    outputs = [engine.generate(ex["prompt"], adapter="date", max_new_tokens=12).text for ex in test[:8]]
    if kind == "int8":
        right = sum(tasks.correct("date", out, ex["target"]) for out, ex in zip(outputs, test))
        assert right >= 6, f"{right}/8 held-out dates right with int8 weights"
    else:
        base = [engine.generate(ex["prompt"], max_new_tokens=12).text for ex in test[:8]]
        assert sum(a != b for a, b in zip(outputs, base)) >= 6


def test_export_quantize_option_records_agreement(tiny_model, tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["export", str(out), "--model", str(tiny_model("llama")), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8 weights vs float: top-1 agreement" in result.output
    m = json.loads((out / mf.MANIFEST_NAME).read_text())
    q = m["quantization"]
    assert (q["method"], q["bits"], q["block_size"], q["symmetric"]) == ("MatMulNBits", 8, 32, True)
    a = q["agreement_with_float"]
    assert a["prompts"] == len(PROMPTS) and a["tokens"] == 32 and 0.0 <= a["top1"] <= 1.0
    assert m["fused_ops"]["GroupQueryAttention"] == 2
    Engine.load(out).generate("hello", max_new_tokens=4)


def test_quantize_refuses_float16_and_unknown_kinds(tiny_model, tmp_path):
    for args, message in ((["--quantize", "int8", "--dtype", "float16"], "starts from float32"),
                          (["--quantize", "int3"], "int3")):
        result = CliRunner().invoke(main, ["export", str(tmp_path / "x"), "--model", str(tiny_model("llama")), *args])
        assert result.exit_code != 0 and message in result.output
        assert not (tmp_path / "x").exists()
