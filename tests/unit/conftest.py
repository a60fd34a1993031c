"""Fixtures of the unit layer: a toy export (numpy model, BPE tokenizer, adapter bundles) built once
per session in a temporary folder, and engines over it. Nothing here imports torch or
transformers (tests/unit/test_no_torch.py checks it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from tokenizers import Tokenizer as HFTokenizer

from prefixport import manifest as mf
from prefixport.runtime import Engine

from .numpy_model import ToyModel
from .toy_export import ADAPTERS, open_engine, toy_model, train_tokenizer, write_adapters, write_export

HERE = Path(__file__).parent
HEAVY = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime")  # never imported here


@pytest.fixture(scope="session", autouse=True)
def torch_free(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a session runs unit tests only, it ends without torch, transformers or ONNX imported."""
    yield
    if all(Path(str(item.path)).is_relative_to(HERE) for item in request.session.items):
        loaded = sorted(m for m in HEAVY if m in sys.modules)
        assert not loaded, f"the unit layer imported {loaded}: keep tests/unit free of them"


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ToyModel]:
    """(folder, model): the toy export ("shared" cache) and its weights; bundles in folder/adapters."""
    folder = tmp_path_factory.mktemp("toy") / "export"
    tokenizer = train_tokenizer()
    model = toy_model(tokenizer)
    manifest = write_export(folder, tokenizer, model)
    write_adapters(folder, manifest)
    return folder, model


@pytest.fixture(scope="session")
def toy_copy(tmp_path_factory: pytest.TempPathFactory, toy: tuple[Path, ToyModel]) -> tuple[Path, ToyModel]:
    """The same model exported with a "copy" cache (a `--no-optimize` graph's binding)."""
    folder = tmp_path_factory.mktemp("toy-copy") / "export"
    write_export(folder, HFTokenizer.from_file(str(toy[0] / mf.TOKENIZER_NAME)), toy[1], cache="copy")
    return folder, toy[1]


@pytest.fixture(scope="session")
def manifest(toy: tuple[Path, ToyModel]) -> mf.Manifest:
    return mf.Manifest.load(toy[0])


@pytest.fixture
def make_engine(toy: tuple[Path, ToyModel]) -> Iterator[Callable[..., Engine]]:
    """make_engine(adapters=True, folder=None, **options) -> an Engine over the toy export (every
    `ADAPTERS` bundle registered from its file unless adapters=False); closed after the test."""
    engines: list[Engine] = []

    def make(adapters: bool = True, folder: Path | None = None, **options: Any) -> Engine:
        root = folder or toy[0]
        engine = open_engine(root, toy[1], **options)
        engines.append(engine)
        if adapters:
            for name in ADAPTERS:
                engine.add_adapter(name, toy[0] / "adapters" / f"{name}.safetensors")
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    """An engine with every `ADAPTERS` bundle registered: soft (4 virtual tokens), soft6, prefix (5), prefix3."""
    return make_engine()
