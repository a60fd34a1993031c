"""`--dtype float16`: a half-precision graph, verified against PyTorch in float16."""

from __future__ import annotations

import numpy as np
import onnx

from prefixport.exporter import export_model
from prefixport.runtime import Engine


def test_float16_export(tmp_path, tiny_model, tiny_export):
    report = export_model(tmp_path / "e16", model=str(tiny_model("llama")), dtype="float16")
    assert report.manifest.dtype == "float16" and report.tolerance == 5e-2
    assert all(c.logits_max_abs_diff <= 5e-2 for c in report.verification)
    graph = onnx.load(str(tmp_path / "e16" / "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert types["prompt_embeds"] == types["past_key_values.0.key"] == types["logits"] == onnx.TensorProto.FLOAT16
    e16, e32 = Engine.load(tmp_path / "e16"), Engine.load(tiny_export("llama"))
    assert e16.manifest.fingerprint == e32.manifest.fingerprint  # the same base model
    half = e16.generate("The quick brown fox", max_new_tokens=16, stop_token_ids=[])
    full = e32.generate("The quick brown fox", max_new_tokens=16, stop_token_ids=[])
    assert np.mean(np.array(half.token_ids) == np.array(full.token_ids)) >= 0.75
