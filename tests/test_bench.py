"""`prefixport bench --quick` runs on a tiny model exported with `--lora`, with an adapter of each
kind (prompt, prefix, LoRA, IA3), and its JSON has every field (no timing asserted)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixport.adapters import convert_checkpoint
from prefixport.cli import main
from prefixport.exporter import export_model
from prefixport.exporter.weights import LoraOptions

from . import peft_helpers as ph


def test_bench_quick_writes_every_field(tiny_model, tmp_path):
    folder = tiny_model("llama")
    export = tmp_path / "export"
    export_model(export, model=str(folder), lora=LoraOptions())
    tok = AutoTokenizer.from_pretrained(folder)
    bundles, peft_dirs = [], []
    for variant in ("prompt", "prefix", "lora-all", "ia3"):
        peft_dirs.append(ph.train(AutoModelForCausalLM.from_pretrained(folder), variant, tok,
                                  tmp_path / f"peft-{variant}", steps=1))
        bundles.append(convert_checkpoint(peft_dirs[-1], export, out=tmp_path / f"b-{variant}.safetensors")[1])
    args = ["bench", str(export), "--quick", "--out", str(tmp_path / "out")]
    for b in bundles:
        args += ["--adapters", str(b)]
    for d in peft_dirs:
        args += ["--peft", str(d)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {"swap", "memory", "latency", "throughput", "floor", "machine", "memory_counter", "adapters"} <= set(data)
    swap = data["swap"]
    for key in ("resident_s", "from_disk_s", "naive_new_session_s", "peft_set_adapter_s"):
        assert {"p50", "p95", "min", "max", "n"} <= set(swap[key]) and swap[key]["n"] >= 2
    counts = [p["adapters"] for p in data["memory"]["points"]]
    assert counts[:3] == [1, 10, 100] and counts[-1] >= 100  # then enough adapters for RSS to rise above heap noise
    mem = data["memory"]
    assert {"rss_per_adapter_bytes", "naive_extrapolated", "peft_extrapolated"} <= set(mem)
    assert mem["store_per_adapter_bytes"] == mem["points"][-1]["store_resident_bytes"] / counts[-1]
    assert counts[-1] == min(5000, max(100, -(-(64 << 20) // mem["bundle_bytes"])))
    assert mem["rss_expected_growth_bytes"] == (counts[-1] - 1) * mem["bundle_bytes"]  # the store counts exactly
    assert mem["peft_per_adapter_bytes"] > 0  # the last --peft: the IA3's vectors
    assert {a["kind"] for a in data["adapters"].values()} == {"prompt", "prefix", "lora", "ia3"}
    for length in ("16", "128"):
        row = data["latency"][length]
        assert {"base", "transformers eager"} <= set(row) and any(k.startswith("prefix") for k in row)
        assert any(k.startswith("prompt") for k in row) and any(k.startswith("peft eager") for k in row)
        assert any(k.startswith("lora") for k in row) and any(k.startswith("ia3") for k in row)
        assert row["base"]["itl_s"]["n"] >= 3
    assert set(data["throughput"]) == {"1", "8"}
    assert {"one adapter", "adapter per row"} == set(data["throughput"]["8"])
    floor = data["floor"]
    assert floor["measured_over_floor"] > 0 and set(floor["bandwidth"]["probes"]) == {"sgemv", "reduce", "onnxruntime"}
    assert floor["bandwidth"]["bytes_per_s"] == max(floor["bandwidth"]["probes"].values())
    assert floor["beaten"] == (floor["measured_over_floor"] < 1)
    assert "RSS" in data["memory_counter"]
    assert (tmp_path / "out" / "bench.md").read_text().startswith("# prefixport bench")
    assert (tmp_path / "out" / "swap_memory.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 5_000
