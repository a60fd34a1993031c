"""The unit layer runs without torch: a fresh interpreter imports every module of tests/unit, the
conftests above it and the runtime, runs the toy engine through a scheduler, and has imported
neither torch, transformers, peft nor ONNX (nor ONNX Runtime: no session is ever opened)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import HEAVY

ROOT = Path(__file__).resolve().parents[2]

CODE = textwrap.dedent("""
    import importlib, pkgutil, sys, tempfile
    from pathlib import Path

    import tests.conftest, tests.unit
    for info in pkgutil.iter_modules(tests.unit.__path__):
        importlib.import_module(f"tests.unit.{info.name}")
    from prefixport.runtime import Scheduler
    from tests.unit.toy_export import open_engine, toy_model, train_tokenizer, write_adapters, write_export

    folder = Path(tempfile.mkdtemp()) / "export"
    tokenizer = train_tokenizer()
    model = toy_model(tokenizer)
    paths = write_adapters(folder, write_export(folder, tokenizer, model))
    engine = open_engine(folder, model)
    engine.add_adapter("prefix", paths["prefix"])
    with Scheduler(engine) as scheduler:
        assert len(scheduler.generate("Hi", adapter="prefix", max_new_tokens=3, stop_token_ids=[]).token_ids) == 3
    print(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
""")


def test_the_unit_layer_imports_no_torch_transformers_or_onnx(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{CODE}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
