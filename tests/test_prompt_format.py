"""An adapter's prompt format (raw, chat, a template): recorded in the bundle at conversion, read
back and checked, and applied by the CLI, the Engine and the server unless the caller overrides it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from prefixport.adapters import PromptFormat, convert_checkpoint, load_bundle
from prefixport.adapters.prompt_format import messages_text
from prefixport.cli import main
from prefixport.errors import AdapterError

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


def test_messages_become_one_text_in_order():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": ""}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Date: May 1, 2003\nISO:"}]
    assert messages_text(messages) == "Be brief.\n\nHi\n\nHello.\n\nDate: May 1, 2003\nISO:"


# --- recorded in the bundle -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["raw", "chat", TEMPLATE])
def test_convert_records_the_format_and_reads_it_back(llama, tmp_path, spec):
    export, peft = llama
    bundle, path = convert_checkpoint(peft / "prefix", export, out=tmp_path / "a.safetensors", prompt_format=spec)
    assert bundle.prompt_format == PromptFormat(spec)
    read = load_bundle(path)
    assert read.metadata["format_version"] == "2" and read.metadata["prompt_format"] == spec
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
