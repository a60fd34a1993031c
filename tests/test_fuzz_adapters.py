"""Fuzzing of the adapter readers (load_bundle, convert): a short run of benchmarks/fuzz_adapters.py's
harness over the tiny Llama's real bundles and PEFT checkpoints (the full 10,000-case run and its
counts are under benchmarks/results/fuzz_adapters/)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = 400
SEED = 1  # the full run uses seed 0: these are other cases


def _harness():
    name = "fuzz_adapters"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "fuzz_adapters.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def fuzz_seeds(tiny_model, tiny_export, tiny_adapters, tmp_path_factory):
    """The tiny_adapters bundles and checkpoints, plus a multitask checkpoint and its task-1 bundle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.adapters import convert_checkpoint

    from . import peft_helpers as ph

    fz = _harness()
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
    return fz, fz.load_seeds(export, work)


def _describe(failures: list[dict]) -> str:
    return "\n".join(f"{f['case']} {f['family']} {f['outcome']}: {f['desc']} -> {f.get('error_type')}: "
                     f"{f.get('message') or f.get('problems')}\n{f.get('traceback') or ''}" for f in failures[:10])


def test_fuzz_adapter_readers(fuzz_seeds, tmp_path):
    fz, seeds = fuzz_seeds
    assert set(seeds.peft) >= {"prompt", "ptuning-lstm", "prefix", "prefix-projection", "multitask"}
    r = fz.run_fuzz(seeds, CASES, seed=SEED, timeout=5.0, memory_gb=3.0, work=tmp_path / "work",
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
    assert r["families"]["bundle_pickle"]["ok"] == 0
    assert not (tmp_path / "reproducers").exists()
    assert r["worker"]["peak_rss_mb"] < 1024, r["worker"]  # no case came near the 3 GiB cap either
