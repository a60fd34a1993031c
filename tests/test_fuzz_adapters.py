"""Fuzzing of the adapter readers (load_bundle, convert): a short run of `python -m
tools.fuzz_adapters`'s harness over the tiny Llama's real bundles and PEFT checkpoints (the
LoRA and IA3 ones converted for its export made with --lora), with the cases of
tools/fuzz_cases.py (the full 10,000-case run and its counts are under
benchmarks/results/fuzz_adapters/)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tools.fuzz_adapters import add_weight_seeds, run_fuzz
from tools.fuzz_cases import load_seeds, make_case, schedule, st_parse

CASES = 8 * len(schedule())  # every family 8 times its weight
SEED = 1  # the full run uses seed 0: these are other cases
WEIGHT_FAMILIES = ("bundle_lora", "bundle_ia3", "peft_lora", "peft_ia3")


@pytest.fixture(scope="module")
def fuzz_seeds(tiny_model, tiny_export, tiny_lora_export, tiny_adapters, tmp_path_factory):
    """The tiny_adapters bundles and checkpoints, plus a multitask checkpoint and its task-1 bundle, and
    the LoRA and IA3 checkpoints of tests/peft_helpers.py converted for the tiny Llama's --lora export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.adapters import convert_checkpoint

    from . import peft_helpers as ph

    export, adapters = tiny_export("llama"), tiny_adapters("llama")
    work = tmp_path_factory.mktemp("fuzz-seeds")
    for bundle in adapters.glob("*.safetensors"):
        shutil.copy(bundle, work)
    shutil.copytree(adapters / "peft", work / "peft")
    folder = tiny_model("llama")
    ph.train(AutoModelForCausalLM.from_pretrained(folder), "multitask", AutoTokenizer.from_pretrained(folder),
             work / "peft" / "multitask", steps=2)
    convert_checkpoint(work / "peft" / "multitask", export, name="multitask-task1", task=1,
                       out=work / "multitask-task1.safetensors")
    lora_export = tiny_lora_export("llama")
    add_weight_seeds(folder, lora_export, work, say=lambda message: None)
    return load_seeds(export, work, lora_export)


def _describe(failures: list[dict]) -> str:
    return "\n".join(f"{f['case']} {f['family']} {f['outcome']}: {f['desc']} -> {f.get('error_type')}: "
                     f"{f.get('message') or f.get('problems')}\n{f.get('traceback') or ''}" for f in failures[:10])


def _content(blob: bytes) -> object:
    """A file's content; a safetensors header as sorted JSON (the library writes metadata in no fixed order)."""
    try:
        header, data = st_parse(blob)
    except (ValueError, RecursionError, struct.error):
        return blob
    return json.dumps(header, sort_keys=True), data


def _files(folder: Path) -> dict[str, object]:
    return {str(p.relative_to(folder)): _content(p.read_bytes().replace(str(folder).encode(), b"CASE"))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_case_is_rebuilt_from_its_seed_and_index(fuzz_seeds, tmp_path):
    """`--replay S:i` relies on it: the same seed and index make the same case, in every family."""
    marker = tmp_path / "marker"
    families = set()
    for index in range(len(schedule())):
        made = []
        for attempt in ("a", "b"):
            folder = tmp_path / f"{index}-{attempt}"
            folder.mkdir()
            case = make_case(SEED, index, fuzz_seeds, folder, marker)
            made.append((case.family, case.desc, case.kind, case.manifest, case.task, _files(folder)))
        families.add(made[0][0])
        if "zip" not in made[0][1]:  # a torch-style zip holds the time it was written
            assert made[0] == made[1], index
    assert families == set(schedule())


def test_fuzz_adapter_readers(fuzz_seeds, tmp_path):
    seeds = fuzz_seeds
    assert set(seeds.peft) >= {"prompt", "ptuning-lstm", "prefix", "prefix-projection", "multitask", "lora-all",
                               "lora-qv-rs", "lora-attn-r4", "ia3"}
    assert seeds.of_kind("lora") == ["lora-all", "lora-attn-r4", "lora-qv-rs"] and seeds.of_kind("ia3") == ["ia3"]
    r = run_fuzz(seeds, CASES, seed=SEED, timeout=5.0, memory_gb=3.0, work=tmp_path / "work",
                    reproducers=tmp_path / "reproducers")
    t = r["totals"]
    assert (t["crash"], t["hang"], t["memory"], t["bad_accept"]) == (0, 0, 0, 0), _describe(r["failures"])
    assert t["cases"] == CASES and t["ok"] + t["error"] == CASES
    # the harness tells each failure apart (caused on purpose), and the pickle payload would fire if loaded
    assert r["harness_selftest"]["ok"], r["harness_selftest"]
    assert r["pickle"]["payload_fires_when_unpickled"] and r["pickle"]["cases_with_a_payload"] > 0
    assert not r["pickle"]["marker_written"], r["pickle"]["marker_cases"]
    # no vacuous pass: every family made cases; every mutation family was refused at least once; the
    # unchanged seeds were accepted (and each converted seed equalled its bundle: else bad_accept above)
    for name, f in r["families"].items():
        assert f["cases"] > 0, name
        if name in ("bundle_valid", "peft_valid"):
            assert f["ok"] > 0, name
        else:
            assert f["error"] > 0, (name, f["kinds"])
        assert all(m["message"].strip() for m in f["messages"]), name
    assert r["families"]["bundle_valid"]["ok"] == r["families"]["bundle_valid"]["cases"]
    # LoRA and IA3: each of their families had refused and accepted cases (the accepted ones checked by
    # the oracle: else bad_accept above), a valid one was refused by the plain export, and cases made
    # from LoRA/IA3 seeds in every family met the --lora export
    for name in WEIGHT_FAMILIES:
        f = r["families"][name]
        assert f["ok"] > 0 and f["error"] > 0, (name, f["kinds"])
    plain = [r["families"][n]["kinds"]["plain_export"] for n in WEIGHT_FAMILIES
             if "plain_export" in r["families"][n]["kinds"]]
    assert plain and all(set(outcomes) == {"error"} for outcomes in plain), plain
    lora = r["lora_export_cases"]
    assert lora["cases"] > sum(r["families"][n]["cases"] for n in WEIGHT_FAMILIES) // 2 and lora["ok"] > 0, lora
    assert r["families"]["bundle_pickle"]["ok"] == 0
    assert not (tmp_path / "reproducers").exists()
    assert r["worker"]["peak_rss_mb"] < 1024, r["worker"]  # no case came near the 3 GiB cap either
