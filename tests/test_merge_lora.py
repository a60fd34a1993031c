"""`prefixport export --merge-lora PEFT_DIR` (docs/export.md, "Merging one LoRA"): real PEFT LoRA
checkpoints of the tiny Llama and GPT-2 folded into the base weights at export, checked against
PEFT's own unmerged forward and its merge_and_unload() (logits at every position within the export
verification's float32 tolerance, greedy tokens identical, the merged weights bitwise PEFT's), and
every checkpoint --merge-lora refuses, with its message."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from prefixport import manifest as mf
from prefixport.adapters import convert, save_bundle
from prefixport.cli import main
from prefixport.errors import AdapterError
from prefixport.exporter import export_model
from prefixport.exporter.export import fingerprint
from prefixport.exporter.merge import merge_lora
from prefixport.exporter.verify import TOLERANCE
from prefixport.runtime import Engine
from prefixport.runtime.generation import prefill_new

from .helpers import runtime_greedy_batch
from .peft_helpers import peft_forward, peft_greedy_choices

PROMPTS = [[1, 5, 9, 33, 100, 7, 8, 250, 3], [1, 42, 17, 301, 12, 12, 64]]
GREEDY = 12
WEIGHTS = "adapter_model.safetensors"


def save_peft(folder: Path, config, out: Path, seed: int = 0) -> Path:
    """A PEFT adapter of `config` on the model in `folder`, saved as PEFT saves it (LoRA's B random
    with init_lora_weights=False, so that the merge changes the weights)."""
    torch.manual_seed(seed)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config).save_pretrained(out)
    return out


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"task_type": TaskType.CAUSAL_LM, "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


def rewrite(ckpt: Path, change) -> Path:
    """Rewrite the checkpoint's tensors with change(tensors) (a dict, changed in place)."""
    tensors = load_file(str(ckpt / WEIGHTS))
    change(tensors)
    save_file(tensors, str(ckpt / WEIGHTS))
    return ckpt


def edit_config(ckpt: Path, **changes) -> Path:
    path = ckpt / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return ckpt


def every_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """The export's logits at every position of one prompt [len(ids), vocab]."""
    logits, _ = prefill_new(engine.backend, [ids], every=True)
    return logits[0]


def check_against_peft(export: Path, folder: Path, ckpt: Path) -> dict[str, float]:
    """The export against PEFT's unmerged forward and its merge_and_unload(): logits at every position
    of PROMPTS within the float32 tolerance, the export's greedy tokens PEFT's greedy choices; the
    export's fingerprint that of PEFT's merged weights (so they are bitwise the same), not the
    base's. Returns the largest logits difference with each."""
    manifest = mf.Manifest.load(export)
    base_fp = fingerprint(AutoModelForCausalLM.from_pretrained(folder))
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ckpt).eval()
    engine = Engine.load(export)
    worst = {}
    for label in ("unmerged", "merged"):
        model = unmerged if label == "unmerged" else unmerged.merge_and_unload()
        diff = 0.0
        for ids in PROMPTS:
            diff = max(diff, float(np.abs(every_logits(engine, ids) - peft_forward(model, ids)).max()))
            tokens = runtime_greedy_batch(engine, [ids], GREEDY)[0]
            assert tokens == peft_greedy_choices(model, ids, tokens), (label, ids)
        assert diff <= TOLERANCE["float32"], (label, diff)
        worst[label] = diff
    assert manifest.fingerprint == fingerprint(model) != base_fp
    engine.close()
    return worst


def test_llama_all_linear_cli_with_per_row_lora(tiny_model, tmp_path):
    """`prefixport export --merge-lora DIR --lora` on the tiny Llama, every linear module: computes
    PEFT's base + LoRA; the manifest records the merge; per-row LoRA bundles fit the merged export
    when converted against it, and a bundle converted for the plain base model is refused (its
    fingerprint is the base's)."""
    folder = tiny_model("llama")
    ckpt = save_peft(folder, lora(target_modules="all-linear"), tmp_path / "merged-lora")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(out), "--model", str(folder), "--merge-lora", str(ckpt),
                                       "--lora", "--lora-max-rank", "4"])
    assert result.exit_code == 0, result.output
    assert f"merged LoRA {ckpt} (rank 4, 14 modules: mlp.down_proj" in result.output
    manifest = mf.Manifest.load(out)
    assert manifest.merged_lora == {
        "source": str(ckpt), "digest": "sha256:" + hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest(),
        "peft_type": "LORA", "rank": 4, "lora_alpha": 8, "use_rslora": False, "use_dora": False,
        "targets": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                    "self_attn.q_proj", "self_attn.v_proj"], "modules": 14}
    assert manifest.weights is not None
    check_against_peft(out, folder, ckpt)

    # A second LoRA per row, on top of the merged one: converted against the merged export it computes
    # PEFT's second adapter on PEFT's merged model; converted for the plain base model it is refused.
    row = save_peft(folder, lora(target_modules=["q_proj", "v_proj"]), tmp_path / "row-lora", seed=1)
    save_bundle(convert(row, manifest, name="row"), tmp_path / "row.safetensors")
    plain = dataclasses.replace(manifest, fingerprint=fingerprint(AutoModelForCausalLM.from_pretrained(folder)))
    save_bundle(convert(row, plain, name="row"), tmp_path / "row-plain.safetensors")
    engine = Engine.load(out)
    with pytest.raises(AdapterError, match="converted for another base model"):
        engine.add_adapter("plain", tmp_path / "row-plain.safetensors")
    engine.add_adapter("row", tmp_path / "row.safetensors")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ckpt).merge_and_unload()
    reference = PeftModel.from_pretrained(merged, row).eval()
    for ids in PROMPTS:
        got = engine.generate(ids, adapter="row", max_new_tokens=GREEDY, stop_token_ids=[])
        assert got.token_ids == peft_greedy_choices(reference, ids, got.token_ids)
    engine.close()


def test_llama_attention_rslora_patterns(tiny_model, tmp_path):
    """Attention modules only, rsLoRA (alpha / sqrt(r)), a rank_pattern and an alpha_pattern: the
    scalings as PEFT computes them."""
    folder = tiny_model("llama")
    config = lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True, r=6,
                  rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0})
    ckpt = save_peft(folder, config, tmp_path / "lora")
    report = export_model(tmp_path / "export", model=str(folder), merge_lora=ckpt)
    merged = report.manifest.merged_lora
    assert (merged["rank"], merged["use_rslora"], merged["modules"]) == (6, True, 8)
    assert merged["targets"] == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert max(c.logits_max_abs_diff for c in report.verification) <= TOLERANCE["float32"]
    check_against_peft(report.folder, folder, ckpt)


def test_gpt2_conv1d_fan_in_fan_out(tiny_model, tmp_path):
    """GPT-2's Conv1D modules (weight [in, out]: PEFT merges B·A transposed, fan_in_fan_out)."""
    folder = tiny_model("gpt2")
    ckpt = save_peft(folder, lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), tmp_path / "lora")
    report = export_model(tmp_path / "export", model=str(folder), merge_lora=ckpt)
    assert report.manifest.merged_lora["targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    check_against_peft(report.folder, folder, ckpt)


def merged_in_torch(folder: Path, ckpt: Path) -> tuple[float, bool]:
    """merge_lora on the model in PyTorch against PEFT's unmerged forward: the largest logits
    difference over PROMPTS, and whether the merged weights are bitwise PEFT's merge_and_unload()."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    merge_lora(model, ckpt, "model.layers")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ckpt).eval()
    diff = max(float(np.abs(peft_forward(model, ids) - peft_forward(unmerged, ids)).max()) for ids in PROMPTS)
    return diff, fingerprint(model) == fingerprint(unmerged.merge_and_unload())


def test_dora_merges_as_peft(tiny_model, tmp_path):
    """DoRA: PEFT merges m · (W + s·B·A) / ‖W + s·B·A‖ exactly (its unmerged forward, up to rounding),
    with magnitudes that are not their initialisation (which would make DoRA plain LoRA)."""
    folder = tiny_model("llama")
    ckpt = save_peft(folder, lora(target_modules="all-linear", use_dora=True), tmp_path / "dora")
    rng = np.random.default_rng(0)
    rewrite(ckpt, lambda t: t.update({k: (v * rng.uniform(0.5, 1.5, v.shape)).astype(v.dtype)
                                      for k, v in t.items() if k.endswith("lora_magnitude_vector")}))
    diff, bitwise = merged_in_torch(folder, ckpt)
    assert diff < 1e-4 and bitwise


def test_embedding_and_untied_lm_head(tiny_model, tmp_path):
    """A LoRA on the (untied) embedding and lm_head merges too; PEFT saves their whole base weights
    beside it, which are left out where they equal the model's and refused where they differ."""
    folder = tiny_model("llama")
    ckpt = save_peft(folder, lora(target_modules=["embed_tokens", "lm_head", "q_proj"]), tmp_path / "lora")
    diff, bitwise = merged_in_torch(folder, ckpt)
    assert diff < 1e-4 and bitwise
    rewrite(ckpt, lambda t: t.__setitem__(key := "base_model.model.model.embed_tokens.base_layer.weight",
                                          t[key] + 1e-3))
    with pytest.raises(AdapterError, match="whole weight of model.embed_tokens .* differs from this base model's"):
        merge_lora(AutoModelForCausalLM.from_pretrained(folder), ckpt)


def test_tied_weight_refused_and_model_left_as_it_was(tiny_model, tmp_path):
    """GPT-2's lm_head is its embedding (one tensor): merging into it would change both, so it is
    refused, and the model is left without PEFT's layers and with its weights."""
    folder = tiny_model("gpt2")
    ckpt = save_peft(folder, lora(target_modules=["c_attn", "lm_head"]), tmp_path / "lora")
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = fingerprint(model)
    with pytest.raises(AdapterError, match="adapts lm_head, whose weight is tied to transformer.wte"):
        merge_lora(model, ckpt)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert fingerprint(model) == before and all(p.requires_grad for p in model.parameters())


class Payload:
    """Unpickling this touches a file: the proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def refused(tmp_path: Path, tiny_model, case: str) -> tuple[Path, str]:
    """(model folder, checkpoint folder) of each refused case."""
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    ckpt = tmp_path / case
    if case == "pickle-only":
        ckpt.mkdir()
        (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
        (ckpt / "adapter_model.bin").write_bytes(pickle.dumps(Payload(tmp_path / "unpickled")))
        return llama, ckpt
    if case == "prompt-tuning":
        return llama, save_peft(llama, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4), ckpt)
    if case == "ia3":
        return llama, save_peft(llama, IA3Config(task_type=TaskType.CAUSAL_LM), ckpt)
    if case == "modules-to-save":
        return llama, save_peft(llama, lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), ckpt)
    if case == "lora-bias":
        return gpt2, save_peft(gpt2, lora(target_modules=["c_attn"], lora_bias=True), ckpt)
    if case == "pissa":
        return llama, edit_config(save_peft(llama, lora(target_modules=["q_proj"]), ckpt), init_lora_weights="pissa")
    if case == "unknown-option":
        return llama, edit_config(save_peft(llama, lora(target_modules=["q_proj"]), ckpt), use_hyperlora=True)
    if case == "other-model":  # a Llama LoRA on GPT-2: no q_proj there
        return gpt2, save_peft(llama, lora(target_modules=["q_proj", "v_proj"]), ckpt)
    if case == "other-model-all-linear":  # PEFT saves all-linear as the Llama's module names
        return gpt2, save_peft(llama, lora(target_modules="all-linear"), ckpt)
    ckpt = save_peft(llama, lora(target_modules=["q_proj", "v_proj"]), ckpt)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    if case == "other-shape":
        return llama, rewrite(ckpt, lambda t: t.__setitem__(key, np.zeros((4, 65), np.float32)))
    if case == "extra-tensor":
        return llama, rewrite(ckpt, lambda t: t.__setitem__(key.replace("self_attn.v_proj", "mlp.up_proj"), t[key]))
    if case == "missing-tensor":
        return llama, rewrite(ckpt, lambda t: t.pop(key))
    assert case == "nan"
    return llama, rewrite(ckpt, lambda t: t.__setitem__(key, np.full((4, 64), np.nan, np.float32)))


REFUSALS = {
    "pickle-only": "holds adapter_model.bin, a pickle, which prefixport never loads",
    "prompt-tuning": "is not a LoRA but PROMPT_TUNING .* `prefixport adapter convert",
    "ia3": "is not a LoRA but IA3 .* `prefixport adapter convert .* --lora",
    "modules-to-save": r"also trained whole modules \(modules_to_save",
    "lora-bias": "lora_bias adds a learned bias",
    "pissa": "init_lora_weights='pissa', which subtracts the initial B·A",
    "unknown-option": "sets use_hyperlora, which PEFT .* does not know",
    "other-model": "does not fit this base model .*q_proj",
    "other-model-all-linear": "does not fit this base model .*not found",
    "extra-tensor": "holds 'model.layers.1.mlp.up_proj.lora_A.weight', for which its config makes no "
                    "module on this base model",
    "other-shape": r"v_proj.lora_A.weight' has shape \[4, 65\], while this base model's module .* make it \[4, 64\]",
    "missing-tensor": "lacks 'model.layers.1.self_attn.v_proj.lora_A.weight'",
    "nan": "holds NaN or Inf values",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused(tiny_model, tmp_path, case):
    """Each checkpoint --merge-lora cannot fold exactly is refused before anything is traced or
    written, with what and why; a pickle is never unpickled."""
    model, ckpt = refused(tmp_path, tiny_model, case)
    out = tmp_path / "export"
    with pytest.raises(AdapterError, match=REFUSALS[case]):
        export_model(out, model=str(model), merge_lora=ckpt)
    assert not out.exists() and not list(tmp_path.glob(".export.partial-*"))
    assert not (tmp_path / "unpickled").exists()


def test_cli_refusal_is_one_line(tiny_model, tmp_path):
    ckpt = save_peft(tiny_model("llama"), IA3Config(task_type=TaskType.CAUSAL_LM), tmp_path / "ia3")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "--model", str(tiny_model("llama")),
                                       "--merge-lora", str(ckpt)])
    assert result.exit_code == 1 and "Error: " in result.output and "is not a LoRA but IA3" in result.output


def test_pickle_payload_would_run(tmp_path):
    """The pickle-only case's payload does what it is there to detect, when unpickled."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "unpickled")))
    assert (tmp_path / "unpickled").exists()
