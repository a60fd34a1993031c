"""Bad input to `prefixport export`: a clear error, and nothing half-written left behind."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from transformers import OPTConfig

from prefixport import exporter
from prefixport.cli import main
from prefixport.errors import ExportError


def run(*args):
    return CliRunner().invoke(main, list(args))


def leftovers(folder):
    return [p.name for p in folder.iterdir() if "partial" in p.name]


def test_unknown_model_spec(tmp_path):
    r = run("export", str(tmp_path / "out"), "--model", "no-such-model")
    assert r.exit_code == 1
    assert "local Hugging Face cache" in r.output and "nothing is downloaded" in r.output
    assert not (tmp_path / "out").exists()


def test_missing_folder_and_bad_files(tmp_path):
    r = run("export", str(tmp_path / "out"), "--model", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "no such file or folder" in r.output
    (tmp_path / "empty").mkdir()
    r = run("export", str(tmp_path / "out"), "--model", str(tmp_path / "empty"))
    assert r.exit_code == 1 and "without config.json" in r.output
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    r = run("export", str(tmp_path / "out"), "--model", str(tmp_path / "weights.bin"))
    assert r.exit_code == 1 and "not a .gguf file" in r.output
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    model = tmp_path / "opt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(OPTConfig(hidden_size=16, num_hidden_layers=1).to_dict()))
    r = run("export", str(tmp_path / "out"), "--model", str(model))
    assert r.exit_code == 1
    assert "'opt' is not supported" in r.output
    for arch in ("llama", "gpt2", "qwen2", "mistral", "phi3", "gemma3_text"):
        assert arch in r.output


def test_corrupt_weights(tmp_path, tiny_model):

    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run("export", str(tmp_path / "out"), "--model", str(model))
    assert r.exit_code == 1 and "cannot load the weights" in r.output
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_output_folder_that_is_not_an_export(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run("export", str(out), "--model", str(tiny_model("llama")))
    assert r.exit_code == 1 and "not a prefixport export" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_existing_export_needs_overwrite(tmp_path, tiny_model, tiny_export):

    out = tmp_path / "out"
    shutil.copytree(tiny_export("gpt2"), out)
    before = (out / "prefixport.json").read_text()
    r = run("export", str(out), "--model", str(tiny_model("llama")))
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert (out / "prefixport.json").read_text() == before
    r = run("export", str(out), "--model", str(tiny_model("llama")), "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "prefixport.json").read_text())["architecture"] == "llama"
    assert "verified against PyTorch: logits max abs diff" in r.output


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_export_leaves_nothing(tmp_path, tiny_model, monkeypatch, fault):
    """A fault after the graph was written (here, during verification) removes the partial folder."""

    def fail(*args, **kwargs):
        raise fault

    monkeypatch.setattr(exporter.export, "verify", fail)
    expected = KeyboardInterrupt if fault is KeyboardInterrupt else ExportError
    with pytest.raises(expected):
        exporter.export_model(tmp_path / "out", model=str(tiny_model("llama")))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 300 KB filesystem (tmpfs; needs root, as in CI and on the developers' machines)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}): needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(small_disk, tiny_model):
    r = run("export", str(small_disk / "out"), "--model", str(tiny_model("llama")))
    assert r.exit_code == 1 and "no space left on the device" in r.output and "MB free" in r.output, r.output
    assert list(small_disk.iterdir()) == []


def test_missing_weights(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    (model / "model.safetensors").unlink()
    r = run("export", str(tmp_path / "out"), "--model", str(model))
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_too_old_opset(tmp_path, tiny_model):
    r = run("export", str(tmp_path / "out"), "--model", str(tiny_model("llama")), "--opset", "11")
    assert r.exit_code == 1 and "opset 11 is too old" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_hub_id_from_the_local_cache(tmp_path, tiny_model):
    """A hub id resolves from a real Hugging Face cache layout, offline; nothing is downloaded."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model("llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    # One fresh process (huggingface_hub reads HF_HUB_CACHE at import) runs both commands.
    script = f"""
import json
from click.testing import CliRunner
from prefixport.cli import main
runs = [CliRunner().invoke(main, ["export", {str(tmp_path / "out")!r}, "--model", "tiny-org/tiny-llama", "--no-verify"]),
        CliRunner().invoke(main, ["export", {str(tmp_path / "out2")!r}, "--model", "tiny-org/not-cached"])]
print(json.dumps([[r.exit_code, r.output] for r in runs]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    (found, found_out), (missing, missing_out) = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == 0, found_out
    assert json.loads((tmp_path / "out" / "prefixport.json").read_text())["source"] == "tiny-org/tiny-llama"
    assert missing == 1 and "local Hugging Face cache" in missing_out, missing_out


class _Marker:
    """Unpickling this writes a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_unopened(tmp_path, tiny_model):
    import pickle

    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    r = run("export", str(tmp_path / "out"), "--model", str(model))
    assert r.exit_code == 1 and "pickles (pytorch_model.bin)" in r.output and "never loads" in r.output, r.output
    assert not marker.exists() and not (tmp_path / "out").exists()
