"""The MAR encoder's optional conv stem (models/harmon/conv_stem.py): geometry, masking (a visible
token's feature never sees a masked token's pixels), the config checks, the parameter group,
logical axes, the analytic FLOPs, and a jitted t2i loss with gradients reaching the stem."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_harmon_units import TINY, _batch, _random_params

import unified_mm  # noqa: F401  (nnx.use_eager_sharding(False))
from unified_mm.models.harmon import convert, flops
from unified_mm.models.harmon.conv_stem import ConvStem
from unified_mm.models.harmon.harmon import Harmon, HarmonConfig
from unified_mm.models.harmon.vae import patchify_latents


def _stem_config(channels=(4, 8)) -> HarmonConfig:
    d = copy.deepcopy(TINY)
    d["mar"].update(conv_stem=list(channels), conv_stem_patch=4)
    return HarmonConfig.from_fixture_json(d, tokenizer="pixel", pixel_patch=4)


@pytest.fixture(scope="module")
def stem_model():
    cfg = _stem_config()
    # Random weights everywhere (the real init zeroes the diffusion head's output layers, so no
    # t2i gradient would reach the encoder at step 0).
    return cfg, convert.model_from_params(cfg, _random_params(cfg))


def test_stem_maps_each_token_block_to_one_vector_and_sees_its_neighbours():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 12, 16, 3)).astype(np.float32)
    tokens = patchify_latents(jnp.asarray(image), 4).reshape(1, 12, 48)
    deeper = ConvStem((4, 8, 16), 4, 48, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert deeper(tokens, (3, 4)).shape == (1, 12, 16)  # a third stage keeps the token grid
    stem = ConvStem((4, 8), 4, 48, dtype=jnp.float32, rngs=nnx.Rngs(0))
    out = np.asarray(stem(tokens, (3, 4)))
    assert out.shape == (1, 12, 8)
    # Change the pixels of token (1, 1) only: the receptive field (3x3 conv, pool, 3x3 conv,
    # pool) reaches its 3x3 token neighbourhood and no further.
    image[0, 4:8, 4:8] += 0.5
    moved = np.asarray(stem(patchify_latents(jnp.asarray(image), 4).reshape(1, 12, 48), (3, 4)))
    changed = np.abs(moved - out).max(-1).reshape(3, 4) > 1e-6
    assert changed[1, 1] and changed[0, 0] and changed[2, 2]
    assert not changed[:, 3].any()


def test_visible_features_ignore_masked_pixels(stem_model):
    cfg, model = stem_model
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))
    tokens = model.encode(images)
    mask = np.zeros((2, 16), np.float32)
    mask[:, [0, 5, 10]] = 1.0
    feat = model.extract_visual_feature(tokens, jnp.asarray(mask), max_visible=13)
    noisy = np.asarray(tokens).reshape(2, 16, -1).copy()
    noisy[:, [0, 5, 10]] += rng.normal(0, 1, noisy[:, [0, 5, 10]].shape)
    feat2 = model.extract_visual_feature(
        jnp.asarray(noisy.reshape(tokens.shape)), jnp.asarray(mask), max_visible=13
    )
    np.testing.assert_array_equal(np.asarray(feat.x_enc), np.asarray(feat2.x_enc))
    # ... while a visible token's pixels do reach its neighbours' features.
    noisy[:, 6] += 1.0
    feat3 = model.extract_visual_feature(
        jnp.asarray(noisy.reshape(tokens.shape)), jnp.asarray(mask), max_visible=13
    )
    assert np.abs(np.asarray(feat3.x_enc) - np.asarray(feat.x_enc)).max() > 1e-4


@pytest.mark.parametrize(
    "channels, patch, message",
    [
        ((4, 8), 3, "conv_stem_patch=3 must be a power of two"),
        ((4,), 4, "has 1 stage\\(s\\); conv_stem_patch=4 needs at least 2"),
        ((4, 0), 4, "channels \\(4, 0\\) must be positive"),
        ((4, 8, 8), 8, "token dim 48 is not a multiple of conv_stem_patch\\^2=64"),
    ],
)
def test_impossible_stems_are_refused(channels, patch, message):
    cfg = _stem_config()
    mar = dataclasses.replace(cfg.mar, conv_stem=channels, conv_stem_patch=patch)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, mar=mar)


def test_stem_is_part_of_the_encoder_group_with_logical_axes(stem_model):
    from unified_mm.families.harmon import _ENCODER_PARTS, _under

    cfg, model = stem_model
    params = nnx.state(model, nnx.Param)
    paths = [p for p, _ in nnx.to_flat_state(params) if "conv_stem" in [str(x) for x in p]]
    assert len(paths) == 4  # two convs, kernel and bias
    in_encoder = _under("mar", _ENCODER_PARTS)
    assert all(in_encoder(p, None) for p in paths)
    fresh = nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0)))
    for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param)):
        if "conv_stem" in [str(x) for x in p]:
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == v.get_value().ndim, p
    assert model.mar.z_proj.kernel.get_value().shape == (8, cfg.mar.encoder_embed_dim)


def test_stem_flops_by_hand(stem_model):
    cfg, _ = stem_model
    # 16 tokens of 4x4x3 pixels: conv 3->4 at 4x4 px per token, pool, conv 4->8 at 2x2, pool.
    expected = 16 * 2 * 9 * (3 * 4 * 16 + 4 * 8 * 4)
    assert flops.conv_stem_flops(cfg, 16) == expected
    plain = HarmonConfig.from_fixture_json(TINY, tokenizer="pixel", pixel_patch=4)
    assert flops.conv_stem_flops(plain, 16) == 0.0
    with_stem = flops.i2t_forward_flops(cfg, image_size=16, und_len=30)
    without = flops.i2t_forward_flops(plain, image_size=16, und_len=30)
    # z_proj reads the stem's 8 channels instead of the 48-d token.
    z_proj_change = 2.0 * (16 + cfg.mar.buffer_size) * (8 - 48) * cfg.mar.encoder_embed_dim
    assert with_stem - without == pytest.approx(expected + z_proj_change)


def test_t2i_loss_gradients_reach_the_stem(stem_model):
    cfg, model = stem_model
    images, ids, am, _, _ = _batch(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        value, _ = m.t2i_loss(images, ids, am, jax.random.key(0), deterministic=False)
        return value

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    stem_grads = nnx.to_pure_dict(grads)["mar"]["conv_stem"]
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(stem_grads))
    assert np.isfinite(norm) and norm > 0.0


def test_stem_round_trips_through_the_official_layout(stem_model):
    cfg, model = stem_model
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    sd, vae_sd = convert.official_from_harmon_params(params, cfg)
    assert vae_sd == {}
    # torch layout [out, in, kh, kw] under the module path the official keys would use.
    assert sd["mar.conv_stem.convs.0.weight"].shape == (4, 3, 3, 3)
    back = convert.harmon_params_from_official(sd, None, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
