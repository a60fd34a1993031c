"""Export and run tiny random models of every supported architecture; compare with transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixport import manifest as mf
from prefixport.runtime import Engine
from prefixport.runtime.generation import prefill_new

from .helpers import hf_greedy, hf_last_logits, runtime_greedy_batch, runtime_logits
from .tiny_models import ARCHITECTURES

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Grüße aus München! 東京"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request, tiny_model, tiny_export):
    arch = request.param
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch)).eval()
    engine = Engine.load(tiny_export(arch))
    yield arch, model, engine
    engine.close()


def test_graph_contract(case):
    arch, model, engine = case
    m = engine.manifest
    graph = onnx.load(str(engine.folder / mf.MODEL_NAME), load_external_data=False).graph
    shapes = {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
              for v in list(graph.input) + list(graph.output)}
    F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [v.name for v in graph.input] == mf.input_names(m.num_layers)
    assert [v.name for v in graph.output] == mf.output_names(m.num_layers)
    assert shapes["input_ids"] == (I, ["batch", "seq"])
    assert shapes["prompt_embeds"] == (F, ["batch", "n_virtual", m.hidden_size])
    assert shapes["past_lengths"] == (I, ["batch"])
    assert shapes["input_lengths"] == (I, ["batch"])
    assert shapes["logits_index"] == (I, ["batch", "scored"])
    assert m.format_version == mf.FORMAT_VERSION == 4 and m.cache == "shared"
    for i in range(m.num_layers):
        assert shapes[mf.past_key_name(i)] == (F, ["batch", m.num_kv_heads, "capacity", m.head_dim])
        assert shapes[mf.past_value_name(i)] == (F, ["batch", m.num_kv_heads, "capacity", m.head_dim])
        key = shapes[mf.present_key_name(i)]
        assert key[0] == F and key[1][1] == m.num_kv_heads and key[1][3] == m.head_dim
        assert all(isinstance(d, str) for d in (key[1][0], key[1][2])), "present axes must be symbolic"
    assert shapes["logits"][1][2] == m.vocab_size


SHAPES = [(1, 0, 4, 0), (3, 0, 1, 5), (2, 3, 5, 7), (1, 2, 0, 0), (4, 1, 2, 3), (1, 0, 1, 1)]


@pytest.mark.parametrize("batch,virtual,seq,past", SHAPES)
def test_runs_at_many_shapes(case, batch, virtual, seq, past):
    """Every axis is really dynamic, zeros included (the tracer baked none of the sample sizes)."""
    _, _, engine = case
    if engine.manifest.fused_ops and batch > 1 and past and virtual + seq > 1:
        # ONNX Runtime's GroupQueryAttention refuses this one shape; the runtime prefills rows with
        # a past (a prefix adapter) one at a time, so it never feeds it. Each row alone runs.
        run_shape(engine, 1, virtual, seq, past)
        with pytest.raises(RuntimeError, match="batch_size must be 1"):
            run_shape(engine, batch, virtual, seq, past)
        return
    run_shape(engine, batch, virtual, seq, past)


def run_shape(engine: Engine, batch: int, virtual: int, seq: int, past: int) -> None:
    m = engine.manifest
    rng = np.random.default_rng(0)
    capacity = past + virtual + seq + 3
    inputs = {
        "input_ids": rng.integers(0, m.vocab_size, (batch, seq)),
        "prompt_embeds": rng.standard_normal((batch, virtual, m.hidden_size)).astype(np.float32),
        "past_lengths": np.full(batch, past, np.int64),
        "input_lengths": np.full(batch, virtual + seq, np.int64),
        "logits_index": np.tile(np.arange(virtual + seq), (batch, 1)),  # every position
    }
    pasts = [rng.standard_normal((batch, m.num_kv_heads, capacity, m.head_dim)).astype(np.float32)
             for _ in range(2 * m.num_layers)]
    presents = pasts if m.cache == "shared" else [np.zeros_like(p) for p in pasts]
    before = [p.copy() for p in pasts]
    logits = engine.backend.run(inputs, pasts, presents)
    assert logits.shape == (batch, virtual + seq, m.vocab_size) and np.isfinite(logits).all()
    for old, new in zip(before, presents):  # the past kept, this call's positions written after it
        np.testing.assert_array_equal(new[:, :, :past], old[:, :, :past])
        if virtual + seq:
            assert not np.array_equal(new[:, :, past : past + virtual + seq], old[:, :, past : past + virtual + seq])


def test_logits_match_transformers_at_prefill_and_decode(case):
    _, model, engine = case
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        np.testing.assert_allclose(runtime_logits(engine, [ids])[0], hf_last_logits(model, ids), atol=1e-4)
        ref = hf_last_logits(model, ids + [7])
        np.testing.assert_allclose(runtime_logits(engine, [ids], decode=[7])[0], ref, atol=1e-4)


def test_greedy_tokens_match_transformers_generate(case):
    """40 tokens: far past the sliding windows (8) of the Mistral and Gemma 3 configs."""
    _, model, engine = case
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        ours = engine.generate(ids, max_new_tokens=40, stop_token_ids=[]).token_ids
        assert ours == hf_greedy(model, ids, 40, stop_at_eos=False)


def test_padded_batch_rows_equal_rows_alone(case):
    """Right padding inside a batch changes nothing: each row gives, bitwise, what it gives alone
    (rows of different lengths prefilled in one run, then decoded together; windows included)."""
    _, _, engine = case
    rows = [engine.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1
    soft = np.random.default_rng(1).standard_normal((1, 3, engine.manifest.hidden_size)).astype(np.float32)
    for embeds in (None, soft):
        batch_embeds = None if embeds is None else np.repeat(embeds, len(rows), axis=0)
        batched = runtime_greedy_batch(engine, rows, 12, batch_embeds)
        alone = [runtime_greedy_batch(engine, [r], 12, embeds)[0] for r in rows]
        assert batched == alone
        np.testing.assert_array_equal(runtime_logits(engine, rows, soft=batch_embeds),
                                      np.concatenate([runtime_logits(engine, [r], soft=embeds) for r in rows]))


def test_soft_prompt_matches_transformers_inputs_embeds(case):
    """A soft prompt fed at run time equals transformers given the same embeddings prepended."""
    _, model, engine = case
    ids = engine.encode(PROMPTS[0])
    soft = (np.random.default_rng(2).standard_normal((1, 4, engine.manifest.hidden_size)) * 0.5).astype(np.float32)
    with torch.no_grad():
        embeds = torch.cat([torch.from_numpy(soft), model.get_input_embeddings()(torch.tensor([ids]))], dim=1)
        ref = model(inputs_embeds=embeds).logits[0, -1].numpy()
    np.testing.assert_allclose(runtime_logits(engine, [ids], soft=soft)[0], ref, atol=1e-4)


@pytest.fixture(scope="module")
def plain_export(tiny_model, tmp_path_factory):
    """`--no-optimize`: plain ONNX ops only."""
    from prefixport.exporter import export_model

    out = tmp_path_factory.mktemp("plain") / "llama"
    export_model(out, model=str(tiny_model("llama")), optimize=False)
    return out


def test_unoptimized_export_is_plain_onnx_and_takes_every_shape(plain_export):
    graph = onnx.load(str(plain_export / mf.MODEL_NAME)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, "no ONNX Runtime contrib ops"
    engine = Engine.load(plain_export)
    assert engine.manifest.fused_ops == {} and engine.manifest.cache == "copy"
    for shape in SHAPES:  # batch > 1 with past and several new positions included
        run_shape(engine, *shape)


def test_every_position_logits_match_transformers(case, plain_export, tiny_model):
    """`logits_index` over every position (scoring) gives transformers' logits at each, fused
    graph and plain graph alike; the last one equals the generation path's."""
    arch, model, engine = case
    engines = [engine] + ([Engine.load(plain_export)] if arch == "llama" else [])
    for candidate in engines:
        m = candidate.manifest
        ids = candidate.encode(PROMPTS[1])
        last, _ = prefill_new(candidate.backend, [ids])
        logits, _ = prefill_new(candidate.backend, [ids], every=True)
        np.testing.assert_array_equal(last[0], logits[0, -1])
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits.numpy()
        assert logits.shape == ref.shape == (1, len(ids), m.vocab_size)
        np.testing.assert_allclose(logits, ref, atol=1e-4)
