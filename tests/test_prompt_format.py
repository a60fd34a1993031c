"""An adapter's prompt format (raw, chat, a template): recorded in the bundle at conversion, read
back and checked, and applied by the CLI, the Engine and the server unless the caller overrides it."""

from __future__ import annotations

import openai
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from prefixport.adapters import PromptFormat, convert_checkpoint, load_bundle
from prefixport.adapters.prompt_format import render, user_text
from prefixport.cli import main
from prefixport.errors import AdapterError, InputError

TEMPLATE = "Question: {prompt}\nAnswer:"
BAD_TEMPLATES = [("Q: {question}", "has \\{question\\}"), ("no field at all", "has no field"),
                 ("{prompt} and {prompt}", "has \\{prompt\\}, \\{prompt\\}"), ("Q: {prompt", "expected '}'"),
                 ("Q: {prompt} }", "Single '}'"), ("{prompt!r}", "without a conversion"),
                 ("{prompt:>9}", "without a conversion"), ("{} {prompt}", "has \\{\\}, \\{prompt\\}"),
                 ("{prompt.x}", "has \\{prompt.x\\}")]


@pytest.fixture(scope="module")
def llama(tiny_export, tiny_adapters):
    """The tiny Llama export and the folder of its real PEFT checkpoints (peft/VARIANT)."""
    return tiny_export("llama"), tiny_adapters("llama") / "peft"


# --- the format itself ----------------------------------------------------------------------------

def test_formats_parse_and_fill():
    assert PromptFormat.parse("raw").fill("a {b}") == "a {b}"
    assert PromptFormat.parse("chat").chat and not PromptFormat.parse("raw").chat
    template = PromptFormat.parse("Q: {prompt} {{json}}")
    assert template.fill("a {b} {prompt}") == "Q: a {b} {prompt} {json}"  # the text's braces stay as they are
    assert PromptFormat.parse(TEMPLATE).fill("2+2?") == "Question: 2+2?\nAnswer:"
    for spec, message in BAD_TEMPLATES:
        with pytest.raises(AdapterError, match=message):
            PromptFormat.parse(spec)


def test_chat_messages_give_a_raw_or_template_adapter_their_last_user_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Date: May 1, 2003\nISO:"},
                {"role": "assistant", "content": ""}]
    assert user_text(messages) == "Date: May 1, 2003\nISO:"
    raw, template = PromptFormat.parse("raw"), PromptFormat.parse(TEMPLATE)
    assert render(messages, template, chat_template=None) == "Question: Date: May 1, 2003\nISO:\nAnswer:"
    assert render("x", PromptFormat.parse("chat"), chat_template=lambda m: repr(m)) == repr([{"role": "user",
                                                                                             "content": "x"}])
    with pytest.raises(InputError, match="no user message"):
        render(messages[:1], raw, chat_template=None)
    with pytest.raises(InputError, match="must be text"):
        user_text([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


# --- recorded in the bundle -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["raw", "chat", TEMPLATE])
def test_convert_records_the_format_and_reads_it_back(llama, tmp_path, spec):
    export, peft = llama
    bundle, path = convert_checkpoint(peft / "prefix", export, out=tmp_path / "a.safetensors", prompt_format=spec)
    assert bundle.prompt_format == PromptFormat(spec)
    read = load_bundle(path)
    assert read.metadata["format_version"] == "3" and read.metadata["prompt_format"] == spec
    assert read.prompt_format == PromptFormat(spec)


def test_cli_convert_records_the_format_and_inspect_shows_it(llama, tmp_path):
    export, peft = llama
    runner = CliRunner()
    out = tmp_path / "q.safetensors"
    r = runner.invoke(main, ["adapter", "convert", str(peft / "prompt"), "--export", str(export), "--out", str(out),
                             "--prompt-format", TEMPLATE])
    assert r.exit_code == 0, r.output
    assert f"prompt format {TEMPLATE!r}" in r.output and load_bundle(out).prompt_format == PromptFormat(TEMPLATE)
    r = runner.invoke(main, ["adapter", "inspect", str(out)])
    assert r.exit_code == 0 and f"prompt format: {TEMPLATE!r}" in r.output, r.output
    baked = tmp_path / "baked.safetensors"  # a soft prompt baked into a prefix keeps its format
    r = runner.invoke(main, ["adapter", "convert", str(peft / "prompt"), "--export", str(export), "--out", str(baked),
                             "--prompt-format", "chat", "--bake-prefix"])
    assert r.exit_code == 0 and load_bundle(baked).prompt_format == PromptFormat("chat"), r.output
    assert load_bundle(baked).kind == "prefix"
    runner.invoke(main, ["adapter", "convert", str(peft / "prompt"), "--export", str(export), "--out", str(out)])
    assert load_bundle(out).prompt_format is None and "prompt_format" not in load_bundle(out).metadata
    assert "prompt format: not recorded" in runner.invoke(main, ["adapter", "inspect", str(out)]).output


def test_a_version_1_bundle_without_the_field_loads(llama, tmp_path):
    export, peft = llama
    bundle, path = convert_checkpoint(peft / "prefix", export, out=tmp_path / "old.safetensors")
    save_file(bundle.tensors, str(path), metadata=bundle.metadata | {"format_version": "1"})  # as version 1 wrote it
    old = load_bundle(path)
    assert old.metadata["format_version"] == "1" and old.prompt_format is None


def test_a_bad_template_is_refused_at_convert_and_at_load(llama, tmp_path):
    export, peft = llama
    out = tmp_path / "bad.safetensors"
    for spec, message in BAD_TEMPLATES[:3]:
        with pytest.raises(AdapterError, match=f"--prompt-format.*{message}"):
            convert_checkpoint(peft / "prefix", export, out=out, prompt_format=spec)
    assert not out.exists()
    r = CliRunner().invoke(main, ["adapter", "convert", str(peft / "prefix"), "--export", str(export),
                                  "--out", str(out), "--prompt-format", "Q: {question}"])
    assert r.exit_code == 1 and "neither raw, chat nor a template with exactly one {prompt}" in r.output
    bundle, path = convert_checkpoint(peft / "prefix", export, out=out, prompt_format="raw")
    for version in ("1", "2"):
        save_file(bundle.tensors, str(path), metadata=bundle.metadata | {"format_version": version,
                                                                         "prompt_format": "Q: {prompt"})
        with pytest.raises(AdapterError, match=f"{path}: prompt_format.*expected '}}'"):
            load_bundle(path)


# --- applied by the Engine ------------------------------------------------------------------------

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def formatted(llama, tmp_path_factory):
    """The tiny Llama engine with one prefix adapter (a real PEFT checkpoint) converted four times:
    raw, chat, a template and without a format (`none`); the bundles' folder."""
    from prefixport.runtime import Engine

    export, peft = llama
    folder = tmp_path_factory.mktemp("formatted")
    engine = Engine.load(export)
    for name, spec in (("raw", "raw"), ("chat", "chat"), ("tmpl", TEMPLATE), ("none", None)):
        _, path = convert_checkpoint(peft / "prefix", export, out=folder / f"{name}.safetensors", prompt_format=spec)
        engine.add_adapter(name, path)
    yield engine, folder
    engine.close()


def test_engine_encodes_a_text_in_the_adapters_format_unless_told(formatted):
    engine, _ = formatted
    tok = engine.tokenizer
    raw, chat = tok.encode(PROMPT), engine.encode(PROMPT, chat=True)
    filled = tok.encode(f"Question: {PROMPT}\nAnswer:")
    assert chat == tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    assert len({tuple(raw), tuple(chat), tuple(filled)}) == 3
    assert engine.encode(PROMPT) == raw  # no adapter: raw, as before
    expected = {"raw": raw, "chat": chat, "tmpl": filled, "none": raw}
    for adapter, ids in expected.items():
        assert engine.encode(PROMPT, adapter=adapter) == ids, adapter
        assert engine.encode(PROMPT, chat=True, adapter=adapter) == chat, adapter  # the caller overrides
        assert engine.encode(PROMPT, chat=False, adapter=adapter) == raw, adapter
    # chat messages: the chat template, unless the adapter's format is raw or a template (the last user message)
    templated = engine.encode(MESSAGES)
    assert templated == tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    expected = {"raw": raw, "chat": templated, "tmpl": filled, "none": templated}
    for adapter, ids in expected.items():
        assert engine.encode(MESSAGES, adapter=adapter) == ids, adapter
        assert engine.encode(MESSAGES, chat=True, adapter=adapter) == templated, adapter
        assert engine.encode(MESSAGES, chat=False, adapter=adapter) == raw, adapter
    # token ids are never reformatted
    assert engine.encode(raw, adapter="tmpl") == raw and engine.encode(raw, chat=True, adapter="chat") == raw


def test_generate_stream_batch_and_prepare_apply_the_format(formatted):
    engine, _ = formatted
    filled = engine.tokenizer.encode(f"Question: {PROMPT}\nAnswer:")
    kw = dict(max_new_tokens=6, stop_token_ids=[])
    want = engine.generate(filled, adapter="tmpl", **kw)
    got = engine.generate(PROMPT, adapter="tmpl", **kw)
    assert (got.token_ids, got.prompt_tokens) == (want.token_ids, len(filled))
    stream = engine.stream(PROMPT, adapter="tmpl", **kw)
    assert "".join(stream) == want.text and stream.result.prompt_tokens == len(filled)
    assert engine.prepare(PROMPT, adapter="tmpl", max_new_tokens=4).prompt_ids == filled
    assert engine.prepare(PROMPT, adapter="tmpl", chat=False, max_new_tokens=4).prompt_ids == engine.encode(PROMPT)
    adapters = ["raw", "chat", "tmpl", "none", None, "tmpl"]
    prompts = [PROMPT] * 5 + [filled]
    batch = engine.generate_batch(prompts, adapters=adapters, **kw)
    for prompt, adapter, row in zip(prompts, adapters, batch):
        ids = engine.encode(prompt, adapter=adapter)
        assert row.prompt_tokens == len(ids) and row.token_ids == engine.generate(ids, adapter=adapter, **kw).token_ids
    assert batch[2].token_ids == batch[5].token_ids == want.token_ids
    with pytest.raises(AdapterError, match="no adapter named 'nope' is registered \\(registered: chat, none"):
        engine.generate(PROMPT, adapter="nope")


def test_engine_reads_the_format_of_an_old_bundle_and_refuses_a_bad_one(formatted, tmp_path):
    engine, folder = formatted
    bundle = load_bundle(folder / "raw.safetensors")
    old = tmp_path / "old.safetensors"
    meta = {k: v for k, v in bundle.metadata.items() if k != "prompt_format"} | {"format_version": "1"}
    save_file(bundle.tensors, str(old), metadata=meta)
    engine.add_adapter("old", old)
    assert engine.encode(PROMPT, adapter="old") == engine.encode(PROMPT)  # unknown: as before
    bad = tmp_path / "bad.safetensors"
    save_file(bundle.tensors, str(bad), metadata=bundle.metadata | {"prompt_format": "Q: {question}"})
    with pytest.raises(AdapterError, match="prompt_format.*exactly one \\{prompt\\}"):
        engine.add_adapter("bad", bad)
    assert "bad" not in engine.adapters
    engine.remove_adapter("old")


# --- applied by `prefixport generate` ---------------------------------------------------------------

def _prompt_tokens(stderr: str) -> int:
    import re

    return int(re.search(r"\((\d+) prompt tokens\)", stderr).group(1))


def test_cli_generate_applies_the_adapters_format_unless_a_flag_says(formatted, llama):
    engine, folder = formatted
    export, _ = llama
    assert engine.tokenizer.chat_template is not None  # so the default without a format is chat
    raw, chat = len(engine.encode(PROMPT)), len(engine.encode(PROMPT, chat=True))
    filled = len(engine.encode(PROMPT, adapter="tmpl"))
    cases = [("raw", [], raw), ("raw", ["--chat"], chat), ("chat", [], chat), ("chat", ["--raw"], raw),
             ("tmpl", [], filled), ("tmpl", ["--raw"], raw), ("tmpl", ["--chat"], chat),
             ("none", [], chat), ("none", ["--raw"], raw), (None, [], chat), (None, ["--raw"], raw)]
    runner = CliRunner()
    for adapter, flags, expected in cases:
        where = ["--adapter", str(folder / f"{adapter}.safetensors")] if adapter else []
        r = runner.invoke(main, ["generate", str(export), PROMPT, "--max-new-tokens", "3", *where, *flags])
        assert r.exit_code == 0, r.output
        assert _prompt_tokens(r.stderr) == expected, (adapter, flags, r.stderr)
    ids = engine.encode(PROMPT, adapter="tmpl")
    r = runner.invoke(main, ["generate", str(export), PROMPT, "--max-new-tokens", "6", "--adapter",
                             str(folder / "tmpl.safetensors")])
    assert r.stdout == engine.generate(ids, adapter="tmpl", max_new_tokens=6).text + "\n"


# --- applied by the server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(formatted, llama):
    """`create_app` over the tiny Llama export serving the four bundles of `formatted`: (Server, client)."""
    from openai import OpenAI

    from prefixport.runtime import Engine
    from prefixport.server import ServerSettings, create_app

    from .helpers import running

    _, folder = formatted
    engine = Engine.load(llama[0])
    app = create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder))
    with running(app) as url:
        yield app.state.server, OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    engine.close()


def test_server_completions_give_a_text_the_adapters_format(served):
    server, client = served
    engine, tok = server.engine, server.engine.tokenizer
    assert sorted(engine.adapters) == ["chat", "none", "raw", "tmpl"]
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    expected = {"raw": tok.encode(PROMPT), "chat": chat, "tmpl": tok.encode(f"Question: {PROMPT}\nAnswer:"),
                "none": tok.encode(PROMPT), "tiny": tok.encode(PROMPT)}
    for model, ids in expected.items():
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
        adapter = None if model == "tiny" else model
        assert r.usage.prompt_tokens == len(ids), model
        assert r.choices[0].text == engine.generate(ids, adapter=adapter, max_new_tokens=4).text, model
    ids = expected["raw"]  # token ids are never reformatted
    r = client.completions.create(model="tmpl", prompt=ids, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


def test_server_chat_to_a_raw_or_template_adapter_sends_the_last_user_message(served):
    from prefixport.server.protocol import ChatRequest

    server, client = served
    engine, tok = server.engine, server.engine.tokenizer
    templated = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    expected = {"raw": tok.encode(PROMPT), "tmpl": tok.encode(f"Question: {PROMPT}\nAnswer:"), "chat": templated,
                "none": templated, "tiny": templated}
    for model, ids in expected.items():
        adapter = None if model == "tiny" else model
        body = ChatRequest(model=model, messages=MESSAGES)
        assert server.prompts(body, adapter)[0] == [ids], model  # the exact ids the engine is given
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(ids), model
        assert r.choices[0].message.content == engine.generate(ids, adapter=adapter, max_new_tokens=4).text, model
    # the last user message reaches a raw adapter as its text alone, exactly as /v1/completions sends it
    turns = [*MESSAGES, {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "Numbers: 0 1 2"}]
    r = client.chat.completions.create(model="raw", messages=turns, max_tokens=4, temperature=0)
    c = client.completions.create(model="raw", prompt="Numbers: 0 1 2", max_tokens=4, temperature=0)
    assert (r.usage.prompt_tokens, r.choices[0].message.content) == (c.usage.prompt_tokens, c.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client.chat.completions.create(model="tmpl", messages=MESSAGES[:1], max_tokens=4)


# --- the demo date adapter through chat, on the real default model ---------------------------------

@pytest.mark.slow
def test_the_demo_date_adapter_answers_through_chat(default_export, tmp_path):
    """demo/adapters/date-prefix was trained on raw prompts; converted with its format (`raw`), a chat
    request (Engine and HTTP, a system message included) answers as the raw prompt does, right.
    Converted without a format, chat wraps the date in the chat template and the answer differs
    (it was empty: the bug this fixes)."""
    import sys
    from pathlib import Path

    from openai import OpenAI

    from prefixport.runtime import Engine
    from prefixport.server import ServerSettings, create_app

    from .helpers import running

    demo = Path(__file__).resolve().parents[1] / "demo"
    sys.path.insert(0, str(demo))
    import tasks

    folder = tmp_path / "adapters"
    convert_checkpoint(demo / "adapters" / "date-prefix", default_export, out=folder / "date-prefix.safetensors",
                       prompt_format=tasks.PROMPT_FORMAT)
    assert tasks.PROMPT_FORMAT == "raw"
    _, unknown = convert_checkpoint(demo / "adapters" / "date-prefix", default_export,
                                    out=tmp_path / "unknown.safetensors")
    engine = Engine.load(default_export)
    engine.add_adapter("unknown", unknown)
    app = create_app(engine, ServerSettings(adapters_dir=folder))  # registers date-prefix
    _, test = tasks.split("date")
    system = {"role": "system", "content": "You are a helpful assistant."}
    with running(app) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for ex in test[:3]:
            user = {"role": "user", "content": ex["prompt"]}
            raw = engine.generate(ex["prompt"], adapter="date-prefix", chat=False, max_new_tokens=12)
            assert tasks.correct("date", raw.text, ex["target"]), (ex, raw.text)
            for messages in ([user], [system, user]):
                got = engine.generate(messages, adapter="date-prefix", max_new_tokens=12)
                assert (got.text, got.prompt_tokens) == (raw.text, raw.prompt_tokens), (ex, messages)
                r = client.chat.completions.create(model="date-prefix", messages=messages, max_tokens=12,
                                                   temperature=0)
                assert r.choices[0].message.content == raw.text and r.usage.prompt_tokens == raw.prompt_tokens
            assert engine.generate([user], adapter="unknown", max_new_tokens=12).text != raw.text
    engine.close()
