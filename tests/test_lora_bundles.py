"""PEFT LoRA and IA3 checkpoints -> lora and ia3 bundles: real PEFT checkpoints of the tiny Llama and
GPT-2, converted against a manifest that takes LoRA and IA3 (the tiny export's, with the
`weight_adapters` an export made with --lora records), compared with what PEFT saved and computes;
and every checkpoint prefixport refuses, with its message."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import MontecloraConfig, VeloraConfig
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from prefixport import manifest as mf
from prefixport.adapters import convert, convert_checkpoint, load_bundle, save_bundle
from prefixport.adapters.bundle import check_bundle, check_fits, make_bundle
from prefixport.adapters.lora import VARIANTS
from prefixport.cli import main
from prefixport.errors import AdapterError

PEFT_PREFIX = "base_model.model."
LAYERS_PATH = {"llama": "model.layers", "gpt2": "transformer.h"}
# PEFT's default IA3 targets and sides (peft.utils.constants, IA3 target and feedforward modules)
IA3_SIDES = {"llama": {"self_attn.k_proj": "output", "self_attn.v_proj": "output", "mlp.down_proj": "input"},
             "gpt2": {"attn.c_attn": "output", "mlp.c_proj": "input"}}


def module_shapes(model, arch: str) -> dict[str, list[int]]:
    """[in, out] features of every linear module (nn.Linear, GPT-2's Conv1D) in decoder layer 0."""
    layer = model.get_submodule(f"{LAYERS_PATH[arch]}.0")
    shapes = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = [module.in_features, module.out_features]
        elif isinstance(module, Conv1D):
            shapes[name] = [module.nx, module.nf]
    return shapes


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_export):
    """arch -> (tiny model folder, its export's manifest as an export made with --lora records it)."""
    built: dict[str, tuple[Path, mf.Manifest]] = {}

    def get(arch: str) -> tuple[Path, mf.Manifest]:
        if arch not in built:
            folder = tiny_model(arch)
            shapes = module_shapes(AutoModelForCausalLM.from_pretrained(folder), arch)
            weights = {"max_rank": 16, "shapes": shapes, "lora": sorted(shapes), "ia3": IA3_SIDES[arch],
                       "layers_path": LAYERS_PATH[arch]}
            built[arch] = folder, dataclasses.replace(mf.Manifest.load(tiny_export(arch)), weight_adapters=weights)
        return built[arch]

    return get


def with_weights(manifest: mf.Manifest, **changes) -> mf.Manifest:
    """`manifest` with some of its weight_adapters fields changed."""
    return dataclasses.replace(manifest, weight_adapters={**manifest.weight_adapters, **changes})


def save_peft(folder: Path, config, out: Path) -> Path:
    """A PEFT adapter of `config` on the model in `folder`, saved as PEFT saves it (A and B or the IA3
    vectors random, so that nothing is its initialisation)."""
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config).save_pretrained(out)
    return out


def saved(ckpt: Path) -> dict[str, np.ndarray]:
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def module_key(name: str, arch: str) -> tuple[int, str]:
    """(layer, path) of a PEFT model's module name."""
    layer, _, path = name.removeprefix(f"{PEFT_PREFIX}{LAYERS_PATH[arch]}.").partition(".")
    return int(layer), path


def check_against_peft(bundle, folder: Path, ckpt: Path, arch: str) -> None:
    """The bundle holds what PEFT saved, and computes what PEFT's loaded adapter computes: for every
    adapted module, PEFT's output minus the base module's equals s·B·A·x (lora), or the base module on
    x scaled (ia3: input or output as `feedforward` says); scalings are PEFT's own."""
    weights = saved(ckpt)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ckpt).eval()
    torch.manual_seed(1)
    seen = set()
    for name, module in model.named_modules():
        if not hasattr(module, "base_layer") or not (hasattr(module, "lora_A") or hasattr(module, "ia3_l")):
            continue
        layer, path = module_key(name, arch)
        seen.add((layer, path))
        x = torch.randn(3, module.in_features)
        with torch.no_grad():
            got, base = module(x).numpy(), module.base_layer(x).numpy()
        if bundle.kind == "lora":
            a, b = bundle.tensors[mf.lora_a_name(layer, path)], bundle.tensors[mf.lora_b_name(layer, path)]
            np.testing.assert_array_equal(a, weights[f"{name}.lora_A.weight"])
            np.testing.assert_array_equal(b, weights[f"{name}.lora_B.weight"])
            scaling = bundle.scalings[f"{layer}.{path}"]
            assert scaling == pytest.approx(module.scaling["default"], rel=1e-12)
            np.testing.assert_allclose(got - base, scaling * (x.numpy() @ a.T @ b.T), rtol=1e-4, atol=1e-5)
        else:
            v = bundle.tensors[mf.ia3_name(layer, path)]
            np.testing.assert_array_equal(v, weights[f"{name}.ia3_l"].reshape(-1))
            if path in bundle.feedforward:
                with torch.no_grad():
                    want = module.base_layer(x * torch.from_numpy(v)).numpy()
            else:
                want = base * v
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert seen == set(bundle.modules) and seen


LLAMA_ATTENTION = ["self_attn.q_proj", "self_attn.v_proj"]
LLAMA_ALL = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
             "self_attn.q_proj", "self_attn.v_proj"]
LORA_CASES = {  # name: (arch, config, targets, layers, scaling of every module or None: per pattern)
    "attention": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), LLAMA_ATTENTION, [0, 1], 2.0),
    "all-linear-rslora": ("llama", lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                                      init_lora_weights=False), LLAMA_ALL, [0, 1], 16 / math.sqrt(8)),
    "patterns": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2},
                                             alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\..*": 12},
                                             init_lora_weights=False),
                 ["mlp.down_proj", *LLAMA_ATTENTION], [0, 1], None),
    "layers-to-transform": ("llama", lambda: LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"],
                                                        layers_to_transform=[1], init_lora_weights=False),
                            ["mlp.down_proj", "self_attn.q_proj"], [1], 2.5),
    "gpt2-conv1d": ("gpt2", lambda: LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                               fan_in_fan_out=True, init_lora_weights=False),
                    ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], [0, 1], 1.0),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_converts_to_what_peft_saved_and_computes(setup, tmp_path, case):
    arch, config, targets, layers, scaling = LORA_CASES[case]
    folder, manifest = setup(arch)
    ckpt = save_peft(folder, config(), tmp_path / "peft")
    bundle = convert(ckpt, manifest, name=case)
    assert (bundle.kind, bundle.metadata["peft_type"], bundle.n_virtual) == ("lora", "LORA", 0)
    assert sorted({p for _, p in bundle.modules}) == targets == json.loads(bundle.metadata["target_modules"])
    assert sorted({layer for layer, _ in bundle.modules}) == layers
    assert bundle.rank == max(t.shape[0] for n, t in bundle.tensors.items() if n.endswith(".a"))
    if scaling is not None:
        assert list(bundle.scalings.values()) == [pytest.approx(scaling)] * len(bundle.modules)
    check_against_peft(bundle, folder, ckpt, arch)
    if case == "patterns":  # first matching key wins, in the file's order; the rank follows the pattern too
        assert bundle.rank == 8 and bundle.tensors["lora.1.self_attn.v_proj.a"].shape == (2, 64)
        assert bundle.scalings == {"0.mlp.down_proj": 3.0, "0.self_attn.q_proj": 1.0, "0.self_attn.v_proj": 0.75,
                                   "1.mlp.down_proj": 2.0, "1.self_attn.q_proj": 1.0, "1.self_attn.v_proj": 1.5}
    if case == "gpt2-conv1d":
        assert bundle.metadata["fan_in_fan_out"] == "true"
    path = save_bundle(bundle, tmp_path / "lora.safetensors")
    again = load_bundle(path, manifest)
    assert again.metadata == bundle.metadata and again.metadata["format_version"] == "3"
    assert again.tensors.keys() == bundle.tensors.keys()
    assert all(np.array_equal(again.tensors[n], t) for n, t in bundle.tensors.items())
    assert (again.rank, again.scalings, again.modules) == (bundle.rank, bundle.scalings, bundle.modules)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_converts_to_what_peft_saved_and_computes(setup, tmp_path, arch):
    folder, manifest = setup(arch)
    ckpt = save_peft(folder, IA3Config(init_ia3_weights=False), tmp_path / "peft")
    bundle = convert(ckpt, manifest, name="ia3")
    assert (bundle.kind, bundle.metadata["peft_type"], bundle.n_virtual, bundle.rank) == ("ia3", "IA3", 0, 0)
    assert bundle.feedforward == [p for p, side in IA3_SIDES[arch].items() if side == "input"]
    assert sorted({p for _, p in bundle.modules}) == sorted(IA3_SIDES[arch])
    assert all(t.ndim == 1 for t in bundle.tensors.values())
    check_against_peft(bundle, folder, ckpt, arch)
    again = load_bundle(save_bundle(bundle, tmp_path / "ia3.safetensors"), manifest)
    assert again.feedforward == bundle.feedforward and again.metadata == bundle.metadata
    assert all(np.array_equal(again.tensors[n], t) for n, t in bundle.tensors.items())


@pytest.mark.parametrize("variant", ["velora", "monteclora", "mica"])
def test_variants_that_only_change_training_or_init_convert_as_plain_lora(setup, tmp_path, variant):
    """VeLoRA and MonteCLoRA compute plain LoRA at inference (their extra tensors are training-only);
    MiCA only initialises A and B (from the base weight's SVD, which it leaves unchanged)."""
    folder, manifest = setup("llama")
    extra = {"velora": {"velora_config": VeloraConfig()}, "monteclora": {"monteclora_config": MontecloraConfig()},
             "mica": {"init_lora_weights": "mica"}}[variant]
    ckpt = save_peft(folder, LoraConfig(r=4, target_modules=["q_proj"], **extra), tmp_path / "peft")
    rng = np.random.default_rng(0)  # A or B is zero at init: as if trained, both random
    weights = {k: rng.standard_normal(t.shape).astype(t.dtype) if ".lora_" in k and k.endswith(".weight") else t
               for k, t in saved(ckpt).items()}
    save_file(weights, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert len(weights) > 4 if variant != "mica" else len(weights) == 4  # training-only tensors, skipped
    bundle = convert(ckpt, manifest)
    assert sorted(bundle.tensors) == ["lora.0.self_attn.q_proj.a", "lora.0.self_attn.q_proj.b",
                                      "lora.1.self_attn.q_proj.a", "lora.1.self_attn.q_proj.b"]
    check_against_peft(bundle, folder, ckpt, "llama")


@pytest.fixture(scope="module")
def plain_lora(setup, tmp_path_factory):
    """A LoRA of q_proj and v_proj (rank 4) of the tiny Llama, to break in the refusal tests."""
    folder, _ = setup("llama")
    return save_peft(folder, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                     tmp_path_factory.mktemp("lora") / "peft")


@pytest.fixture(scope="module")
def plain_ia3(setup, tmp_path_factory):
    folder, _ = setup("llama")
    return save_peft(folder, IA3Config(init_ia3_weights=False), tmp_path_factory.mktemp("ia3") / "peft")


def edited(ckpt: Path, tmp_path: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of the checkpoint with adapter_config.json fields changed and/or weights rewritten."""
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    if config:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights is not None:
        save_file(weights(saved(ckpt)), str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("field,value", [(name, True) for name in VARIANTS if name != "use_dora"]
                         + [("use_bdlora", {"nblocks": 2}), ("layer_replication", [[0, 2], [1, 2]])])
def test_lora_variants_that_change_the_forward_are_refused(setup, plain_lora, tmp_path, field, value):
    _, manifest = setup("llama")
    with pytest.raises(AdapterError, match=rf"LoRA variant prefixport cannot serve: .*\({field}\)|{field} "):
        convert(edited(plain_lora, tmp_path, {field: value}), manifest)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq"])
def test_inits_that_rewrite_the_base_weights_are_refused(setup, plain_lora, tmp_path, init):
    _, manifest = setup("llama")
    fix = "merge this one into its quantised base" if init == "loftq" else "path_initial_model_for_weight_conversion"
    with pytest.raises(AdapterError, match=rf"init_lora_weights='{init}'.*only hold on that modified base.*{fix}"):
        convert(edited(plain_lora, tmp_path, {"init_lora_weights": init}), manifest)


def test_real_peft_checkpoints_prefixport_refuses(setup, tmp_path):
    """DoRA, PiSSA (unconverted), modules_to_save, trainable tokens and trained biases, as PEFT saves them."""
    folder, manifest = setup("llama")
    cases = [(LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), r"DoRA \(use_dora\).*merge_and_unload"),
             (LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
              r"init_lora_weights='pissa', which subtracts the initial B·A from the base weights"),
             (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
              r"modules_to_save: \['lm_head'\].*frozen"),
             (LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 4]),
              r"trainable_token_indices: \[3, 4\].*frozen")]
    for i, (config, message) in enumerate(cases):
        with pytest.raises(AdapterError, match=message):
            convert(save_peft(folder, config, tmp_path / str(i)), manifest)
    gpt2, gpt2_manifest = setup("gpt2")  # GPT-2's linear modules have biases, which bias="lora_only" trains
    ckpt = save_peft(gpt2, LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only"), tmp_path / "bias")
    assert any(k.endswith(".bias") for k in saved(ckpt))
    with pytest.raises(AdapterError, match=r"bias='lora_only', which trains the base model's own biases"):
        convert(ckpt, gpt2_manifest)
    # Llama's have none: bias="all" trains nothing beside A and B, and converts
    ckpt = save_peft(folder, LoraConfig(r=4, target_modules=["q_proj"], bias="all"), tmp_path / "no-bias")
    assert convert(ckpt, manifest).kind == "lora"


def test_refused_against_an_export_without_lora(setup, plain_lora, plain_ia3, tiny_export):
    export = tiny_export("llama")
    for ckpt, kind in [(plain_lora, "LoRA"), (plain_ia3, "IA3")]:
        with pytest.raises(AdapterError, match=rf"an {kind} adapter.*takes no LoRA or IA3 inputs.*"
                                               r"`prefixport export --lora`"):
            convert_checkpoint(ckpt, export)
    bundle = convert(plain_lora, setup("llama")[1])
    with pytest.raises(AdapterError, match="takes no LoRA or IA3 inputs"):
        check_fits(bundle, mf.Manifest.load(export))


def test_lora_that_does_not_fit_the_export(setup, plain_lora, tmp_path):
    _, manifest = setup("llama")
    with pytest.raises(AdapterError, match=r"adapts self_attn.v_proj with LoRA; this export takes LoRA on "
                                           r"self_attn.q_proj only \(`prefixport export --lora --lora-targets`"):
        convert(plain_lora, with_weights(manifest, lora=["self_attn.q_proj"]))
    with pytest.raises(AdapterError, match=r"LoRA rank 4; this export takes ranks up to 2: re-export with "
                                           r"`prefixport export --lora --lora-max-rank 4`"):
        convert(plain_lora, with_weights(manifest, max_rank=2))
    with pytest.raises(AdapterError, match=r"adapts decoder layer 1; this export's model has 1 layers"):
        convert(plain_lora, dataclasses.replace(manifest, num_layers=1))
    shapes = {**manifest.weight_adapters["shapes"], "self_attn.v_proj": [64, 48]}
    with pytest.raises(AdapterError, match=r"A \[4, 64\] and B \[32, 4\]; this export's self_attn.v_proj has 64 "
                                           r"inputs and 48 outputs.*another base model"):
        convert(plain_lora, with_weights(manifest, shapes=shapes))
    bundle = convert(plain_lora, manifest)
    other = dataclasses.replace(manifest, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(AdapterError, match="converted for another base model"):
        check_fits(bundle, other)


def test_lora_checkpoints_that_are_broken_or_outside_the_layers(setup, plain_lora, tmp_path):
    _, manifest = setup("llama")
    a = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"

    def nan(w):
        w[a] = np.where(np.arange(w[a].size).reshape(w[a].shape) == 5, np.nan, w[a]).astype(np.float32)
        return w

    with pytest.raises(AdapterError, match="lora.0.self_attn.q_proj.a holds NaN or Inf"):
        convert(edited(plain_lora, tmp_path / "nan", weights=nan), manifest)
    head = {f"{PEFT_PREFIX}lm_head.lora_A.weight": np.ones((4, 64), np.float32),
            f"{PEFT_PREFIX}lm_head.lora_B.weight": np.ones((400, 4), np.float32)}
    with pytest.raises(AdapterError, match=r"adapts 'lm_head', outside the decoder layers \(model.layers.N...\)"):
        convert(edited(plain_lora, tmp_path / "head", weights=lambda w: {**w, **head}), manifest)
    with pytest.raises(AdapterError, match=r"model.layers.0.self_attn.q_proj has rank 4, while adapter_config.json "
                                           r"gives it rank 5"):
        convert(edited(plain_lora, tmp_path / "rank", {"r": 5}), manifest)
    with pytest.raises(AdapterError, match=r"has lora_A \[4, 64\] and lora_B None"):
        convert(edited(plain_lora, tmp_path / "half", weights=lambda w: {k: t for k, t in w.items()
                                                                         if "0.self_attn.q_proj.lora_B" not in k}),
                manifest)
    with pytest.raises(AdapterError, match="--task applies to multitask prompt tuning only"):
        convert(plain_lora, manifest, task=0)


def test_ia3_that_does_not_fit_the_export(setup, plain_ia3, tmp_path):
    _, manifest = setup("llama")
    sides = IA3_SIDES["llama"]
    with pytest.raises(AdapterError, match=r"adapts mlp.down_proj with IA3; this export takes IA3 on "
                                           r"self_attn.k_proj, self_attn.v_proj only .*--ia3-targets"):
        convert(plain_ia3, with_weights(manifest, ia3={p: s for p, s in sides.items() if p != "mlp.down_proj"}))
    with pytest.raises(AdapterError, match=r"IA3 vector on mlp.down_proj scales the module's input \(its "
                                           r"feedforward_modules lists mlp.down_proj\); this export's IA3 on "
                                           r"mlp.down_proj scales the output"):
        convert(plain_ia3, with_weights(manifest, ia3={**sides, "mlp.down_proj": "output"}))
    with pytest.raises(AdapterError, match=r"has shape \[1, 128\]; on a non-feedforward module"):
        convert(edited(plain_ia3, tmp_path, {"feedforward_modules": []}), manifest)


def test_bundle_checks_of_the_new_kinds(setup, plain_lora, plain_ia3, tmp_path):
    _, manifest = setup("llama")
    lora, ia3 = convert(plain_lora, manifest, name="l"), convert(plain_ia3, manifest, name="i")

    def broken(bundle, metadata=None, tensors=None):
        return type(bundle)(tensors if tensors is not None else dict(bundle.tensors),
                            {**bundle.metadata, **(metadata or {})})

    cases = [(broken(lora, {"n_virtual": "3"}), r"a bundle of kind 'lora' adds no virtual tokens"),
             (broken(lora, {"rank": "3"}), "the metadata says rank 3, its largest module has rank 4"),
             (broken(lora, {"scalings": "[1]"}), "`scalings` must be a JSON object of finite numbers"),
             (broken(lora, {"scalings": json.dumps({"0.self_attn.q_proj": 2.0})}),
              r"one value per module; missing \['0.self_attn.v_proj'"),
             (broken(lora, tensors={k: t for k, t in lora.tensors.items() if k != "lora.1.self_attn.v_proj.b"}),
              "module 1.self_attn.v_proj has an A but no B"),
             (broken(lora, tensors={**lora.tensors, "prompt_embeds": np.zeros((2, 64), np.float32)}),
              r"a lora bundle holds lora.\{layer\}.\{path\}.a / .b tensors only"),
             (broken(ia3, {"feedforward": json.dumps(["mlp.up_proj"])}), r"names \['mlp.up_proj'\]"),
             (broken(ia3, tensors={**ia3.tensors, "ia3.0.mlp.down_proj": np.ones((1, 128), np.float32)}),
              r"ia3.0.mlp.down_proj has shape \[1, 128\]")]
    for bundle, message in cases:
        with pytest.raises(AdapterError, match=message):
            check_bundle(bundle)
    no_rank = broken(lora)
    del no_rank.metadata["scalings"]
    with pytest.raises(AdapterError, match="records rank, scalings in its metadata; this one lacks scalings"):
        check_bundle(no_rank)
    # a soft prompt relabelled "lora" (as tests/test_adapters.py's metadata checks do) names the kind
    prompt = make_bundle(name="p", kind="prompt", tensors={"prompt_embeds": np.zeros((3, 64), np.float32)},
                         fingerprint=manifest.fingerprint, peft_type="PROMPT_TUNING")
    path = tmp_path / "relabelled.safetensors"
    save_file(prompt.tensors, str(path), metadata={**prompt.metadata, "kind": "lora"})
    with pytest.raises(AdapterError, match="kind 'lora'"):
        load_bundle(path)


@pytest.mark.parametrize("version", ["1", "2"])
def test_bundles_of_older_versions_still_load(setup, tmp_path, version):
    _, manifest = setup("llama")
    prompt = np.random.default_rng(0).standard_normal((5, manifest.hidden_size)).astype(np.float32)
    bundle = make_bundle(name="old", kind="prompt", tensors={"prompt_embeds": prompt},
                         fingerprint=manifest.fingerprint, peft_type="PROMPT_TUNING",
                         **({"prompt_format": "raw"} if version == "2" else {}))
    path = tmp_path / "old.safetensors"
    save_file(bundle.tensors, str(path), metadata={**bundle.metadata, "format_version": version})
    old = load_bundle(path, manifest)
    assert (old.kind, old.n_virtual, old.rank, old.scalings, old.feedforward, old.modules) == ("prompt", 5, 0, {}, [],
                                                                                                 [])
    assert np.array_equal(old.tensors["prompt_embeds"], prompt)
    assert (old.prompt_format is None) == (version == "1") and old.metadata["format_version"] == version


def test_cli_converts_and_inspects_lora_and_ia3(setup, plain_lora, plain_ia3, tmp_path):
    """`adapter convert` needs an export made with --lora: a copy of the tiny export whose manifest says so."""
    _, manifest = setup("llama")
    export = tmp_path / "export"
    export.mkdir()
    manifest.save(export)
    runner = CliRunner()
    for ckpt, name in [(plain_lora, "my-lora"), (plain_ia3, "my-ia3")]:
        result = runner.invoke(main, ["adapter", "convert", str(ckpt), "--export", str(export), "--name", name])
        assert result.exit_code == 0, result.output
        assert "virtual tokens" not in result.output
        inspected = runner.invoke(main, ["adapter", "inspect", name, "--export", str(export)])
        assert inspected.exit_code == 0, inspected.output
        assert "format version: 3" in inspected.output
        if name == "my-lora":
            assert "lora adapter 'my-lora' (LORA), rank 4, 4 modules" in result.output
            for line in ("rank: 4", "targets: self_attn.q_proj, self_attn.v_proj", "layers: 0, 1", "scaling: 2"):
                assert line in inspected.output, inspected.output
        else:
            assert "ia3 adapter 'my-ia3' (IA3), 6 modules" in result.output
            for line in ("targets: mlp.down_proj, self_attn.k_proj, self_attn.v_proj", "scale inputs: mlp.down_proj"):
                assert line in inspected.output, inspected.output


# Found by the adapter fuzzer (tools/fuzz_adapters.py, families peft_lora, peft_ia3, bundle_lora,
# bundle_ia3): each was a crash, a hang or an accepted adapter the runtime could not hold.

def _no_rank(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every A [0, in] and B [out, 0]: rank 0 in the weights too."""
    return {k: np.ascontiguousarray(t[:0] if ".lora_A." in k else t[:, :0]) for k, t in w.items()}


@pytest.mark.parametrize("ckpt,config,weights,message", [
    # ZeroDivisionError (alpha / r, alpha / sqrt(r)): r 0 in the config and the weights alike
    ("lora", {"r": 0}, _no_rank, r"r is 0, not a whole number >= 1 \(a rank\)"),
    ("lora", {"r": 0, "use_rslora": True}, _no_rank, r"r is 0, not a whole number >= 1 \(a rank\)"),
    # OverflowError (math.isfinite on a JSON integer too large for a float)
    ("lora", {"lora_alpha": 10**400}, None, r"lora_alpha is 1000.*, not a finite number"),
    ("lora", {"alpha_pattern": {"q_proj": 10**400}}, None, r"q_proj is 1000.*, not a finite number"),
    # accepted, then Inf in the runtime's tables: alpha / r beyond float32
    ("lora", {"lora_alpha": 1e300}, None, r"has scaling 2\.5e\+299 .*beyond float32's range"),
    # re.error: a key that compiles alone, but not inside PEFT's `(.*\.)?(KEY)$` (flags not at the start)
    ("lora", {"rank_pattern": {"(?i)q_proj": 4}}, None,
     r"rank_pattern key '\(\?i\)q_proj' is not a regular expression \(global flags not at the start"),
    # hangs: patterns that backtrack for hours on a module name of 30 characters
    ("lora", {"rank_pattern": {"(.*)*x": 4}}, None,
     r"rank_pattern key '\(\.\*\)\*x' is a regular expression prefixport does not match \(a group repeated by \*, "
     r"\+ or \{m,n\}\): matching it could backtrack for hours\. Name the modules instead"),
    ("lora", {"alpha_pattern": {"(.|.)+x": 4}}, None, r"alpha_pattern key '\(\.\|\.\)\+x' .* could backtrack"),
    ("lora", {"rank_pattern": {".*.*.*.*x": 4}}, None, r"\(4 repetitions \(at most 3\)\)"),
    ("lora", {"rank_pattern": {"q" * 2000: 4}}, None, r"has 2,000 characters; prefixport takes patterns of up to 1,000"),
    ("ia3", {"feedforward_modules": "(.*?)*down_proj"}, None, r"feedforward_modules '\(\.\*\?\)\*down_proj' .* could backtrack"),
])
def test_checkpoints_that_crashed_or_hung_the_converter(setup, plain_lora, plain_ia3, tmp_path, ckpt, config, weights,
                                                        message):
    _, manifest = setup("llama")
    folder = edited(plain_lora if ckpt == "lora" else plain_ia3, tmp_path, config, weights)
    began = time.perf_counter()
    with pytest.raises(AdapterError, match=message):
        convert(folder, manifest)
    assert time.perf_counter() - began < 5


def test_patterns_peft_writes_still_convert(setup, plain_lora, tmp_path):
    """The pattern checks refuse only what could backtrack: names, a layer's module, and a few
    repetitions of single characters or classes (PEFT's own examples) convert, matched as PEFT does."""
    _, manifest = setup("llama")
    patterns = {"layers.1.self_attn.v_proj": 8, r"layers\.[0-9]+\.self_attn\.q_.*": 16, "(?:q|k)_proj{1}": 2}
    bundle = convert(edited(plain_lora, tmp_path, {"alpha_pattern": patterns, "rank_pattern": {"v_proj": 4}}),
                     manifest)
    assert bundle.scalings == {"0.self_attn.q_proj": 4.0, "0.self_attn.v_proj": 2.0, "1.self_attn.q_proj": 4.0,
                               "1.self_attn.v_proj": 2.0}


@pytest.mark.parametrize("ckpt", ["lora", "ia3"])
def test_a_layer_number_with_leading_zeros_is_refused(setup, plain_lora, plain_ia3, tmp_path, ckpt):
    """`layers.00` beside `layers.0` named layer 0's module twice: one silently replaced the other (accepted)."""
    _, manifest = setup("llama")
    leaves = (".lora_A.weight", ".lora_B.weight") if ckpt == "lora" else (".ia3_l",)
    head = f"{PEFT_PREFIX}model.layers.0.{'self_attn.q_proj' if ckpt == 'lora' else 'self_attn.k_proj'}"

    def alias(w):
        return {**w, **{(head + leaf).replace(".layers.0.", ".layers.00."): w[head + leaf] * 2 for leaf in leaves}}

    with pytest.raises(AdapterError, match=r"layers\.00\..*of decoder layer '00': PyTorch numbers layers 0, 1, 2, "
                                           r"\.\.\. without leading zeros"):
        convert(edited(plain_lora if ckpt == "lora" else plain_ia3, tmp_path, weights=alias), manifest)


def test_bundles_the_runtime_could_not_hold_are_refused(setup, plain_lora, plain_ia3, tmp_path):
    """Bundles the fuzzer found accepted (or crashing the reader): scalings beyond float32 (10**400 raised
    OverflowError), s·B overflowing float32 where the runtime computes it, a lora bundle of format
    version 2, and shapes no model has (a dimension 0, a module's shape changing between layers)."""
    _, manifest = setup("llama")
    lora, ia3 = convert(plain_lora, manifest, name="l"), convert(plain_ia3, manifest, name="i")
    q_b, q_a = "lora.0.self_attn.q_proj.b", "lora.0.self_attn.q_proj.a"

    def broken(bundle, metadata=None, **tensors):
        return type(bundle)({**bundle.tensors, **{k.replace("__", "."): v for k, v in tensors.items()}},
                            {**bundle.metadata, **(metadata or {})})

    def scalings(value):
        return {"scalings": json.dumps({**lora.scalings, "0.self_attn.q_proj": value})}

    big_b = (lora.tensors[q_b] / np.abs(lora.tensors[q_b]).max() * 3e38).astype(np.float32)
    cases = [(broken(lora, scalings(10**400)), "`scalings` must be a JSON object of finite numbers within float32"),
             (broken(lora, scalings(1e39)), "`scalings` must be a JSON object of finite numbers within float32"),
             (broken(lora, **{q_b.replace(".", "__"): big_b}),
              r"module 0.self_attn.q_proj has scaling 2 and B values up to 3e\+38: their product overflows float32"),
             (broken(lora, {"format_version": "2"}), r"a bundle of kind 'lora' is format version 3 .* says '2'"),
             (broken(lora, **{q_a.replace(".", "__"): np.zeros((4, 0), np.float32)}),
              r"A \[4, 0\] and B \[64, 4\]; a LoRA of rank r has A \[r, in\] and B \[out, r\], r, in and out >= 1"),
             (broken(lora, **{q_a.replace(".", "__"): np.ones((4, 63), np.float32)}),
              r"self_attn.q_proj has \[in, out\] features \[64, 64\] in layer 1 and \[63, 64\] in layer 0"),
             (broken(ia3, **{"ia3__1__self_attn__k_proj": np.ones(31, np.float32)}),
              r"self_attn.k_proj has an IA3 vector of shape \[31\] in layer 1 and \[32\] in layer 0")]
    for bundle, message in cases:
        with pytest.raises(AdapterError, match=message):
            check_bundle(bundle)
    path = tmp_path / "big-scaling.safetensors"  # through the file reader too
    save_file(lora.tensors, str(path), metadata={**lora.metadata, **scalings(10**400)})
    with pytest.raises(AdapterError, match="`scalings` must be a JSON object"):
        load_bundle(path)
