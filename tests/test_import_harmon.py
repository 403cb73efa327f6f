"""Importing official Harmon files into a trainer checkpoint that load_model and the trainer read."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from unified_mm.tools.import_harmon import import_checkpoint
from unified_mm.train.load import load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "harmon_tiny"


def _config():
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "harmon_0p5b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    fixture = json.loads((FIXTURE / "config.json").read_text())
    model = {k: fixture[k] for k in ("vae", "mar", "llm", "harmon", "fixture", "image_size")}
    model.update(tokenizer="kl16", pixel_patch=None, dtype="float32", remat=False)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
        config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
        for name in config.stage_order:
            config.stages[name].image_size = fixture["image_size"]
    return config


def test_import_then_load_gives_the_official_weights(tmp_path):
    n = import_checkpoint(
        _config(),
        str(tmp_path),
        harmon=str(FIXTURE / "harmon.safetensors"),
        vae=str(FIXTURE / "vae.safetensors"),
    )
    assert n > 100
    loaded = load_model(str(tmp_path))
    official = load_file(str(FIXTURE / "harmon.safetensors"))
    vae = load_file(str(FIXTURE / "vae.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(loaded.model.llm.embed_tokens[...]),
        official["llm.model.embed_tokens.weight"],
    )
    np.testing.assert_array_equal(
        np.asarray(loaded.model.mar.fake_latent[...]).reshape(-1),
        official["mar.fake_latent"].reshape(-1),
    )
    conv = np.asarray(loaded.model.vae.encoder.conv_in.kernel[...])  # HWIO
    np.testing.assert_array_equal(conv, vae["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
    assert loaded.meta["global_step"] == 0
    # A used work directory and missing files are refused with one clear message.
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_checkpoint(_config(), str(tmp_path), harmon=str(FIXTURE / "harmon.safetensors"))
    with pytest.raises(ValueError, match="no such file"):
        import_checkpoint(_config(), str(tmp_path / "new"), harmon=str(tmp_path / "absent.pth"))


def test_cli_prints_one_line_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "unified_mm.tools.import_harmon",
            "--config",
            str(ROOT / "configs" / "harmon_0p5b.py") + ":smoke",
            "--workdir",
            str(tmp_path),
            "--harmon",
            str(tmp_path / "missing.pth"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing.pth: no such file" in out.stderr
