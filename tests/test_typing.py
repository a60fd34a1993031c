"""The runtime's public API is typed: `mypy --strict` (pyproject's [tool.mypy]) passes on the
runtime and on tests/typed_usage.py, and flags what a typed caller gets wrong."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MISUSE = '''
from prefixport.runtime import Engine

def misuse(engine: Engine) -> None:
    result = engine.generate("x", max_tokens=3)
    if result.finish_reason == "done":
        pass
    engine.stats()["adapters"]
    engine.generate_batch(["a"], per_row=[{"temperature": "hot"}])
'''


def test_mypy_strict_passes_on_the_runtime_and_flags_misuse(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
         str(tmp_path / "cache"), "prefixport/runtime", "tests/typed_usage.py", str(misuse)],
        cwd=ROOT, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert errors and all(line.startswith(str(misuse)) for line in errors), run.stdout + run.stderr
    found = "\n".join(errors)
    assert 'Unexpected keyword argument "max_tokens" for "generate"' in found
    assert "did you mean \"max_new_tokens\"" in found
    assert "Non-overlapping equality check" in found and "'cancelled', 'timeout'" in found  # a Literal
    assert '"EngineStats" is not indexable' in found
    assert '"temperature"' in found and "float" in found  # per-row settings are typed too


def test_the_package_says_it_is_typed():
    assert files("prefixport").joinpath("py.typed").is_file()
    assert 'prefixport = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_the_settings_type_names_every_keyword_prepare_takes():
    from prefixport.runtime import Engine
    from prefixport.runtime.settings import GenerationSettings

    takes = set(inspect.signature(Engine.prepare).parameters) - {"self", "prompt"}
    assert set(GenerationSettings.__annotations__) == takes
