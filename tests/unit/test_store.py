"""The adapter store (`runtime/store.py`): registration, exact bytes, the LRU budget, pinned
bundles, requests keeping their adapter, bad bundles refused."""

from __future__ import annotations

import numpy as np
import pytest

from prefixport import manifest as mf
from prefixport.adapters.bundle import make_bundle, save_bundle
from prefixport.errors import AdapterError

from .runs import assert_same, run
from .toy_export import prefix, soft_prompt


def test_stats_count_each_adapters_bytes_exactly(engine, manifest):
    stats = engine.stats().adapters
    m = manifest
    soft, pre = stats.adapters["soft"], stats.adapters["prefix"]
    assert (soft.kind, soft.n_virtual, soft.bytes) == ("prompt", 4, 4 * m.hidden_size * 4)
    assert (pre.kind, pre.n_virtual, pre.bytes) == ("prefix", 5, 2 * m.num_layers * m.num_kv_heads * 5 * m.head_dim * 4)
    assert stats.registered == stats.resident == 4 and stats.budget_bytes is None
    assert stats.resident_bytes == sum(a.bytes for a in stats.adapters.values())
    assert not any(a.pinned for a in stats.adapters.values())  # all from files


def test_a_budget_evicts_the_least_recently_used_and_rereads_it_unchanged(make_engine, toy):
    folder = toy[0] / "adapters"
    full = make_engine()
    want = {name: run(full, "The quick brown fox", name) for name in ("soft", "soft6", "prefix")}
    sizes = {name: a.bytes for name, a in full.stats().adapters.adapters.items()}
    engine = make_engine(adapters=False, adapter_budget_bytes=sizes["soft6"] + sizes["prefix"])
    for name in ("soft", "soft6", "prefix"):  # soft, the oldest, leaves when prefix comes
        engine.add_adapter(name, folder / f"{name}.safetensors")
    stats = engine.stats().adapters
    assert [n for n, a in stats.adapters.items() if a.resident] == ["soft6", "prefix"]
    assert stats.adapters["soft"].evictions == 1 and stats.resident_bytes <= stats.budget_bytes
    assert_same(run(engine, "The quick brown fox", "soft"), want["soft"])  # a miss: read again
    stats = engine.stats().adapters
    assert stats.adapters["soft"].misses == 1 and stats.adapters["soft"].resident
    assert not stats.adapters["soft6"].resident  # the least recently used went this time
    for name in ("prefix", "soft6"):  # prefix: a hit (now the most recent); soft6: a miss, evicting soft
        assert_same(run(engine, "The quick brown fox", name), want[name])
    stats = engine.stats().adapters
    assert [n for n, a in stats.adapters.items() if a.resident] == ["soft6", "prefix"]
    assert (stats.hits, stats.misses, stats.evictions) == (1, 2, 3) and stats.resident_bytes <= stats.budget_bytes


def test_bundles_registered_from_memory_are_pinned(make_engine, manifest, toy):
    engine = make_engine(adapters=False, adapter_budget_bytes=1)  # nothing from a file stays
    engine.add_adapter("mem", bundle=soft_prompt(manifest, 4, seed=9, name="mem"))
    engine.add_adapter("soft", toy[0] / "adapters" / "soft.safetensors")
    engine.add_adapter("prefix", toy[0] / "adapters" / "prefix.safetensors")
    stats = engine.stats().adapters.adapters
    assert stats["mem"].pinned and stats["mem"].resident and stats["mem"].evictions == 0
    assert not stats["soft"].resident and stats["soft"].evictions == 1
    assert stats["prefix"].resident  # the newest stays while it is being registered
    for _ in range(2):
        run(engine, "Hello", "soft")
        run(engine, "Hello", "mem")
    stats = engine.stats().adapters.adapters
    assert stats["mem"].hits == 2 and stats["mem"].misses == 0 and stats["mem"].resident


def test_a_request_keeps_its_adapter_after_it_is_unregistered_or_replaced(engine, manifest):
    want = run(engine, "Where is parcel 12?", "prefix", 8)
    request = engine.prepare("Where is parcel 12?", adapter="prefix", max_new_tokens=8, stop_token_ids=[])
    request.logits = []
    engine.remove_adapter("prefix")
    with pytest.raises(AdapterError, match="no adapter named 'prefix' is registered"):
        engine.generate("Hi", adapter="prefix")
    engine.add_adapter("prefix", bundle=prefix(manifest, 5, seed=99))  # other tensors, same name
    list(engine.run_rows([request]))
    assert_same(request, want)
    assert run(engine, "Where is parcel 12?", "prefix", 8).logits[0].tobytes() != want.logits[0].tobytes()


def _bad(manifest: mf.Manifest) -> dict[str, tuple[object, str]]:
    soft = soft_prompt(manifest, 4, seed=1, name="bad")
    nan = soft.tensors["prompt_embeds"].copy()
    nan[1, 2] = np.nan
    pre = prefix(manifest, 3, seed=1, name="bad").tensors
    wide = {k: np.zeros((manifest.num_kv_heads, 3, manifest.head_dim + 1), np.float32) for k in pre}
    return {
        "nan": (make_bundle(name="bad", kind="prompt", tensors={"prompt_embeds": nan},
                            fingerprint=manifest.fingerprint, peft_type="PROMPT_TUNING"), "holds NaN or Inf"),
        "hidden": (make_bundle(name="bad", kind="prompt", tensors={"prompt_embeds": np.zeros((4, 7), np.float32)},
                               fingerprint=manifest.fingerprint, peft_type="PROMPT_TUNING"),
                   rf"prompt_embeds has shape \[4, 7\], this export needs \[4, {manifest.hidden_size}\]"),
        "head_dim": (make_bundle(name="bad", kind="prefix", tensors=wide, fingerprint=manifest.fingerprint,
                                 peft_type="PREFIX_TUNING"), "this export needs"),
        "layers": (make_bundle(name="bad", kind="prefix", tensors={k: v for k, v in pre.items() if ".1." not in k},
                               fingerprint=manifest.fingerprint, peft_type="PREFIX_TUNING"), "missing"),
        "base": (make_bundle(name="bad", kind="prompt", tensors=soft.tensors, fingerprint="0" * 64,
                             peft_type="PROMPT_TUNING"), "another base model"),
    }


@pytest.mark.parametrize("case", ["nan", "hidden", "head_dim", "layers", "base"])
def test_bad_bundles_are_refused_with_a_clear_error_and_nothing_changes(engine, manifest, tmp_path, case):
    bundle, message = _bad(manifest)[case]
    before = engine.stats().adapters
    with pytest.raises(AdapterError, match=message):
        engine.add_adapter("bad", bundle=bundle)
    path = save_bundle(bundle, tmp_path / "bad.safetensors")
    with pytest.raises(AdapterError, match=message):
        engine.add_adapter("bad", path)
    assert engine.stats().adapters == before and "bad" not in engine.adapters


def test_an_unknown_adapter_names_the_registered_ones(engine):
    with pytest.raises(AdapterError, match=r"no adapter named 'sof' is registered \(registered: prefix, "
                                           r"prefix3, soft, soft6\)"):
        engine.prepare("Hi", adapter="sof")
    with pytest.raises(AdapterError, match="no adapter named"):
        engine.remove_adapter("sof")


def test_a_float16_bundle_counts_the_bytes_it_holds_in_the_exports_dtype(engine, manifest):
    engine.add_adapter("half", bundle=soft_prompt(manifest, 4, seed=5, name="half", dtype="float16"))
    assert engine.stats().adapters.adapters["half"].bytes == 4 * manifest.hidden_size * 4  # resident as float32


def test_an_adapter_needs_a_path_or_a_bundle(engine, manifest):
    with pytest.raises(AdapterError, match="give exactly one"):
        engine.add_adapter("nothing")
    with pytest.raises(AdapterError, match="give exactly one"):
        engine.add_adapter("both", "x.safetensors", bundle=soft_prompt(manifest, 2, seed=1, name="both"))
