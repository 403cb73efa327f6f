"""Reconstruction metrics (PSNR, SSIM, codebook use) and the VQRAE reconstruction tool's core."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.eval.reconstruction import evaluate_reconstruction, uint8_to_unit, unit_to_uint8


def test_metrics_on_known_reconstructions():
    rng = np.random.default_rng(0)
    images = uint8_to_unit(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    ids = np.array([[0, 0], [1, 1], [0, 1], [0, 0]])

    def perfect(x):
        return x, jnp.asarray(ids[: len(x)])

    m = evaluate_reconstruction(perfect, [images[:2], images[2:]], codebook_size=4)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-5) and m["psnr"] > 100
    assert m["codebook_utilisation"] == 0.5  # codes 0 and 1 of 4
    # usage over the whole pass: 0 appears 3/4 of the time in the first batch's ids
    assert m["code_perplexity"] == pytest.approx(2.0)

    def offset(x):  # a constant error of 0.1 in [0, 1] units: PSNR = 20 dB exactly
        return jnp.clip(x, -1.0, 0.8) + 0.2 * (x < 0.8) - 0.2 * (x >= 0.8), None

    flat = np.full((2, 16, 16, 3), -0.5, np.float32)
    m = evaluate_reconstruction(offset, [flat])
    assert m["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert "codebook_utilisation" not in m
    with pytest.raises(ValueError, match="no code ids"):
        evaluate_reconstruction(offset, [flat], codebook_size=4)
    np.testing.assert_array_equal(
        unit_to_uint8(uint8_to_unit(np.arange(256, dtype=np.uint8))), np.arange(256)
    )


def test_reconstruct_images_with_a_tiny_vqrae():
    from unified_mm.models.vqrae.config import (
        DiscConfig,
        EncoderConfig,
        LossConfig,
        SimVQConfig,
        VQRAEConfig,
    )
    from unified_mm.models.vqrae.vqrae import VQRAE
    from unified_mm.tools.reconstruct import reconstruct_images

    enc = EncoderConfig(
        kind="vit",
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    )
    cfg = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=32, code_dim=48),
        loss=LossConfig(disc=DiscConfig(kind="patch")),
        with_teacher=False,
    )
    from test_inference_cli import random_model

    model = random_model(lambda: VQRAE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(5)]
    recon, ids, metrics = reconstruct_images(model, images, image_size=16, batch_size=2)
    assert recon.shape == (5, 16, 16, 3) and recon.dtype == np.uint8
    assert ids.shape == (5, 4, 4) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 32
    assert metrics["images"] == 5 and np.isfinite(metrics["psnr"])
    used = len(np.unique(ids)) / 32
    assert metrics["codebook_utilisation"] == pytest.approx(used)
    assert 1.0 <= metrics["code_perplexity"] <= len(np.unique(ids))


def test_reconstruct_cli_on_a_vqrae_checkpoint(tmp_path, capsys):
    """The smoke VQRAE config saved through the trainer's checkpoint code, then the CLI."""
    import importlib.util
    import json
    import os
    import pathlib

    import jax
    from PIL import Image
    from test_inference_cli import random_params

    from unified_mm import families
    from unified_mm.data.shapes_render import ObjectSpec, render_objects
    from unified_mm.tools import reconstruct
    from unified_mm.train import checkpoint as ckpt

    repo = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "shapes_vqrae_cfg", repo / "configs" / "shapes_vqrae.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("smoke")
    family = families.build(config)
    params = random_params(family)
    manager = ckpt.make_manager(
        os.path.join(tmp_path, "run", "checkpoints"), save_every=1, keep_last=1, asynchronous=False
    )
    stage = config.stage_order[-1]
    ckpt.save(
        manager,
        3,
        params=params,
        opt_state={"count": jnp.zeros((), jnp.int32)},
        ema=None,
        train={"rng": jnp.zeros((2,), jnp.uint32), "skipped_steps": jnp.zeros((), jnp.int32)},
        data_state=None,
        meta={
            "stage": stage,
            "stage_index": 0,
            "stage_step": 3,
            "global_step": 3,
            "family": config.family,
            "config": config.to_json(),
        },
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    paths = []
    for i, shape in enumerate(("circle", "star")):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(render_objects([ObjectSpec(shape, "red", 0.5, 0.5, 0.5)], 48)).save(p)
        paths += ["--image", str(p)]
    out = tmp_path / "recon"
    rc = reconstruct.main(["--checkpoint", str(tmp_path / "run"), *paths, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    size = summary["image_size"]
    assert np.asarray(Image.open(out / "img0_recon.png")).shape == (size, size, 3)
    ids = np.load(out / "img1_ids.npy")
    assert ids.ndim == 2 and ids.dtype == np.int32
    assert 0 < summary["codebook_utilisation"] <= 1 and np.isfinite(summary["psnr"])
    del jax
