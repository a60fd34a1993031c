"""Fuzzing of the HTTP server's request bodies: a short run of `python -m tools.fuzz_requests`'s
harness against `prefixport serve` (a subprocess) over the tiny Llama and its adapters, with the
cases of tools/fuzz_request_cases.py (the full 10,000-case run and its counts are under
benchmarks/results/fuzz_requests/)."""

from __future__ import annotations

import json

import pytest

from tools.fuzz_request_cases import FAMILIES, Target, make_case, schedule
from tools.fuzz_requests import Answer, classify, run_fuzz

CASES = 300
SEED = 1  # the full run uses seed 0: these are other cases
TARGET = Target("base", ("prefix", "prompt"), ("prefix.safetensors", "prompt.safetensors"), 400, 256)


def _describe(result: dict) -> str:
    """The failure groups: cause, cases, the message or the traceback's end (`--replay` for more)."""
    return "\n".join(f"{g['count']} x {g['cause']}, e.g. {g['cases'][:3]}: {g['summary'] or g['message'][:200]}"
                     for g in result["groups"][:10])


def test_a_case_is_rebuilt_from_its_seed_and_index():
    """`--replay S:i` relies on it: the same seed and index make the same request, in every family."""
    seen = set()
    for index in range(len(schedule())):
        a, b = make_case(SEED, index, TARGET), make_case(SEED, index, TARGET)
        assert a == b, index
        seen.add(a.family)
    assert seen == set(FAMILIES)
    assert make_case(SEED, 0, TARGET) != make_case(SEED + 1, 0, TARGET)


@pytest.mark.parametrize("status, content_type, body, outcome", [
    (200, "application/json", b'{"object": "text_completion", "choices": [{"index": 0, "text": "x"}], "usage": {}}',
     "ok"),
    (200, "application/json", b'{"object": "text_completion"}', "bad_shape"),
    (200, "text/plain", b"hello", "bad_shape"),
    (200, "text/event-stream", b'data: {"object": "text_completion", "choices": []}\n\n', "bad_shape"),  # no [DONE]
    (200, "text/event-stream", b'data: {"object": "text_completion", "choices": []}\n\ndata: [DONE]\n\n', "ok"),
    (200, "text/event-stream", b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n', "server_error"),
    (400, "application/json", b'{"error": {"message": "no", "type": "invalid_request_error"}}', "refused"),
    (400, "application/json", b'{"error": {"message": ""}}', "bad_shape"),
    (422, "application/json", b'{"detail": "no"}', "bad_shape"),
    (500, "application/json", b'{"error": {"message": "internal error"}}', "server_error"),
    (503, "text/plain", b"busy", "server_error"),
])
def test_the_harness_classifies_answers(status, content_type, body, outcome):
    """Each outcome the fuzzer counts, from a made-up answer (a wrong one would pass vacuously)."""
    case = make_case(SEED, schedule().index("valid"), TARGET)
    case.route = "completions"
    assert classify(case, Answer(status, content_type, body))[0] == outcome
    assert classify(case, Answer(error="ReadError"))[0] == "crash"
    assert classify(case, Answer(timed_out=True))[0] == "hang"


def test_fuzz_request_bodies(tiny_export, tiny_adapters, tmp_path):
    export, adapters = tiny_export("llama"), tiny_adapters("llama")
    bundles = sorted(adapters.glob("*.safetensors"))
    r = run_fuzz(export, bundles, CASES, seed=SEED, work=tmp_path / "work", reproducers=tmp_path / "reproducers")
    t = r["totals"]
    assert (t["server_error"], t["crash"], t["hang"], t["bad_shape"]) == (0, 0, 0, 0), _describe(r)
    assert t["cases"] == CASES and t["ok"] + t["refused"] == CASES
    assert r["server"]["starts"] == 1 and not r["deaths"]
    # the server still answers a second user key's plain requests, the same greedy text as at the start
    assert r["still_answers"] and r["probes_ok"] == len(r["probes"]), r["probes"]
    assert r["probe_answers_unchanged"], r["probes"]
    # no vacuous pass: every family sent cases; valid requests were answered (a DELETE of a name not
    # registered at that moment is the one refusal they may get); every mutation family was refused
    for name, f in r["families"].items():
        assert f["cases"] > 0, name
        assert all(m["message"].strip() for m in f["messages"]), name
        if name == "valid":
            assert f["ok"] > 0 and set(k for k, v in f["kinds"].items() if v.get("refused")) <= {"adapter_delete"}, f
        else:
            assert f["refused"] > 0, (name, f["kinds"])
    assert not (tmp_path / "reproducers").exists()
    json.dumps(r)  # the report is JSON as it is
