"""Reconstruction metrics (PSNR, SSIM, codebook use), the VQRAE reconstruction tool's core, and
its CLI on a tiny VQRAE trained by the real trainer (`trained_checkpoints.trained_vqrae`: the smoke
config's `tokenizer` stage for a few steps, trained once per session; 24-46 s depending on the
machine's load, nearly all compilation)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from trained_checkpoints import TrainedRun, check_trained, trained_vqrae

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


@pytest.fixture(scope="module")
def trained_vqrae_run(tmp_path_factory) -> TrainedRun:
    return trained_vqrae(tmp_path_factory.getbasetemp())


def test_vqrae_checkpoint_was_trained(trained_vqrae_run):
    measured = check_trained(trained_vqrae_run)
    print(f"trained in {trained_vqrae_run.train_seconds:.1f} s: {measured}")


def test_reconstruct_cli_on_a_trained_vqrae_checkpoint(trained_vqrae_run, tmp_path, capsys):
    """The smoke VQRAE trained a few steps by the real trainer, then the CLI."""
    import json

    from PIL import Image

    from unified_mm.data.shapes_render import ObjectSpec, render_objects
    from unified_mm.tools import reconstruct

    paths = []
    for i, shape in enumerate(("circle", "star")):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(render_objects([ObjectSpec(shape, "red", 0.5, 0.5, 0.5)], 48)).save(p)
        paths += ["--image", str(p)]
    out = tmp_path / "recon"
    argv = ["--checkpoint", trained_vqrae_run.workdir, *paths, "--out", str(out)]
    rc = reconstruct.main(argv)
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    size = summary["image_size"]
    assert size == 32  # the tokenizer stage's resolution
    recon = np.asarray(Image.open(out / "img0_recon.png"))
    assert recon.shape == (size, size, 3) and recon.dtype == np.uint8
    ids = np.load(out / "img1_ids.npy")
    assert ids.shape == (8, 8) and ids.dtype == np.int32  # 32 px / patch 4
    assert ids.min() >= 0 and ids.max() < 64
    assert 0 < summary["codebook_utilisation"] <= 1 and np.isfinite(summary["psnr"])
