"""Speculative decoding by prompt lookup and by a draft export: the same greedy tokens as plain
decoding (sampled tokens of the same distribution), in fewer passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prefixport import manifest as mf
from prefixport.errors import InputError, PrefixportError
from prefixport.exporter import optimize
from prefixport.runtime import Engine, Scheduler
from prefixport.runtime.speculative import PromptLookup, parse_method

from .conftest import ADAPTER_VARIANTS

# Repetitive prompts, so that n-gram lookup proposes often (and is often wrong on a random model).
PROMPTS = ["one two three four one two three four one two three", "The quick brown fox. The quick brown fox. The",
           "a b c d e f a b c d e f a b", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Numbers: 0 1 2"]


@pytest.fixture(scope="module")
def int8_draft(tiny_export, tmp_path_factory) -> Path:
    """The tiny llama export with int8 weights: a draft of the same base model."""
    folder = tmp_path_factory.mktemp("draft") / "int8"
    shutil.copytree(tiny_export("llama"), folder)
    optimize.quantize(folder / mf.MODEL_NAME, "int8")
    return folder


@pytest.fixture(scope="module")
def engine(tiny_export, tiny_adapters, int8_draft):
    engine = Engine.load(tiny_export("llama"), prompt_cache_bytes=0, draft=int8_draft)
    for name in ADAPTER_VARIANTS:
        engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield engine
    engine.close()


def passes(engine, method):
    return engine.stats().speculative.method(method).passes


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
@pytest.mark.parametrize("adapter", [None, *ADAPTER_VARIANTS])
def test_greedy_tokens_equal_plain_decoding(engine, adapter, method):
    verified = 0
    for prompt in PROMPTS:
        before = passes(engine, method)
        plain = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], logprobs=2)
        assert passes(engine, method) == before  # plain decoding does not speculate
        spec = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], logprobs=2,
                               speculative=method)
        verified += passes(engine, method) - before
        assert spec.token_ids == plain.token_ids
        assert [lp.token for lp in spec.logprobs] == spec.token_ids
        assert spec.finish_reason == plain.finish_reason == "length"
    assert verified > 0  # it did verify proposals


def test_stops_and_limits_cut_an_accepted_run(engine):
    """A stop string or stop id inside a run of accepted proposals ends the row there, as plain
    decoding does; max_new_tokens is never exceeded. (A first speculative run leaves its output in
    the lookup's history, so the next runs accept whole runs of proposals.)"""
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=30, stop_token_ids=[])
        assert engine.generate(prompt, max_new_tokens=30, stop_token_ids=[],
                               speculative="prompt-lookup").token_ids == plain.token_ids
        ids = plain.token_ids
        stop_text = engine.tokenizer.decode(ids[5:8])
        for kwargs in ({"stop": [stop_text]}, {"stop_token_ids": [ids[6]]}, {"max_new_tokens": 7}):
            kwargs = {"max_new_tokens": 30, "stop_token_ids": [], **kwargs}
            want = engine.generate(prompt, **kwargs)
            got = engine.generate(prompt, speculative="prompt-lookup", **kwargs)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


def test_structured_and_batched_requests(engine):
    """A grammar-constrained row speculates too; rows in a batch of several decode normally."""
    schema = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]}}}
    plain = engine.generate(PROMPTS[0], max_new_tokens=40, response_format=schema)
    assert engine.generate(PROMPTS[0], max_new_tokens=40, response_format=schema,
                           speculative="prompt-lookup").token_ids == plain.token_ids
    many = engine.generate_batch(PROMPTS, max_new_tokens=12, stop_token_ids=[], speculative="prompt-lookup")
    assert [r.token_ids for r in many] == [engine.generate(p, max_new_tokens=12, stop_token_ids=[]).token_ids
                                           for p in PROMPTS]


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_sampled_rows_give_their_seeds_tokens(engine, method):
    """A sampled row chooses each token as without speculation (one draw per token from its
    generator) and keeps proposals while they equal its choice: accepted with probability p(x),
    else a draw from p without x, the rejection-sampling rule for a one-token draft. So a seed
    gives the tokens it gives without speculation."""
    before = passes(engine, method)
    for seed in range(3):
        kwargs = {"max_new_tokens": 20, "temperature": 0.8, "top_k": 40, "seed": seed, "stop_token_ids": []}
        assert (engine.generate(PROMPTS[0], speculative=method, **kwargs).token_ids
                == engine.generate(PROMPTS[0], **kwargs).token_ids)
    assert passes(engine, method) > before


def test_bad_methods_and_drafts_are_refused(engine, tiny_export, tmp_path):
    with pytest.raises(InputError, match="speculative must be None or one of"):
        engine.generate(PROMPTS[0], speculative="medusa")
    plain = Engine.load(tiny_export("llama"))
    with pytest.raises(InputError, match="needs a draft export"):
        plain.generate(PROMPTS[0], speculative="draft")
    plain.close()
    with pytest.raises(InputError, match="another base model"):  # a smaller model is not a draft for our adapters
        Engine.load(tiny_export("llama"), draft=tiny_export("qwen2"))
    other = tmp_path / "other-tokenizer"
    shutil.copytree(engine.folder, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens' ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match="another tokenizer"):
        Engine.load(tiny_export("llama"), draft=other)
    with pytest.raises(InputError, match="draft:EXPORT_DIR"):
        parse_method("draft")
    with pytest.raises(PrefixportError, match="spinning must be one of"):
        Engine.load(tiny_export("llama"), spinning="sometimes")
    with Scheduler(engine) as scheduler, pytest.raises(InputError, match="per scheduler"):
        scheduler.submit(PROMPTS[0], speculative="prompt-lookup")


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_the_scheduler_speculates_while_the_batch_is_small(engine, method):
    """Every request of a speculating scheduler gives its plain tokens: alone (speculating), in a
    batch of two (each row alone, speculating), above `speculate_max_batch` (decoding normally); a stop
    string inside an accepted run ends it there, streamed events carry several tokens."""
    want = [engine.generate(p, max_new_tokens=24, stop_token_ids=[]) for p in PROMPTS]
    with Scheduler(engine, speculative=method, speculate_max_batch=2) as scheduler:
        before = passes(engine, method)
        ticket = scheduler.submit(PROMPTS[0], max_new_tokens=24, stop_token_ids=[])
        events = list(ticket.events())
        assert [t for e in events for t in e.token_ids] == want[0].token_ids
        assert passes(engine, method) > before
        for group in (PROMPTS[:2], PROMPTS):
            tickets = [scheduler.submit(p, max_new_tokens=24, stop_token_ids=[]) for p in group]
            assert [t.result().token_ids for t in tickets] == [w.token_ids for w in want[: len(group)]]
        ids = want[2].token_ids
        stop = engine.tokenizer.decode(ids[5:8])
        cut = engine.generate(PROMPTS[2], max_new_tokens=24, stop_token_ids=[], stop=[stop])
        got = scheduler.submit(PROMPTS[2], max_new_tokens=24, stop_token_ids=[], stop=[stop]).result()
        assert (got.token_ids, got.text, got.finish_reason) == (cut.token_ids, cut.text, cut.finish_reason)


def test_a_speculating_server_streams_the_plain_tokens(engine, tiny_export, int8_draft, tmp_path):
    """`create_app(speculative="draft")` over real HTTP: streamed chunks (several tokens each
    where proposals were kept) join to the plain text, with a stop string; /metrics counts passes."""
    import httpx

    from prefixport.server import ServerSettings, create_app

    from .helpers import running

    served = Engine.load(tiny_export("llama"), draft=int8_draft)
    app = create_app(served, ServerSettings(model_name="tiny", adapters_dir=tmp_path, speculative="draft"))
    want = engine.generate(PROMPTS[1], max_new_tokens=24, chat=False)
    stop = engine.tokenizer.decode(want.token_ids[9:12])
    cut = engine.generate(PROMPTS[1], max_new_tokens=24, chat=False, stop=[stop])
    with running(app) as url:
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "stream": True}
        for extra, expected in (({}, want.text), ({"stop": [stop]}, cut.text)):
            with httpx.stream("POST", url + "/v1/completions", json={**body, **extra}) as r:
                lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
            text = "".join(json.loads(ln)["choices"][0]["text"] for ln in lines if json.loads(ln)["choices"])
            assert text == expected
        metrics = httpx.get(url + "/metrics").text
    line = next(ln for ln in metrics.splitlines() if ln.startswith("prefixport_speculative_passes_total"))
    assert float(line.split()[-1]) > 0
    served.close()


def test_cli_generate_speculates(engine, tiny_export, int8_draft):
    from click.testing import CliRunner

    from prefixport.cli import main

    want = engine.generate(PROMPTS[2], max_new_tokens=16, chat=False).text
    for method in ("prompt-lookup", f"draft:{int8_draft}"):
        r = CliRunner().invoke(main, ["generate", str(tiny_export("llama")), PROMPTS[2], "--raw",
                                      "--max-new-tokens", "16", "--speculative", method])
        assert r.exit_code == 0, r.output
        assert r.stdout.rstrip("\n") == want
        assert "accepted per pass" in r.stderr
    r = CliRunner().invoke(main, ["generate", str(tiny_export("llama")), "hi", "--speculative", "medusa"])
    assert r.exit_code != 0 and "prompt-lookup or draft:EXPORT_DIR" in r.output


def test_lookup_proposes_from_the_prompt_the_output_and_the_adapters_history():
    from prefixport.runtime.generation import RowRequest
    from prefixport.runtime.sampling import SamplingParams

    lookup = PromptLookup(tokens=3, max_ngram=2)
    request = RowRequest([1, 2, 3, 4, 5, 1, 2], 10, SamplingParams(), set())
    assert lookup.propose(request, 10) == [3, 4, 5]  # "1 2" was followed by "3 4 5"
    assert lookup.propose(request, 2) == [3, 4]
    request.tokens = [9]
    assert lookup.propose(request, 10) == []  # "2 9" and "9" never occurred before
    done = RowRequest([7], 10, SamplingParams(), set(), tokens=[9, 8, 6, 5])
    lookup.finished(done)  # the same (no) adapter's output is remembered
    assert lookup.propose(request, 10) == [8, 6, 5]


@pytest.mark.slow
def test_the_default_model_gives_the_same_tokens(default_export, tmp_path):
    """The real default model with the demo's PEFT soft prompt and prefix, and none: extraction
    prompts (where lookup pays), 48 greedy tokens each. (Every PEFT adapter type, with both
    methods: tests/test_adapters_default.py.)"""
    from prefixport.adapters import convert_checkpoint

    demo = Path(__file__).parent.parent / "demo" / "adapters"
    engine = Engine.load(default_export)
    for name in ("json-prompt", "date-prefix"):
        convert_checkpoint(demo / name, default_export, name=name, out=tmp_path / f"{name}.safetensors")
        engine.add_adapter(name, tmp_path / f"{name}.safetensors")
    json_prompt, date_prompt = "Text: Maya is 27 and lives in Lima.\nJSON:", "Date: 4 August 2008\nISO:"
    for adapter, prompt in ((None, json_prompt), ("json-prompt", json_prompt), ("date-prefix", date_prompt),
                            ("date-prefix", json_prompt)):  # each adapter on its task, and one off it
        plain = engine.generate(prompt, adapter=adapter, max_new_tokens=48, stop_token_ids=[])
        spec = engine.generate(prompt, adapter=adapter, max_new_tokens=48, stop_token_ids=[],
                               speculative="prompt-lookup")
        assert spec.token_ids == plain.token_ids, (adapter, prompt)
    assert engine.stats().speculative.prompt_lookup.accepted > 0
    engine.close()
