"""VQRAE tokenizer pieces: decoder layout, loss terms, the single-backward GAN semantics, stages."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.vqrae.config import (
    DecoderConfig,
    DiscConfig,
    EncoderConfig,
    LossConfig,
    SimVQConfig,
    VQRAEConfig,
)
from unified_mm.models.vqrae.decoder import ViTDecoder, sincos_2d
from unified_mm.models.vqrae.layers import patchify, unpatchify
from unified_mm.models.vqrae.losses import adaptive_weight, generator_loss, hinge_d_loss
from unified_mm.models.vqrae.lpips import LPIPS, lpips_params_from_torch, set_lpips_params
from unified_mm.models.vqrae.vqrae import VQRAE, trainable_filter

ENC = EncoderConfig(
    kind="vit", image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64
)


def _rngs(seed: int) -> nnx.Rngs:
    # The rbg PRNG compiles its init ops several times faster than threefry on CPU.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _images(seed: int, n: int = 2, size: int = 16) -> jnp.ndarray:
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


def test_unpatchify_round_trip_and_layout():
    x = _images(0, 2, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48)
    np.testing.assert_array_equal(np.asarray(unpatchify(tokens, (2, 2), 4)), np.asarray(x))
    # (p, q, c) order: token 1 is the top-right patch, its first 3 entries pixel (0, 4).
    np.testing.assert_array_equal(np.asarray(tokens[0, 1, :3]), np.asarray(x[0, 0, 4]))
    np.testing.assert_array_equal(np.asarray(tokens[0, 2, 3:6]), np.asarray(x[0, 4, 1]))
    with pytest.raises(ValueError, match="do not match grid"):
        unpatchify(tokens, (3, 2), 4)


def test_sincos_positions_follow_mae_convention():
    dim, g = 16, 3
    t = sincos_2d(dim, (g, g))
    assert t.shape == (1 + g * g, dim)
    np.testing.assert_array_equal(t[0], 0.0)  # CLS slot
    # MAE reference, written out: meshgrid(w, h) -> first half encodes the column index.
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.divmod(np.arange(g * g), g)

    def one_d(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(cols), one_d(rows)], axis=1)
    np.testing.assert_allclose(t[1:], ref, atol=1e-6)
    rect = sincos_2d(dim, (2, 3), cls_token=False)
    assert rect.shape == (6, dim)
    np.testing.assert_allclose(rect[4, : dim // 2], ref[1, : dim // 2], atol=1e-6)  # column 1


def test_decoder_shapes():
    cfg = DecoderConfig(patch_size=4).resolved(ENC)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (32, 2, 4, 64)
    dec = ViTDecoder(cfg, in_dim=32, rngs=_rngs(0))
    out = nnx.jit(lambda m, t: m(t, (2, 3)))(dec, jnp.ones((2, 6, 32)))
    assert out.shape == (2, 8, 12, 3)
    with pytest.raises(ValueError, match="do not fill the grid"):
        dec(jnp.ones((2, 5, 32)), (2, 3))


def test_hinge_and_generator_values():
    real = jnp.array([2.0, 0.5])
    fake = jnp.array([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(generator_loss(fake)) == pytest.approx(1.0)


def test_adaptive_weight_on_a_toy_last_layer():
    x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    y = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    w = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    rec = lambda k: jnp.sum((x @ k - y) ** 2)  # noqa: E731
    gan = lambda k: -jnp.mean(x @ k)  # noqa: E731
    got = adaptive_weight(rec, gan, w, max_weight=1e4)
    g_rec = 2 * x.T @ (x @ w - y)
    g_gan = -x.T @ jnp.ones_like(y) / y.size
    expect = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-6)
    assert np.isfinite(float(got)) and float(got) == pytest.approx(float(expect), rel=1e-5)
    assert float(adaptive_weight(rec, gan, w, max_weight=0.5)) == 0.5


@pytest.fixture(scope="module")
def gan_model():
    loss = LossConfig(
        gan_weight=0.5,
        gan_start_step=10,
        disc_start_step=5,
        lpips_weight=0.0,
        disc=DiscConfig(kind="patch", patch_channels=8, patch_layers=1),
    )
    cfg = VQRAEConfig(encoder=ENC, quantizer=SimVQConfig(codebook_size=32, code_dim=48), loss=loss)
    model = VQRAE(cfg, rngs=_rngs(0))
    graphdef, params, rest = nnx.split(model, trainable_filter(1), ...)
    x = _images(1)

    @jax.jit
    def run(params, step):
        def fn(p):
            total, met = nnx.merge(graphdef, p, rest).tokenizer_loss(
                x, jax.random.key(3), step=step, stage_distill=False
            )
            return (total, met["loss/disc"]), met

        outs, vjp, met = jax.vjp(fn, params, has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        return outs, met, vjp((one, zero))[0], vjp((zero, one))[0]

    return model, params, run


def _group(grads, name):
    return [np.asarray(v[...]) for p, v in nnx.to_flat_state(grads) if p[0] == name]


def _max(arrs):
    return max(float(np.abs(a).max()) for a in arrs)


def test_gan_schedule_and_stop_gradients(gan_model):
    _, params, run = gan_model
    results = {s: run(params, s) for s in (0, 7, 12)}
    for step, ((total, d_loss), met, g_total, g_disc) in results.items():
        base = float(met["loss/pixel"] + met["loss/quant"])
        w, g = float(met["gan/adaptive_weight"]), float(met["loss/gan_g"])
        disc_on, gan_on = step >= 5, step >= 10
        expect = base + (float(d_loss) if disc_on else 0.0) + (0.5 * w * g if gan_on else 0.0)
        assert float(total) == pytest.approx(expect, rel=1e-5, abs=1e-6), step
        if not gan_on:
            assert w == 0.0  # the adaptive weight (and the GAN term) are off before the start step
        else:
            assert np.isfinite(w) and w > 0
        # The hinge term never reaches the generator (fakes are stop-gradient'd) ...
        assert _max(_group(g_disc, "decoder") + _group(g_disc, "quantizer")) == 0.0
        # ... and the generator term never reaches the discriminator (its params are sg'd inside).
        disc_total, disc_hinge = _group(g_total, "discriminator"), _group(g_disc, "discriminator")
        if disc_on:
            assert _max(disc_hinge) > 0
            for a, b in zip(disc_total, disc_hinge, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        else:
            assert _max(disc_total) == 0.0
    # Once on, the GAN term changes the decoder's gradient.
    dec_7, dec_12 = _group(results[7][2], "decoder"), _group(results[12][2], "decoder")
    assert max(float(np.abs(a - b).max()) for a, b in zip(dec_7, dec_12, strict=True)) > 1e-6
    print(f"adaptive GAN weight at step 12: {float(results[12][1]['gan/adaptive_weight']):.4f}")


def test_trainable_filter_selects_stage_parameters():
    model = nnx.eval_shape(
        lambda: VQRAE(
            VQRAEConfig(
                encoder=ENC,
                quantizer=SimVQConfig(codebook_size=8, code_dim=32),
                loss=LossConfig(
                    lpips_weight=0.0,
                    disc=DiscConfig(
                        kind="dino",
                        dino_input_size=16,
                        dino_patch_size=8,
                        dino_hidden_size=16,
                        dino_num_layers=2,
                        dino_num_heads=2,
                        dino_mlp_dim=32,
                        key_depths=(0,),
                    ),
                ),
            ),
            rngs=_rngs(0),
        )
    )

    def tops(stage):
        flat = nnx.to_flat_state(nnx.state(model, trainable_filter(stage)))
        return {p[0] for p, _ in flat}, {p for p, _ in flat}

    s0, _ = tops(0)
    s1, p1 = tops(1)
    s2, p2 = tops(2)
    assert s0 == {"encoder", "pretrain_head"}
    assert s1 == {"quantizer", "decoder", "discriminator"}
    assert s2 == {"encoder", "quantizer", "decoder", "discriminator"}
    for paths in (p1, p2):
        assert not any("backbone" in p or "codebook" in p for p in paths)  # frozen DINO, frozen C
        assert any("heads" in p for p in paths)  # trainable discriminator heads
    with pytest.raises(ValueError, match="stage must be"):
        trainable_filter(3)


def _torch_layout(module: LPIPS) -> dict:
    """Zero arrays in the canonical torch layout, shaped like `module`'s weights."""
    idx = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    out = {}
    for j, i in enumerate(idx):
        k = module.kernels[j].shape
        out[f"features.{i}.weight"] = np.zeros((k[3], k[2], 3, 3), np.float32)
        out[f"features.{i}.bias"] = np.zeros((k[3],), np.float32)
    for k, lin in enumerate(module.lins):
        out[f"lin{k}.weight"] = np.zeros((1, lin.shape[0], 1, 1), np.float32)
    return out


def test_lpips_off_is_logged_and_on_contributes(gan_model, caplog):
    cfg = VQRAEConfig(
        encoder=ENC,
        quantizer=SimVQConfig(codebook_size=16, code_dim=32),
        loss=LossConfig(gan_weight=0.0),
        with_teacher=False,
    )
    with caplog.at_level(logging.INFO):
        abstract = nnx.eval_shape(lambda: VQRAE(cfg, rngs=_rngs(0)))
    assert abstract.lpips is None
    assert any("LPIPS term is off" in r.getMessage() for r in caplog.records)
    model = nnx.clone(gan_model[0])
    model.cfg = dataclasses.replace(
        model.cfg, loss=dataclasses.replace(model.cfg.loss, lpips_weight=2.0)
    )
    model.lpips = LPIPS((4, 4, 8, 8, 8))  # a small LPIPS net with random NumPy weights
    rng = np.random.default_rng(0)
    set_lpips_params(
        model.lpips,
        {
            k: rng.uniform(0.0, 0.3, v.shape).astype(np.float32)
            for k, v in lpips_params_from_torch(_torch_layout(model.lpips)).items()
        },
    )
    x = _images(2)
    rec, pix, perc = nnx.jit(lambda m, a: m._rec_loss(m.reconstruct(a)[0], a))(model, x)
    assert float(perc) > 0
    assert float(rec) == pytest.approx(float(pix + 2.0 * perc), rel=1e-5)
    model.teacher = None
    with pytest.raises(ValueError, match="needs a teacher"):
        model.tokenizer_loss(x, jax.random.key(0), step=0, stage_distill=True)


def test_dinov2_encoder_path_and_pretrain_loss(gan_model):
    enc = EncoderConfig(
        kind="dinov2_reg",
        image_size=28,
        patch_size=7,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        hidden_act="gelu",
        num_register_tokens=4,
        layerscale_value=1.0,
    )
    cfg = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=32, code_dim=48),
        decoder=DecoderConfig(patch_size=8),
        loss=LossConfig(gan_weight=0.0, lpips_weight=0.0),
        with_teacher=False,
    )
    model = VQRAE(cfg, rngs=_rngs(0))
    x = _images(3, 2, 32)  # resized to 28 for the encoder (RAE's 256->224), decoded back at 32

    @nnx.jit
    def run(m, a):
        recon, ids = m.reconstruct(a)
        return m.encode_continuous(a), recon, ids, m.decode_ids(ids)

    z, recon, ids, dec = run(model, x)
    assert z.shape == (2, 16, 32)
    assert recon.shape == x.shape and ids.shape == (2, 16) and ids.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(dec), np.asarray(recon), atol=1e-5)
    with pytest.raises(ValueError, match="only the 'vit' encoder"):
        model.encoder_pretrain_loss(x)
    loss, met = nnx.jit(lambda m, a: m.encoder_pretrain_loss(a))(gan_model[0], _images(4))
    assert np.isfinite(float(loss)) and float(loss) > 0 and "pretrain/psnr" in met
