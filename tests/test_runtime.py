"""The runtime on its own: no torch, sampling, streaming, input checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prefixport.errors import ExportFolderError, InputError
from prefixport.runtime import Engine, SamplingParams
from prefixport.runtime.sampling import sample
from prefixport.runtime.tokenizer import IncrementalDecoder


@pytest.fixture(scope="module")
def engine(tiny_export):
    e = Engine.load(tiny_export("llama"))
    yield e
    e.close()


def test_runtime_and_server_import_no_torch_or_transformers(tiny_export):
    code = textwrap.dedent(f"""
        import sys
        from prefixport.runtime import Engine
        from prefixport.server import create_app
        import prefixport.cli
        import prefixport.engines, prefixport.engines.build, prefixport.runtime.cuda
        import prefixport.runtime.backends.tensorrt
        engine = Engine.load({str(tiny_export("llama"))!r})
        r = engine.generate("The quick", max_new_tokens=5)
        assert len(r.token_ids) >= 1, r
        create_app(engine).state.server.scheduler.close()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_seeded_sampling_is_reproducible(engine):
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, stop_token_ids=[])
    a = engine.generate("The quick", seed=7, **kwargs).token_ids
    assert a == engine.generate("The quick", seed=7, **kwargs).token_ids
    others = [engine.generate("The quick", seed=s, **kwargs).token_ids for s in (8, 9, 10)]
    assert any(o != a for o in others)


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 1.0, 5.0, 4.9, -3.0]])
    top2 = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), rng)[0]) for _ in range(200)}
    assert top2 == {2, 3}
    # top_p=0.5: token 2 alone carries ~52% of the mass, so only it survives
    nucleus = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.5), rng)[0]) for _ in range(100)}
    assert nucleus == {2}
    assert int(sample(logits, SamplingParams(), rng)[0]) == 2
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(temperature=float("nan"))):
        with pytest.raises(InputError):
            SamplingParams(**bad)


def test_stream_deltas_join_to_text(engine):
    for seed in range(3):
        stream = engine.stream("Grüße aus", max_new_tokens=30, temperature=1.0, seed=seed)
        deltas = list(stream)
        assert "".join(deltas) == stream.result.text
        assert stream.result.text == engine.tokenizer.decode(stream.result.token_ids)


def test_incremental_decoder_holds_back_split_characters(engine):
    text = "東京は晴れです。 🙂 Grüße"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in engine.tokenizer.decode([i]) for i in ids)  # characters split across tokens
    decoder = IncrementalDecoder(engine.tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "" in deltas[:-1]  # something was held back
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_result_fields_and_stop_tokens(engine):
    ids = engine.encode("The quick brown")
    free = engine.generate(ids, max_new_tokens=12, stop_token_ids=[])
    assert len(free.token_ids) == 12 and free.finish_reason == "length" and free.prompt_tokens == len(ids)
    stop = free.token_ids[4]
    cut = engine.generate(ids, max_new_tokens=12, stop_token_ids=[stop])
    first = free.token_ids.index(stop)
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_chat_template_matches_transformers(engine, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.tokenizer.apply_chat_template(messages) == expected
    assert engine.encode(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)


def test_bad_requests_are_refused_before_any_work(engine):
    limit = engine.manifest.max_positions
    with pytest.raises(InputError, match="context"):
        engine.generate("The quick", max_new_tokens=limit)
    with pytest.raises(InputError, match="context"):
        engine.generate([5] * (limit + 1), max_new_tokens=1)
    with pytest.raises(InputError, match="empty"):
        engine.generate("")
    with pytest.raises(InputError, match="out of range"):
        engine.generate([1, engine.manifest.vocab_size])
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.generate("The", max_new_tokens=0)
    # the engine is still fine afterwards
    assert engine.generate("The quick", max_new_tokens=3, stop_token_ids=[]).token_ids


def test_loading_a_folder_that_is_not_an_export(tmp_path, tiny_export):
    (tmp_path / "notes.txt").write_text("not an export")
    hint = "; check the path, or make an export with `prefixport export OUTDIR`"
    for path, says in ((tmp_path, " holds no prefixport export (no prefixport.json)"),
                       (tmp_path / "missing", " is not a folder"), (tmp_path / "notes.txt", " is not a folder")):
        with pytest.raises(ExportFolderError) as error:
            Engine.load(path)
        assert str(error.value) == f"{path}{says}{hint}"  # not "export into it": the path may be wrong
    with pytest.raises(ExportFolderError, match="holds no prefixport export"):
        Engine.load(tiny_export("llama"), draft=tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prefixport.json").write_text("{not json")
    with pytest.raises(ExportFolderError, match="cannot be read"):
        Engine.load(broken)
