"""Params-only export: the official round trip on the harmon_tiny fixture, EMA selection, the
project-naming safetensors, the model card and re-loading the export."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_inference_cli import EMA_OFFSET, STEP, make_tiny_checkpoint

from unified_mm.models.harmon import convert
from unified_mm.tools import export

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "harmon_tiny"


def _fixture_config() -> ml_collections.ConfigDict:
    """A unified_mm config whose Harmon is the fixture's (KL-16 VAE, vocab 320)."""
    from unified_mm.data.config import default_data_config

    d = json.loads((FIXTURE / "config.json").read_text())
    model = {k: d[k] for k in ("vae", "mar", "llm", "harmon", "fixture", "image_size")}
    c = ml_collections.ConfigDict()
    c.family = "harmon"
    c.model = ml_collections.ConfigDict(dict(model, tokenizer="kl16", dtype="float32"))
    c.data = default_data_config()
    return c


def test_official_round_trip_through_export_is_bit_exact(tmp_path):
    from unified_mm import families
    from unified_mm.train.load import load_model

    config = _fixture_config()
    family = families.build(config)
    sd = convert.load_torch_file(FIXTURE / "harmon.safetensors")
    vae_sd = convert.load_torch_file(FIXTURE / "vae.safetensors")
    params = convert.harmon_params_from_official(sd, vae_sd, family.model_cfg)
    src = tmp_path / "imported"
    src.mkdir()
    export.save_params_checkpoint(str(src), params)
    export.write_model_card(
        str(src), {"config": config.to_json(), "family": "harmon", "stage": None, "global_step": 0}
    )
    out = tmp_path / "export"
    card = export.export_checkpoint(str(src), str(out))
    assert {"harmon_official.safetensors", "vae_official.safetensors", "model.safetensors"} <= set(
        card["files"]
    )
    readers = [("harmon_official.safetensors", "vae_official.safetensors")]
    if "harmon_official.pth" in card["files"]:  # torch installed (the convert extra)
        readers.append(("harmon_official.pth", "vae_official.pth"))
    for h_name, v_name in readers:
        sd2 = convert.load_torch_file(out / h_name)
        vae2 = convert.load_torch_file(out / v_name)
        assert set(sd2) == set(sd) and set(vae2) == set(vae_sd)
        for ref, got in ((sd, sd2), (vae_sd, vae2)):
            for k in ref:
                assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape, k
                np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    if "vae_official.pth" in card["files"]:
        import torch

        raw = torch.load(out / "vae_official.pth", map_location="cpu", weights_only=True)
        assert list(raw) == ["model"]  # the kl16.ckpt layout
    # the export itself loads back (params/ + model_card.json) with the same weights
    loaded = load_model(str(out))
    got = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    flat_ref = export.flatten_params(params)
    flat_got = export.flatten_params(got)
    assert set(flat_ref) == set(flat_got)
    for k, v in flat_ref.items():
        np.testing.assert_array_equal(flat_got[k], v, err_msg=k)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_export")
    weights = make_tiny_checkpoint(str(d))
    (d / "eval").mkdir()
    for step, overall in ((2, 0.1), (STEP, 0.25), (STEP + 10, 0.9)):  # the last is after STEP
        (d / "eval" / f"full_step{step}.json").write_text(
            json.dumps({"step": step, "stage": "full", "geneval": {"overall": overall}})
        )
    return str(d), weights


def test_export_uses_ema_and_writes_a_model_card(tiny, tmp_path):
    from safetensors.numpy import load_file

    from unified_mm.train.load import load_model

    workdir, weights = tiny
    out = tmp_path / "exp"
    card = export.export_checkpoint(workdir, str(out), formats=("orbax", "safetensors", "official"))
    assert card["ema"] is True and card["step"] == STEP and card["stage"] == "full"
    assert card["family"] == "harmon" and card["metrics"]["geneval"]["overall"] == 0.25
    assert card["data"]["sources"] and "max_text_len" in card["data"]
    on_disk = json.loads((out / "model_card.json").read_text())
    assert (
        on_disk["config"] == card["config"] and json.loads(on_disk["config"])["family"] == "harmon"
    )
    flat = load_file(str(out / "model.safetensors"))
    ref = export.flatten_params(weights["ema"])
    assert set(flat) == set(ref) and any(k.startswith("mar.") for k in flat)
    for k in ref:
        np.testing.assert_array_equal(flat[k], ref[k], err_msg=k)
    # pixel tokenizer: no VAE in the official layout
    assert "vae_official.safetensors" not in card["files"]
    official = load_file(str(out / "harmon_official.safetensors"))
    assert {k.split(".")[0] for k in official} == {"llm", "mar", "proj_in", "proj_out"}
    # the export reloads with the EMA weights and keeps its metrics when exported again
    loaded = load_model(str(out))
    assert loaded.meta["stage"] == "full" and loaded.meta["step"] == STEP
    kernel = loaded.model.proj_in.linear_1.kernel.get_value()
    np.testing.assert_array_equal(
        np.asarray(kernel), weights["ema"]["proj_in"]["linear_1"]["kernel"]
    )
    again = export.export_checkpoint(str(out), str(tmp_path / "again"), formats=("orbax",))
    assert again["metrics"] == card["metrics"] and set(again["files"]) == {"params"}


def test_export_cli_no_ema_and_bad_input(tiny, tmp_path, capsys):
    from safetensors.numpy import load_file

    workdir, weights = tiny
    out = tmp_path / "raw"
    assert (
        export.main(
            ["--checkpoint", workdir, "--out", str(out), "--no-ema", "--format", "safetensors"]
        )
        == 0
    )
    assert "raw params" in capsys.readouterr().out
    flat = load_file(str(out / "model.safetensors"))
    ref = export.flatten_params(weights["params"])
    k = "proj_out.linear_2.kernel"
    np.testing.assert_array_equal(flat[k], ref[k])
    assert not np.array_equal(flat[k], ref[k] + np.float32(EMA_OFFSET))
    assert not (out / "params").exists()
    # a non-empty output directory, an unknown format, a missing checkpoint: one-line errors
    assert export.main(["--checkpoint", workdir, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        export.main(["--checkpoint", workdir, "--out", str(tmp_path / "n"), "--format", "onnx"])
        == 2
    )
    assert "unknown export format" in capsys.readouterr().err
    assert (
        export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
    assert (
        export.main(
            ["--checkpoint", workdir, "--out", str(out), "--overwrite", "--format", "orbax"]
        )
        == 0
    )
    assert (out / "params").is_dir() and not (out / "model.safetensors").exists()


def test_flatten_round_trip():
    tree = {"a": {"b": np.ones(2), "layers": {0: {"c": np.zeros(1)}}}, "d": np.arange(3)}
    flat = export.flatten_params(tree)
    assert set(flat) == {"a.b", "a.layers.0.c", "d"}
    back = export.unflatten_params(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    np.testing.assert_array_equal(back["d"], tree["d"])
