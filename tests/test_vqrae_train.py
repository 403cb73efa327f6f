"""A tiny VQRAE tokenizer run on shapes images with optax directly (stage 1, then a stage-2 run).

Stage 1: encoder frozen (a small random ViT), SimVQ projections + W + decoder trained; the codebook
utilisation over an evaluation pass must reach 90 % and the reconstruction PSNR must improve by 5 dB
over the first evaluation. Stage 2: the teacher is copied from the encoder, the encoder is unfrozen
with self-distillation; the distillation loss starts at exactly 0 (student == teacher) and the
features stay close to the teacher (cosine similarity reported and checked).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unified_mm.data.shapes import ShapesDataset
from unified_mm.models.vqrae.config import EncoderConfig, LossConfig, SimVQConfig, VQRAEConfig
from unified_mm.models.vqrae.metrics import CodeUsage, psnr, to_unit_range
from unified_mm.models.vqrae.vqrae import VQRAE, trainable_filter

K = 64
STAGE1_STEPS = 600
STAGE2_STEPS = 50


def _dataset(n: int, start: int) -> np.ndarray:
    ds = ShapesDataset("train", seed=0, image_size=32)
    return np.stack([ds[start + i].image for i in range(n)]).astype(np.float32) / 127.5 - 1.0


def _make_step(graphdef, rest, tx, stage_distill: bool):
    @jax.jit
    def step(params, opt_state, x, i):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            return model.tokenizer_loss(x, jax.random.key(0), step=i, stage_distill=stage_distill)

        (_, met), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, met

    return step


def _evaluate(model: VQRAE, images: np.ndarray) -> tuple[float, float, float]:
    """(codebook utilisation over the pass, mean per-image PSNR in dB, code perplexity)."""
    recon_fn = nnx.jit(lambda m, x: m.reconstruct(x))
    usage, scores = CodeUsage(K), []
    for b in range(0, len(images), 128):
        x = jnp.asarray(images[b : b + 128])
        recon, ids = recon_fn(model, x)
        usage.update(ids)
        scores.append(np.asarray(psnr(to_unit_range(recon), to_unit_range(x))))
    return usage.utilisation(), float(np.mean(np.concatenate(scores))), usage.perplexity()


def _train(model, stage, steps, lr, data, rng, stage_distill):
    graphdef, params, rest = nnx.split(model, trainable_filter(stage), ...)
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    step = _make_step(graphdef, rest, tx, stage_distill)
    history = []
    for i in range(steps):
        x = jnp.asarray(data[rng.integers(0, len(data), 16)])
        params, opt_state, met = step(params, opt_state, x, i)
        if i == 0 or i == steps - 1:
            history.append({k: float(v) for k, v in met.items()})
    nnx.update(model, params)
    return history


def test_tiny_tokenizer_run_reaches_utilisation_and_psnr():
    enc = EncoderConfig(
        kind="vit",
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    )
    cfg = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=K, code_dim=64),  # e >= d, as VQRAE prescribes
        loss=LossConfig(gan_weight=0.0, lpips_weight=0.0),
    )
    model = VQRAE(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    train, evals = _dataset(512, 0), _dataset(256, 100_000)
    rng = np.random.default_rng(0)

    util0, psnr0, _ = _evaluate(model, evals)
    enc_before = jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param))
    _train(model, 1, STAGE1_STEPS, 4e-3, train, rng, stage_distill=False)
    util1, psnr1, ppl1 = _evaluate(model, evals)
    print(
        f"\nstage 1: utilisation {util0:.3f} -> {util1:.3f} (K={K}), PSNR {psnr0:.2f} -> "
        f"{psnr1:.2f} dB, perplexity {ppl1:.1f}"
    )
    enc_after = jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(enc_before), jax.tree.leaves(enc_after))
    )
    assert util1 >= 0.90
    assert psnr1 - psnr0 >= 5.0

    model.init_teacher_from_encoder()
    hist = _train(model, 2, STAGE2_STEPS, 1e-3, train, rng, stage_distill=True)
    util2, psnr2, _ = _evaluate(model, evals)
    first, last = hist[0], hist[-1]
    print(
        f"stage 2: distill loss {first['distill/loss']:.2e} -> {last['distill/loss']:.2e}, cosine "
        f"to teacher {first['distill/cos']:.4f} -> {last['distill/cos']:.4f}, utilisation "
        f"{util2:.3f}, PSNR {psnr2:.2f} dB"
    )
    assert first["distill/loss"] == pytest.approx(0.0, abs=1e-12)  # student == teacher at the start
    assert first["distill/cos"] == pytest.approx(1.0, abs=1e-5)
    enc_stage2 = jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(enc_after), jax.tree.leaves(enc_stage2))
    )  # the encoder is trained in stage 2
    assert last["distill/cos"] >= 0.9
    assert psnr2 >= psnr1 - 1.0
