"""Shared fixtures: exports of the real default model and of tiny models, built once per session.

The exporter and the tiny models (torch, transformers) are imported inside the fixtures that use
them, so that collecting and running the torch-free unit layer (tests/unit) never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes on these cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def default_export(tmp_path_factory) -> Path:
    """The default model (SmolLM2-135M-Instruct GGUF), exported with LoRA and IA3 inputs (`--lora`:
    every default-model test then runs on a graph that takes them; a row without one computes what
    the plain export does, bit for bit: tests/test_lora.py) and verified."""
    from prefixport.exporter import LoraOptions, export_model

    out = tmp_path_factory.mktemp("default") / "export"
    export_model(out, lora=LoraOptions())
    return out


@pytest.fixture(scope="session")
def default_quantized(default_export, tmp_path_factory):
    """recipe ("int8", "int4", as `--quantize`) -> (folder, MatMuls quantised): the default export
    with quantised weights (built once per recipe; a draft for speculative decoding, and
    tests/test_quantize.py)."""
    import shutil

    from prefixport import manifest as mf
    from prefixport.exporter import optimize

    built: dict[str, tuple[Path, int]] = {}

    def get(kind: str) -> tuple[Path, int]:
        if kind not in built:
            folder = tmp_path_factory.mktemp(kind) / "export"
            shutil.copytree(default_export, folder)
            bits, algorithm = optimize.RECIPES[kind]
            built[kind] = folder, optimize.quantize(folder / mf.MODEL_NAME, bits, algorithm=algorithm)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def default_hf():
    """The default model and tokenizer as transformers loads them (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.exporter.loading import default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """arch -> folder of a tiny random model (built once per arch)."""
    from . import tiny_models

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_models.build(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model):
    """arch -> export folder of its tiny model (exported and verified once per arch)."""
    from prefixport.exporter import export_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"export-{arch}") / "export"
            export_model(out, model=str(tiny_model(arch)))
            built[arch] = out
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_lora_export(tmp_path_factory, tiny_model):
    """arch -> export folder of its tiny model made with `--lora` (LoRA and IA3 inputs, the default
    targets and max rank; exported and verified once per arch). Read it, do not change it."""
    from prefixport.exporter import LoraOptions, export_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"lora-export-{arch}") / "export"
            export_model(out, model=str(tiny_model(arch)), lora=LoraOptions())
            built[arch] = out
        return built[arch]

    return get


@pytest.fixture(scope="session")
def plain_export(tmp_path_factory, tiny_model) -> Path:
    """The tiny Llama exported with plain ONNX ops only (`--no-optimize`): what TensorRT parses, and
    a "copy" KV export (its present is a scratch copied back). Copy it before changing it."""
    from prefixport.exporter import export_model

    out = tmp_path_factory.mktemp("plain") / "export"
    export_model(out, model=str(tiny_model("llama")), optimize=False)
    return out


ADAPTER_VARIANTS = ("prompt", "ptuning-lstm", "prefix", "prefix-projection")


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model, tiny_export):
    """arch -> folder of bundles NAME.safetensors for its tiny export, one per PEFT variant (real
    PEFT checkpoints trained two steps, converted; built once per arch)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from prefixport.adapters import convert_checkpoint

            from . import peft_helpers as ph

            folder, export = tiny_model(arch), tiny_export(arch)
            tok = AutoTokenizer.from_pretrained(folder)
            work = tmp_path_factory.mktemp(f"adapters-{arch}")
            for variant in ADAPTER_VARIANTS:
                ph.train(AutoModelForCausalLM.from_pretrained(folder), variant, tok, work / "peft" / variant, steps=2)
                convert_checkpoint(work / "peft" / variant, export, name=variant, out=work / f"{variant}.safetensors")
            built[arch] = work
        return built[arch]

    return get


@pytest.fixture(scope="module")
def llama_engine(tiny_export, tiny_adapters):
    """An Engine over the tiny Llama export with every adapter variant registered under its name."""
    from prefixport.runtime import Engine

    engine = Engine.load(tiny_export("llama"))
    for name in ADAPTER_VARIANTS:
        engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def llama_cache_pair(tiny_export, tiny_adapters):
    """The tiny Llama export twice, with and without a prompt cache, every adapter variant registered."""
    from prefixport.runtime import Engine

    engines = (Engine.load(tiny_export("llama")), Engine.load(tiny_export("llama"), prompt_cache_bytes=0))
    for engine in engines:
        for name in ADAPTER_VARIANTS:
            engine.add_adapter(name, tiny_adapters("llama") / f"{name}.safetensors")
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def served(tiny_export, tiny_adapters, tmp_path_factory):
    """A server over the tiny Llama export with all four adapter kinds: (engine, url, folder, Server)."""
    import shutil

    from prefixport.runtime import Engine
    from prefixport.server import ServerSettings, create_app
    from prefixport.server.tenants import Access

    from .helpers import running

    folder = tmp_path_factory.mktemp("served-adapters")
    for name in ADAPTER_VARIANTS:
        shutil.copy(tiny_adapters("llama") / f"{name}.safetensors", folder)
    engine = Engine.load(tiny_export("llama"))
    # adapter admin on (no keys: every caller is an admin): the tests register and delete adapters
    app = create_app(engine, ServerSettings(model_name="tiny", adapters_dir=folder, max_batch=8),
                     access=Access(adapter_admin=True))
    with running(app) as url:
        yield engine, url, folder, app.state.server
    engine.close()


DEFAULT_MODEL_FIXTURES = {"default_export", "default_hf"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """pytest-xdist's `--dist loadgroup --no-loadscope-reorder` (scripts/test.sh): the tests of the
    real default model are one group, handed out first (the longest: the worker that takes it
    exports and loads the model once); each other file is a group (its module fixtures, a server or
    a Ray cluster, are built once)."""
    if not getattr(config.option, "loadgroup", False):  # set in pytest-xdist's workers
        return
    default = {item for item in items if DEFAULT_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("default-model" if item in default else item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item not in default)  # stable: each group keeps its order


def pytest_configure(config):
    """pytest-xdist 3.8 groups tests by renaming them (`ID@group`), which pytest 9 ignores: the groups
    would silently vanish (the default model exported on every worker), so refuse that pairing."""
    if getattr(config.option, "dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(f"--dist loadgroup does not group tests under pytest {pytest.__version__}: "
                                "install the pytest that pyproject.toml pins (pip install -e '.[dev]')")
