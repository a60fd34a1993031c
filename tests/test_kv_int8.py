"""The 8-bit KV cache (`export --kv-cache-dtype int8`, docs/design.md "The KV cache"): the export's
graph and manifest, a quarter of the bytes per slot, generation (greedy, batched, a prefix adapter,
prompt cache hits) against the float cache of the same tiny model, and what is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from prefixport import manifest as mf
from prefixport.errors import ExportError, ExportFolderError, InputError

# The tiny models are random: their logits are nearly flat, so any rounding flips near-ties more
# often than on a trained model (the default model: docs/export.md, "KV cache"). Measured on the
# tiny Llama: 94.5% plain, through the prefix and prompt adapters above this; held to:
TINY_AGREEMENT = 0.85
PROMPTS = ["the cat sat on the mat", "def add(a, b):", "hello world, hello again", "a b c d e f g"]


@pytest.fixture(scope="module")
def int8(tiny_model, tiny_adapters, tmp_path_factory):
    """The tiny Llama exported with an int8 KV cache, its scales covering a prefix and a soft
    prompt adapter and its agreement checked through them: the ExportReport."""
    from prefixport.exporter import export_model

    adapters = tiny_adapters("llama")
    out = tmp_path_factory.mktemp("kv-int8") / "export"
    return export_model(out, model=str(tiny_model("llama")), kv_cache_dtype="int8",
                        check_adapters=[adapters / "prefix.safetensors", adapters / "prompt.safetensors"])


@pytest.fixture(scope="module")
def engines(int8, tiny_export, tiny_adapters):
    """(int8 Engine, float Engine) of the same tiny model, the prefix and prompt adapters on both."""
    from prefixport.runtime import Engine

    quantized, reference = Engine.load(int8.folder), Engine.load(tiny_export("llama"))
    for engine in (quantized, reference):
        for name in ("prefix", "prompt"):
            engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield quantized, reference
    quantized.close()
    reference.close()


def test_the_manifest_and_graph_hold_an_int8_cache(int8, tiny_export):
    import onnx

    m = int8.manifest
    assert m.kv_dtype == "int8" and m.kv_quantized and m.dtype == "float32"
    assert m.format_version == mf.FORMAT_VERSION  # float exports are unchanged: same contract version
    assert mf.Manifest.load(tiny_export("llama")).kv_dtype == "float32"
    record = m.kv_quantization
    assert record["quant_type"] == "PER_CHANNEL" and record["scales"] == mf.KV_SCALES_NAME
    assert record["calibration"]["rotary_pairs"] == "half" and record["calibration"]["tokens"] > 500
    assert record["calibration"]["adapters_covered"] == ["prefix", "prompt"]
    assert record["agreement_with_float_cache"]["top1"] >= TINY_AGREEMENT
    assert set(record["adapter_agreement_with_float_cache"]) == {"prefix", "prompt"}
    assert record["prefix_values_clipped"] == {"prefix": 0.0}  # the scales cover the adapters checked
    assert int8.kv_agreement is not None and set(int8.kv_adapter_agreement) == {"prefix", "prompt"}
    assert json.loads((int8.folder / mf.MANIFEST_NAME).read_text())["kv_dtype"] == "int8"

    from prefixport.runtime.kv_scales import KVScales

    scales = KVScales.load(int8.folder, m)
    assert scales is not None and len(scales.scales) == 2 * m.num_layers
    graph = onnx.load(str(int8.folder / mf.MODEL_NAME)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    for name in [*mf.past_names(m.num_layers), *m.outputs[1:]]:
        assert types[name] == onnx.TensorProto.INT8, name
    assert types["logits"] == types["prompt_embeds"] == onnx.TensorProto.FLOAT
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == m.num_layers
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["kv_cache_bit_width"] == 8
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL"
        layer = mf.past_names(m.num_layers).index(node.input[3])
        for i, t in ((12, layer), (13, layer + 1)):  # k_scale, v_scale: the scales file's
            scale = initializers[node.input[i]]
            assert scale.shape == (1, m.num_kv_heads, 1, m.head_dim)
            np.testing.assert_array_equal(scale.reshape(m.num_kv_heads, 1, m.head_dim), scales.scales[t])


def test_a_slot_takes_a_quarter_of_the_float_bytes(engines):
    from prefixport.runtime.kv_cache import row_bytes, slot_bytes

    quantized, reference = engines
    m = quantized.manifest
    assert slot_bytes(m) * 4 == slot_bytes(reference.manifest) == 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    assert row_bytes(m, 100) * 4 == row_bytes(reference.manifest, 100)
    quantized.generate(PROMPTS[0], max_new_tokens=4)
    stats = quantized.stats().kv_cache
    assert stats.bytes > 0 and all(c.slot_bytes == slot_bytes(m) for c in stats.caches)
    assert all(c.bytes == c.rows * c.capacity * slot_bytes(m) for c in stats.caches)
    cache = quantized.new_cache()
    cache.reserve(2, 8)
    assert all(b.dtype == np.int8 for b in cache.buffers) and sum(b.nbytes for b in cache.buffers) == cache.nbytes


def test_int8_greedy_agrees_with_the_float_cache(engines):
    from prefixport.runtime.agreement import agreement

    quantized, reference = engines
    m = quantized.manifest
    prompts = [quantized.encode(p, chat=True) for p in PROMPTS]
    result = agreement(reference.backend, quantized.backend, prompts, 24, m.hidden_size, np.dtype(m.dtype))
    assert result.top1 >= TINY_AGREEMENT, result.summary()


def test_a_batch_gives_each_row_what_it_gives_alone(engines):
    quantized, _ = engines
    alone = [quantized.generate(p, max_new_tokens=12, stop_token_ids=[]).token_ids for p in PROMPTS]
    batch = quantized.generate_batch(PROMPTS, adapters=[None, "prefix", None, "prompt"], max_new_tokens=12,
                                     stop_token_ids=[])
    assert batch[0].token_ids == alone[0] and batch[2].token_ids == alone[2]
    assert batch[1].token_ids == quantized.generate(PROMPTS[1], adapter="prefix", max_new_tokens=12,
                                                    stop_token_ids=[]).token_ids


def test_a_prefix_is_quantised_once_with_the_graphs_scales(engines, tiny_adapters):
    from prefixport.adapters.bundle import load_bundle
    from prefixport.runtime.agreement import adapter_agreement

    quantized, reference = engines
    m = quantized.manifest
    feed = quantized.store.acquire("prefix")
    bundle = load_bundle(tiny_adapters("llama") / "prefix.safetensors", m)
    want = quantized.kv_scales.quantize([t[None] for t in bundle.prefix(m.num_layers)])
    assert all(p.dtype == np.int8 for p in feed.past)
    for got, expected in zip(feed.past, want):
        np.testing.assert_array_equal(got, expected)
    assert quantized.store.acquire("prefix") is feed  # held quantised: not redone per request
    assert quantized.store.stats().adapters["prefix"].bytes == sum(t.size for t in bundle.tensors.values())
    for name in ("prefix", "prompt"):
        result = adapter_agreement(reference, quantized, name, PROMPTS, 16)
        assert result.top1 >= TINY_AGREEMENT, (name, result.summary())


def test_a_prefix_beyond_the_scales_is_clipped_with_a_warning(engines, tiny_adapters, caplog):
    """An adapter the export's scales do not cover (registered later, far outside the model's range)."""
    import dataclasses
    import logging

    from prefixport.adapters.bundle import load_bundle

    quantized, _ = engines
    bundle = load_bundle(tiny_adapters("llama") / "prefix.safetensors", quantized.manifest)
    loud = dataclasses.replace(bundle, tensors={k: v * 1000 for k, v in bundle.tensors.items()})
    with caplog.at_level(logging.WARNING, logger="prefixport.runtime.store"):
        quantized.add_adapter("loud", bundle=loud)
    try:
        assert "beyond the int8 KV cache's range" in caplog.text and "loud" in caplog.text
        feed = quantized.store.acquire("loud")
        assert all(p.dtype == np.int8 and np.abs(p.astype(np.int32)).max() >= 127 for p in feed.past)
        assert quantized.generate(PROMPTS[0], adapter="loud", max_new_tokens=3).token_ids
    finally:
        quantized.remove_adapter("loud")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefixport.runtime.store"):
        quantized.add_adapter("prefix-again", tiny_adapters("llama") / "prefix.safetensors")
    quantized.remove_adapter("prefix-again")
    assert "beyond" not in caplog.text  # covered at export


def test_the_runtime_rounds_as_the_kernel_does(engines):
    """The graph's own int8 keys and values against KVScales.quantize of the float graph's: the
    same rounding, so a prefix written by the runtime sits in the cache as the kernel would write it."""
    from prefixport.runtime.generation import prefill_new

    quantized, reference = engines
    ids = quantized.encode(PROMPTS[2], chat=True)
    _, q_cache = prefill_new(quantized.backend, [ids], extra=0)
    _, f_cache = prefill_new(reference.backend, [ids], extra=0)
    layer0 = 2  # the first layer's keys and values are computed from the same float inputs in both graphs
    got = q_cache.read(0)[:layer0]
    want = quantized.kv_scales.quantize(f_cache.read(0))[:layer0]
    for g, w in zip(got, want):
        assert g.dtype == np.int8
        diff = np.abs(g.astype(np.int32) - w.astype(np.int32))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_prompt_cache_blocks_are_int8_and_hits_give_the_same_tokens(engines):
    from prefixport.runtime.kv_cache import slot_bytes

    quantized, _ = engines
    prompt = " ".join(["the cat sat on the mat and looked at the dog"] * 4)  # about 110 tokens: 3 blocks
    for adapter in (None, "prefix"):
        first = quantized.generate(prompt, adapter=adapter, max_new_tokens=8, stop_token_ids=[], cache_salt="kv8")
        again = quantized.generate(prompt, adapter=adapter, max_new_tokens=8, stop_token_ids=[], cache_salt="kv8")
        assert first.cached_tokens == 0 and again.cached_tokens >= 32, adapter
        assert again.token_ids == first.token_ids, adapter
    block_bytes = quantized.prompt_cache.block_tokens * slot_bytes(quantized.manifest)  # a quarter of float32's
    assert quantized.prompt_cache.stats().by_adapter[""] % block_bytes == 0
    hit = quantized.prompt_cache.lookup(quantized.encode(prompt), None, "kv8")
    try:
        assert hit.blocks and all(b.kv.dtype == np.int8 and b.nbytes == block_bytes == b.kv.nbytes for b in hit.blocks)
    finally:
        quantized.prompt_cache.release(hit)


def test_a_baked_prefix_requantises_exactly(engines, tiny_adapters):
    from prefixport.adapters.bundle import load_bundle

    quantized, _ = engines
    bundle = load_bundle(tiny_adapters("llama") / "prompt.safetensors", quantized.manifest)
    baked = quantized.bake_prefix(bundle)
    assert baked.kind == "prefix" and all(t.dtype == np.float32 for t in baked.tensors.values())
    quantized.add_adapter("baked", bundle=baked)
    try:
        feed = quantized.store.acquire("baked")
        from prefixport.runtime.generation import prefill_new

        _, cache = prefill_new(quantized.backend, [[]], quantized.store.acquire("prompt").prompt_embeds, extra=0)
        for got, want in zip(feed.past, cache.read(0)):
            np.testing.assert_array_equal(got[0], want)
    finally:
        quantized.remove_adapter("baked")


def test_an_int8_export_without_its_scales_is_refused(int8, tmp_path):
    from prefixport.runtime import Engine

    folder = tmp_path / "export"
    shutil.copytree(int8.folder, folder)
    (folder / mf.KV_SCALES_NAME).unlink()
    with pytest.raises(ExportFolderError, match="kv_scales.safetensors"):
        Engine.load(folder)


def test_manifests_before_the_int8_cache_read_as_float_and_unknown_dtypes_are_refused(tiny_export, tmp_path):
    data = json.loads((tiny_export("llama") / mf.MANIFEST_NAME).read_text())
    data.pop("kv_dtype", None)
    data.pop("kv_quantization", None)
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(data))
    assert mf.Manifest.load(tmp_path).kv_dtype == data["dtype"]
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps({**data, "kv_dtype": "int4"}))
    with pytest.raises(ExportFolderError, match="KV cache of dtype 'int4'"):
        mf.Manifest.load(tmp_path)


def test_a_draft_with_another_kv_cache_is_refused(int8, tiny_export):
    from prefixport.runtime.speculative import check_draft

    target, draft = mf.Manifest.load(int8.folder), mf.Manifest.load(tiny_export("llama"))
    with pytest.raises(InputError, match="--kv-cache-dtype int8"):
        check_draft(int8.folder, target, tiny_export("llama"), draft)


@pytest.mark.parametrize("options,message", [
    ({"optimize": False}, "--no-optimize"),
    ({"dtype": "float16"}, "float16"),
    ({"kv_cache_dtype": "int4"}, "not supported"),
])
def test_what_an_int8_cache_cannot_go_with_is_refused_before_loading(tmp_path, options, message):
    from prefixport.exporter import export_model

    options = {"kv_cache_dtype": "int8", **options}
    with pytest.raises(ExportError, match=message):
        export_model(tmp_path / "out", model="no-such-model", **options)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_int8_with_no_optimize(tmp_path):
    from click.testing import CliRunner

    from prefixport.cli import main

    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "--no-optimize", "--kv-cache-dtype", "int8"])
    assert result.exit_code == 1 and "--no-optimize" in result.output and "int8" in result.output
