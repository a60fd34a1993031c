"""`prefixport bench serve` against a real prefixport server on 127.0.0.1 (the tiny Llama export,
two soft-prompt adapters): every dataset kind, a concurrency and a rate sweep, the report's files
and its numbers consistent with what was asked (no timing asserted); the option parsers; the one
percentile definition; benchmarks/serving.py's client, now the package's."""

from __future__ import annotations

import asyncio
import json
import math
import sys

import httpx
import pytest
from click.testing import CliRunner

from prefixport import manifest as mf
from prefixport.adapters.bundle import save_bundle
from prefixport.bench.measure import percentile, spread, summary
from prefixport.bench.serve import ServeBenchConfig, run_serve_bench
from prefixport.bench.serve_client import StreamResult, require_httpx
from prefixport.bench.serve_data import BenchRequest, PromptMaker, make_workload, read_lengths
from prefixport.bench.serve_metrics import parse_concurrency, parse_rates, parse_slo, request_metrics
from prefixport.cli import main
from prefixport.errors import PrefixportError
from prefixport.runtime import Engine
from prefixport.server import ServerSettings, create_app

from .helpers import running
from .unit.toy_export import soft_prompt

ADAPTERS = ("soft-a", "soft-b")
STATS = ("min", "p50", "p90", "p99", "max")


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    """(url, export folder): the tiny Llama export served with two random soft prompts."""
    export = tiny_export("llama")
    folder = tmp_path_factory.mktemp("bench-serve-adapters")
    manifest = mf.Manifest.load(export)
    for seed, name in enumerate(ADAPTERS):
        save_bundle(soft_prompt(manifest, 3, seed, name), folder / f"{name}.safetensors")
    engine = Engine.load(export, threads=1)
    with running(create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder, max_batch=4))) as url:
        yield url, export
    engine.close()


def _bench(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["bench", "serve", *args])
    return r.exit_code, r.output


def _check_point(point: dict, num_prompts: int, output_tokens: int | None) -> None:
    q = point["requests"]
    assert (q["sent"], q["ok"], q["failed"], q["errors"]) == (num_prompts, num_prompts, 0, []), q
    if output_tokens is not None:
        assert point["output_tokens"] == output_tokens and point["output_tokens_from"] == "usage"
    assert point["duration_s"] > 0
    assert point["request_throughput"] == pytest.approx(num_prompts / point["duration_s"])
    assert point["output_throughput"] == pytest.approx(point["output_tokens"] / point["duration_s"])
    assert point["total_token_throughput"] == pytest.approx(
        (point["input_tokens"] + point["output_tokens"]) / point["duration_s"])
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        s = point[key]
        assert [s[k] for k in STATS] == sorted(s[k] for k in STATS), (key, s)
        assert s["min"] <= s["mean"] <= s["max"]
    assert point["ttft_ms"]["n"] == point["e2e_ms"]["n"] == num_prompts
    assert point["ttft_ms"]["max"] <= point["e2e_ms"]["max"]


def test_concurrency_sweep_writes_a_consistent_report(server, tmp_path):
    url, export = server
    code, output = _bench(["--base-url", url, "--model", "tiny", "--tokenizer", str(export), "--input-len", "8:24",
                           "--output-len", "6", "--num-prompts", "4", "--concurrency", "1,2",
                           "--slo", "ttft=60s,e2e=120s", "--label", "tiny-fp32", "--out", str(tmp_path)])
    assert code == 0, output
    r = json.loads((tmp_path / "serve.json").read_text())
    assert {"label", "base_url", "model", "endpoint", "sweep", "dataset", "slo", "ignore_eos", "client_machine",
            "definitions", "points"} <= set(r)
    assert (r["label"], r["sweep"], r["endpoint"], r["ignore_eos"]) == ("tiny-fp32", "concurrency", "completions", True)
    assert [p["load"] for p in r["points"]] == [{"concurrency": 1}, {"concurrency": 2}]
    maker = PromptMaker(export)
    workload = make_workload(maker, "random", model="tiny", num_prompts=4, input_len=(8, 24), output_len=(6, 6))
    for i, point in enumerate(r["points"]):
        _check_point(point, 4, 4 * 6)  # ignore_eos: every request makes its max_tokens
        # the prompts have exactly the lengths drawn, as the server counts them too
        assert point["input_tokens"] == sum(q.input_len for q in workload.requests(str(i)))
        assert point["itl_ms"]["n"] <= 4 * 5 and point["tpot_ms"]["n"] == 4
        assert point["goodput"]["requests_met"] == 4  # bounds no tiny request misses
        assert point["goodput"]["requests_per_s"] == pytest.approx(point["request_throughput"])
    assert r["slo"]["seconds"] == {"ttft": 60.0, "e2e": 120.0}
    md = (tmp_path / "serve.md").read_text()
    assert md.startswith("# prefixport bench serve: tiny-fp32") and "| concurrency 2 | 4 / 0 |" in md
    assert md in output
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_prompts_have_exact_token_lengths_and_a_shared_prefix(server):
    maker = PromptMaker(server[1] / "tokenizer.json")
    workload = make_workload(maker, "shared-prefix", model="tiny", num_prompts=6, input_len=(1, 30), prefix_len=20)
    requests = workload.requests("0")
    assert all(maker.count(q.prompt) == q.input_len for q in requests)
    assert [q.input_len for q in requests] == [20 + n for n, _ in workload.lengths]
    prefix = maker.tokenizer.encode(requests[0].prompt, add_special_tokens=False).ids[:20]
    for q in requests:
        assert maker.tokenizer.encode(q.prompt, add_special_tokens=False).ids[:20] == prefix
    other = workload.requests("1")  # the next sweep point: the same lengths and prefix, new texts
    assert [q.input_len for q in other] == [q.input_len for q in requests]
    assert all(a.prompt != b.prompt for a, b in zip(requests, other))


def test_rate_sweep_of_a_shared_prefix_over_chat(server):
    url, export = server
    config = ServeBenchConfig(base_url=url + "/v1", model="tiny", tokenizer=str(export), dataset="shared-prefix",
                              prefix_len=40, input_len=(2, 6), output_len=(3, 5), num_prompts=5, rates=(20.0, math.inf),
                              max_concurrency=2, endpoint="chat", seed=3)
    r, written = run_serve_bench(config)
    assert written == {} and r["sweep"] == "rate" and r["dataset"]["prefix_len"] == 40
    assert [p["load"] for p in r["points"]] == [{"rate": 20.0, "max_concurrency": 2},
                                               {"rate": "inf", "max_concurrency": 2}]
    for point in r["points"]:
        _check_point(point, 5, None)
        assert 5 * 3 <= point["output_tokens"] <= 5 * 5
        assert point["input_tokens"] >= 5 * (40 + 2)  # the server's count: the chat template's tokens too
        assert point["cached_tokens"] > 0  # the prefix, cached by the warm-up request
        assert "goodput" not in point
    json.dumps(r, allow_nan=False)  # 'inf' is a string: strict JSON


def test_adapters_and_file_datasets(server, tmp_path):
    url, export = server
    base = dict(base_url=url, model="tiny", tokenizer=str(export), concurrency=(2,), warmup=0)
    r, _ = run_serve_bench(ServeBenchConfig(**base, dataset="adapters", adapters=("soft-a", "nope", "soft-b"),
                                            input_len=(5, 10), output_len=(4, 4), num_prompts=6))
    q = r["points"][0]["requests"]
    assert (q["ok"], q["failed"]) == (4, 2) and "nope" in q["errors"][0]  # each request names its adapter
    assert r["points"][0]["output_tokens"] == 4 * 4

    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text('{"input_len": 7, "output_len": 2}\n{"input_len": 12, "output_len": 5}\n'
                       '{"input_len": 3, "output_len": 1}\n')
    r, written = run_serve_bench(ServeBenchConfig(**base, dataset="file", lengths_file=str(lengths)),
                                 out=tmp_path / "out")
    point = r["points"][0]
    _check_point(point, 3, 2 + 5 + 1)
    assert point["input_tokens"] == 7 + 12 + 3 and point["tpot_ms"]["n"] == 2  # one-token requests have no TPOT
    assert set(written) == {"json", "markdown", "plot"}
    csv = tmp_path / "lengths.csv"
    csv.write_text("input_len,output_len\n7,2\n12,5\n")
    assert read_lengths(csv) == [(7, 2), (12, 5)]


def test_a_failing_warm_up_and_bad_options_are_clear_errors(server, tmp_path):
    url, export = server
    common = ["--base-url", url, "--tokenizer", str(export), "--input-len", "5", "--output-len", "2",
              "--num-prompts", "2", "--concurrency", "1"]
    code, output = _bench(common + ["--model", "missing"])
    assert code == 1 and "warm-up request" in output and "missing" in output
    code, output = _bench(common + ["--model", "tiny", "--rate", "1"])
    assert code == 2 and "not both" in output
    code, output = _bench(common + ["--model", "tiny", "--adapters", "a,b"])
    assert code == 1 and "--adapters goes with --dataset adapters" in output
    code, output = _bench(common + ["--model", "tiny", "--dataset", "file"])
    assert code == 1 and "--lengths FILE" in output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_len": 3, "output_len": 1}\n{"input_len": 0, "output_len": 1}\n')
    code, output = _bench(common + ["--model", "tiny", "--dataset", "file", "--lengths", str(bad)])
    assert code == 1 and "line 2" in output
    code, output = _bench(common[:-4] + ["--model", "tiny", "--input-len", "9:3"])
    assert code == 2 and "--input-len" in output and "below" in output


@pytest.mark.parametrize("value,why", [
    ("ttft=2", "unit"), ("ttft=2h", "unit"), ("foo=1s", "unknown key"), ("ttft", "KEY=BOUND"),
    ("ttft=0ms", "above 0"), ("ttft=-1s", "unit"), ("ttft=1s,ttft=2s", "twice"), ("=1s", "KEY=BOUND"),
])
def test_bad_slo_values_are_click_errors(value, why):
    with pytest.raises(ValueError, match=why):
        parse_slo(value)
    code, output = _bench(["--base-url", "http://127.0.0.1:9", "--model", "m", "--tokenizer", ".", "--slo", value])
    assert code == 2 and "Invalid value for '--slo'" in output and why in output


def test_option_parsers():
    assert parse_slo("ttft=2s, itl=200ms,tpot=0.05s,e2e=1.5e3ms") == {"ttft": 2.0, "itl": 0.2, "tpot": 0.05, "e2e": 1.5}
    assert parse_slo("") == {}
    assert parse_concurrency("1,4,16") == [1, 4, 16]
    assert parse_rates("0.5, 2,inf") == [0.5, 2.0, math.inf]
    for bad in ("0", "1,,2", "x", "1.5"):
        with pytest.raises(ValueError):
            parse_concurrency(bad)
    for bad in ("0", "-1", "nan", "fast", ""):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_bench_is_a_group_that_keeps_bench_outdir():
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "serve" in r.output and "suite" in r.output
    for args in (["bench", "no-such-export"], ["bench", "--quick", "no-such-export"],
                 ["bench", "suite", "no-such-export"]):
        r = CliRunner().invoke(main, args)  # routed to the suite: its OUTDIR check answers
        assert r.exit_code == 2 and "'no-such-export' does not exist" in r.output, r.output


def test_tokens_from_the_usage_else_the_tokenizer_and_the_slo_per_request(server):
    maker = PromptMaker(server[1])
    request = BenchRequest(0, "tiny", "a prompt", 5, 3)
    result = StreamResult(chunk_times_s=[0.1, 0.2, 0.4], latency_s=0.5, text=" quick brown fox")
    m = request_metrics(request, result, maker.count)
    assert (m.output_tokens, m.output_from_usage, m.input_tokens) == (maker.count(" quick brown fox"), False, 5)
    assert m.tpot_s == pytest.approx((0.5 - 0.1) / (m.output_tokens - 1)) and m.gaps_s == pytest.approx([0.1, 0.2])
    result.usage = {"prompt_tokens": 6, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 2}}
    m = request_metrics(request, result, maker.count)
    assert (m.output_tokens, m.output_from_usage, m.input_tokens, m.cached_tokens) == (4, True, 6, 2)
    assert m.meets({"itl": 0.2, "ttft": 0.1, "e2e": 0.5}) and not m.meets({"itl": 0.19})  # itl: the request's p99 gap
    assert not m.meets({"ttft": 0.09}) and not m.meets({"tpot": 0.1})


def test_without_httpx_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(PrefixportError, match=r"pip install prefixport\[serve\]"):
        require_httpx()


def test_one_percentile_definition():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0.5) == 2.5 and percentile(values, 0) == 1 and percentile(values, 1) == 4
    assert percentile(values, 0.9) == pytest.approx(3.7)  # linear between ranks 2 and 3 (numpy's default)
    assert percentile([5.0], 0.99) == 5.0
    assert spread(values)["p50"] == 2.5 and spread(values)["p95"] == pytest.approx(percentile(values, 0.95))
    assert summary(values, 1000)["p99"] == pytest.approx(1000 * percentile(values, 0.99))
    from benchmarks import common

    assert common.percentile is percentile
    assert common.distribution(values)["p95"] == spread(values)["p95"]
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_the_benchmark_scripts_client_is_the_packages(server):
    from benchmarks.attacks import victim_request
    from benchmarks.serving import Request, http_run

    url, _ = server
    requests = [Request(i, "tiny", "short", f"The quick brown fox {i}") for i in range(3)]
    wall, outcomes = asyncio.run(http_run(url, requests, 2, 4))
    assert wall > 0 and all(o.error is None and o.completion_tokens == 4 and o.ttft_s is not None for o in outcomes)

    async def victim():
        async with httpx.AsyncClient() as client:
            return await victim_request(client, url, requests[0], 4, 60)

    record = asyncio.run(victim())
    assert record.error is None and record.completion_tokens == 4 and record.ttft_s is not None
