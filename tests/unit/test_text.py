"""Text from tokens: incremental detokenization (`tokenizer.IncrementalDecoder`: split UTF-8
characters held until whole) and stop strings (`text.RowText`: cut across token boundaries,
never emitted), alone and through `Engine.generate` / `stream`."""

from __future__ import annotations

import pytest

from prefixport.runtime.text import RowText
from prefixport.runtime.tokenizer import IncrementalDecoder

from .runs import stop_string_in

TEXT = "The quick brown fox jumps over the lazy dog."
WIDE = "東京は晴れです。 🙂 Grüße"


def _push_all(row: RowText, ids: list[int]) -> list[str]:
    return [row.push(i) for i in ids] + [row.finish()]


def test_split_utf8_characters_are_held_until_whole(engine):
    tok = engine.tokenizer
    ids = tok.encode(WIDE)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 3  # characters split across tokens
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(deltas) == WIDE and not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # something was held back
    assert b"".join(tok.token_bytes(i) for i in ids) == WIDE.encode()  # each token's own bytes


def test_a_stop_string_across_token_boundaries_is_cut_and_never_emitted(engine):
    tok = engine.tokenizer
    ids = tok.encode(TEXT)
    pieces = [tok.decode([i]) for i in ids]
    boundary = len("".join(pieces[:3]))  # between the 3rd and 4th tokens
    stop = TEXT[boundary - 2 : boundary + 3]  # 2 characters of one token, 3 of the next ones
    row = RowText(tok, [stop])
    emitted = ""
    for n, i in enumerate(ids):
        emitted += row.push(i)
        if not row.stopped:  # at most len(stop) - 1 characters are held back
            assert emitted == tok.decode(ids[: n + 1])[: len(emitted)]
            assert len(tok.decode(ids[: n + 1])) - len(emitted) <= len(stop) - 1
    emitted += row.finish()
    assert row.stopped and emitted == row.text == TEXT[: TEXT.index(stop)]
    assert row.push(ids[0]) == "" and row.finish() == ""  # nothing after the stop


def test_the_earliest_stop_string_wins_and_empty_ones_are_ignored(engine):
    ids = engine.tokenizer.encode(TEXT)
    row = RowText(engine.tokenizer, ["lazy", "", "fox", "The quick brown fox jumps over the lazy dog!"])
    assert "".join(_push_all(row, ids)) == row.text == "The quick brown "
    row = RowText(engine.tokenizer, ["晴れ"])  # a stop string of multi-byte characters split across tokens
    assert "".join(_push_all(row, engine.tokenizer.encode(WIDE))) == "東京は" and row.stopped


def test_without_a_stop_the_held_tail_is_flushed_at_the_end(engine):
    ids = engine.tokenizer.encode(WIDE + " " + TEXT)
    row = RowText(engine.tokenizer, ["never there"])
    deltas = _push_all(row, ids)
    assert "".join(deltas) == row.text == engine.tokenizer.decode(ids) and not row.stopped
    assert len(deltas[-1]) >= 1  # the last characters waited for the end


@pytest.mark.parametrize("adapter", [None, "soft", "prefix"])
def test_generate_and_stream_cut_at_a_stop_string(engine, adapter):
    prompt = "Where is parcel 12?"
    free = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[])
    stop = stop_string_in(free.text)
    cut = engine.generate(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], stop=[stop])
    assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 40
    tok = engine.tokenizer
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])  # ends at the stop
    stream = engine.stream(prompt, adapter=adapter, max_new_tokens=40, stop_token_ids=[], stop=stop)
    deltas = list(stream)
    assert "".join(deltas) == cut.text and stream.result.token_ids == cut.token_ids


def test_stream_deltas_join_to_the_text_and_close_cancels(engine):
    for seed in range(3):
        stream = engine.stream(WIDE, max_new_tokens=25, temperature=1.0, seed=seed, stop_token_ids=[])
        deltas = list(stream)
        assert "".join(deltas) == stream.result.text == engine.tokenizer.decode(stream.result.token_ids)
    stream = engine.stream(WIDE, max_new_tokens=25, stop_token_ids=[])
    with stream:
        for n, _ in enumerate(stream):
            if n == 2:
                break
    assert stream.result.finish_reason == "cancelled" and 0 < len(stream.result.token_ids) < 25
    assert list(stream) == []
