"""Harmon unit tests on a tiny random model (no fixture needed): jitted training losses with
gradients (frozen VAE, key-driven dropout / masking, the i2t gradient scale, the static label
bound), the sampler's key path without CFG over two static segments, logical axis names on every
parameter, the pixel tokenizer, and buffer handling of resized positional embeddings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unified_mm  # noqa: F401  (nnx.use_eager_sharding(False))
from unified_mm.models.harmon import convert, sampling
from unified_mm.models.harmon.harmon import Harmon, HarmonConfig
from unified_mm.models.harmon.mar import cosine_mask_schedule, resize_pos_embed

TINY = {
    "image_size": 16,
    "vae": {
        "ch": 4,
        "ch_mult": [1, 1, 2],
        "num_res_blocks": 1,
        "z_channels": 4,
        "embed_dim": 4,
        "double_z": True,
        "norm_num_groups": 2,
        "encoder_attn_levels": [2],
        "decoder_attn_levels": [],
    },
    "mar": {
        "img_size": 16,
        "vae_stride": 4,
        "patch_size": 1,
        "seq_h": 4,
        "seq_w": 4,
        "vae_embed_dim": 4,
        "encoder_embed_dim": 32,
        "encoder_depth": 2,
        "encoder_num_heads": 2,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
        "buffer_size": 2,
        "class_num": 5,
        "diffloss_d": 2,
        "diffloss_w": 32,
        "num_sampling_steps": "5",
        "diffusion_batch_mul": 2,
    },
    "llm": {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "tie_word_embeddings": True,
    },
    "harmon": {"vae_scale": 0.5},
    "fixture": {"image_token_id": 63, "pad_token_id": 62, "eos_token_id": 62},
}


def _random_params(cfg: HarmonConfig, seed: int = 0) -> dict:
    """N(0, 0.05) everywhere (norm scales around 1): cheap, no per-shape RNG compilation."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if str(path[-1].key) == "scale" else 0.0
        return (base + 0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, convert.abstract_params(cfg))


@pytest.fixture(scope="module")
def tiny():
    cfg = HarmonConfig.from_fixture_json(TINY)
    return cfg, convert.model_from_params(cfg, _random_params(cfg))


def _batch(cfg: HarmonConfig, b: int = 2):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (b, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ids = rng.integers(0, 60, (b, 6)).astype(np.int32)
    am = np.ones((b, 6), np.int32)
    am[1, 4:] = 0
    ids[1, 4:] = cfg.pad_token_id
    h, w = cfg.latent_grid()
    n_img = h * w + cfg.mar.buffer_size
    und_ids = np.concatenate(
        [
            rng.integers(0, 60, (b, 3)),
            np.full((b, n_img), cfg.image_token_id),
            rng.integers(0, 60, (b, 4)),
        ],
        axis=1,
    ).astype(np.int32)
    labels = np.full_like(und_ids, -100)
    labels[:, -4:] = und_ids[:, -4:]
    return images, ids, am, und_ids, labels


def _norm(tree) -> float:
    return float(
        sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)) ** 0.5
    )


def _sub(tree, *path):
    for p in path:
        tree = tree[p]
    return tree


def test_t2i_loss_jit_finite_with_gradients(tiny):
    cfg, model = tiny
    images, ids, am, _, _ = _batch(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit  # one compilation, reused for every key below
    def run(params, key):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return m.t2i_loss(images, ids, am, key, deterministic=False)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, metrics), grads = run(params, jax.random.key(3))
    grads = nnx.to_pure_dict(grads)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert 0.7 <= float(metrics["mask_ratio"]) <= 1.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    for part in (
        ("mar", "encoder_blocks"),
        ("mar", "decoder_blocks"),
        ("mar", "diffloss"),
        ("llm",),
        ("proj_in",),
        ("proj_out",),
    ):
        g = _norm(_sub(grads, *part))
        assert np.isfinite(g) and g > 0, f"no gradient reaches {'.'.join(part)}"
    assert _norm(grads["vae"]) == 0.0, "the frozen VAE must receive no gradient"
    assert _norm(grads["mar"]["class_emb"]) == 0.0  # only the class-conditional path uses it
    # Masking, diffusion draws and dropout come from the key alone.
    (again, _), _ = run(params, jax.random.key(3))
    (other, _), _ = run(params, jax.random.key(4))
    assert float(again) == float(loss) and float(other) != float(loss)


def test_i2t_loss_gradient_scale(tiny):
    cfg, model = tiny
    images, _, _, und_ids, labels = _batch(cfg)
    am = np.ones_like(und_ids)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit  # grad_scale is traced: one compilation for both scales
    def run(params, scale):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return m.i2t_loss(
                images, und_ids, am, labels, jax.random.key(0), deterministic=True, grad_scale=scale
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss1, m1), g1 = run(params, 1.0)
    (loss01, _), g01 = run(params, 0.1)
    g1, g01 = nnx.to_pure_dict(g1), nnx.to_pure_dict(g01)
    assert np.isfinite(float(loss1)) and float(loss1) == float(loss01)
    assert int(m1["label_tokens"]) == 2 * 4  # the 4 answer ids per row, after the shift
    # Gradients through z_enc (proj_in, MAR encoder) are scaled; the LLM's are not.
    for part in (("proj_in",), ("mar", "encoder_blocks"), ("mar", "z_proj")):
        a, b = _norm(_sub(g1, *part)), _norm(_sub(g01, *part))
        assert a > 0 and abs(b / a - 0.1) < 1e-5, (part, a, b)
    assert _norm(g1["mar"]["decoder_blocks"]) == 0.0
    np.testing.assert_allclose(
        np.asarray(g1["llm"]["norm"]["scale"]), np.asarray(g01["llm"]["norm"]["scale"]), rtol=1e-6
    )

    # A static per-sample bound on the label rows at or above each sample's 4 labelled rows gives
    # the same loss (logits only where labels are); below it, labels are dropped.
    @functools.partial(jax.jit, static_argnums=1)
    def bounded(params, rows):
        m = nnx.merge(graphdef, params, rest)
        return m.i2t_loss(
            images,
            und_ids,
            am,
            labels,
            jax.random.key(0),
            deterministic=True,
            label_rows_per_sample=rows,
        )

    np.testing.assert_allclose(float(bounded(params, 5)[0]), float(loss1), rtol=1e-6)
    np.testing.assert_allclose(float(bounded(params, 4)[0]), float(loss1), rtol=1e-6)
    assert int(bounded(params, 3)[1]["label_tokens"]) == 2 * 3


def test_t2i_sampler_without_cfg_with_key(tiny):
    cfg, model = tiny
    _, ids, am, _, _ = _batch(cfg)
    s = sampling.SampleSettings(num_iter=3, cfg=1.0, temperature=0.9, segments=2)
    f = nnx.jit(sampling.sample_t2i, static_argnames=("settings", "trace"))
    out = f(model, jnp.asarray(ids), jnp.asarray(am), settings=s, key=jax.random.key(0), trace=True)
    h, w = cfg.latent_grid()
    assert out["images"].shape == (2, cfg.image_size, cfg.image_size, 3)
    assert out["tokens"].shape == (2, h, w, cfg.mar.token_embed_dim)
    assert np.isfinite(np.asarray(out["images"])).all()
    # Every position is predicted exactly once, following the cosine schedule.
    pred = np.asarray(out["trace"]["pred"])
    assert (pred.sum(axis=0) == 1).all()
    counts, _ = cosine_mask_schedule(h * w, s.num_iter)
    assert (pred.sum(axis=2)[:, 0] == counts[:-1] - counts[1:]).all()
    assert (np.abs(np.asarray(out["tokens"])).sum(axis=-1) > 0).all()
    again = f(
        model, jnp.asarray(ids), jnp.asarray(am), settings=s, key=jax.random.key(0), trace=True
    )
    np.testing.assert_array_equal(np.asarray(again["tokens"]), np.asarray(out["tokens"]))


def test_every_param_has_logical_axes(tiny):
    _, model = tiny
    state = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]:
        names = var.get_metadata().get("out_sharding")
        where = jax.tree_util.keystr(path)
        assert names is not None, f"{where} has no logical axis names"
        assert len(names) == var.get_value().ndim, (
            f"{where}: {names} vs shape {var.get_value().shape}"
        )
        stacked = any(
            s in where for s in ("encoder_blocks", "decoder_blocks", "res_blocks", "'layers'")
        )
        assert (names[0] == "layers") == stacked, f"{where}: {names}"


def test_pixel_tokenizer_round_trip_and_config():
    cfg = HarmonConfig.from_fixture_json(TINY, tokenizer="pixel", pixel_patch=4)
    assert cfg.vae is None and cfg.mar.token_embed_dim == 48 and cfg.stride == 4
    assert "vae" not in convert.abstract_params(cfg)
    model = nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    tok = model.vae.tokenize(jnp.asarray(x))
    assert tok.shape == (2, 4, 4, 48)
    # Channels are ordered (c, p, q): entry c * p * p is pixel (0, 0) of the patch, channel c.
    np.testing.assert_allclose(np.asarray(tok[0, 1, 2, ::16]), x[0, 4, 8] * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.vae.detokenize(tok)), x, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="tokenizer must be"):
        HarmonConfig.from_fixture_json(TINY, tokenizer="vq")


def test_factorised_pixel_tokenizer_separates_occupancy_and_colour():
    from unified_mm.data.shapes import ShapesDataset
    from unified_mm.eval.shapes_detector import compare_to_truth, detect_objects
    from unified_mm.models.harmon.vae import PixelPatchTokenizer, PixelTokenizerConfig

    cfg = HarmonConfig.from_fixture_json(
        TINY, tokenizer="pixel", pixel_patch=8, pixel_colour_cell=4
    )
    assert cfg.mar.token_embed_dim == 64 + 3 * 4 and cfg.pixel.colour_cell == 4
    tok = PixelPatchTokenizer(cfg.pixel)
    # One 8 px patch: a red 3x3 block in its first 4x4 cell, a blue pixel in its last cell.
    img = np.full((1, 8, 8, 3), -1.0, np.float32)
    red, blue = np.array([0.8, -0.6, -0.6]), np.array([-0.6, -0.4, 0.9])
    img[0, 0:3, 0:3] = red
    img[0, 7, 7] = blue
    t = np.asarray(tok.tokenize(jnp.asarray(img)))[0, 0, 0] / 0.5  # TINY's scale is 0.5
    occupancy, colour = t[:64].reshape(8, 8), t[64:].reshape(3, 2, 2)
    assert occupancy.sum() == 10 * 1 - 54 and occupancy[0, 0] == 1 and occupancy[7, 7] == 1
    np.testing.assert_allclose(colour[:, 0, 0], red, atol=1e-6)
    np.testing.assert_allclose(colour[:, 1, 1], blue, atol=1e-6)
    np.testing.assert_array_equal(colour[:, 0, 1], [-1, -1, -1])  # an empty cell reads black
    np.testing.assert_allclose(np.asarray(tok.detokenize(tok.tokenize(jnp.asarray(img)))), img)

    # Flat-coloured shapes on black survive the round trip: the detector reads them back.
    ds = ShapesDataset("heldout", seed=3, image_size=32)
    examples = [ds[i] for i in range(40)]
    images = np.stack([e.image for e in examples]).astype(np.float32) / 127.5 - 1.0
    back = np.asarray(tok.detokenize(tok.tokenize(jnp.asarray(images))))
    back = np.clip(np.round((back + 1.0) * 127.5), 0, 255).astype(np.uint8)
    ok = [
        compare_to_truth(e.objects, detect_objects(b), image_size=32)
        for e, b in zip(examples, back)
    ]
    assert sum(ok) >= 39, f"{sum(ok)} of 40 reconstructions read back"
    with pytest.raises(ValueError, match="colour_cell 3 must be 0 or divide the patch 8"):
        PixelTokenizerConfig(patch=8, colour_cell=3)
    with pytest.raises(ValueError, match="pixel_colour_cell 4 is a pixel-tokenizer layout"):
        HarmonConfig.from_fixture_json(TINY, pixel_colour_cell=4)


def test_mar_pos_embed_splits_buffers_first(tiny):
    _, model = tiny
    table = np.asarray(model.mar.encoder_pos_embed_learned.get_value())
    out = np.asarray(model.mar.encoder_pos_embed(8, 8))
    nb = model.cfg.mar.buffer_size
    assert out.shape == (nb + 64, table.shape[1])
    np.testing.assert_array_equal(out[:nb], table[:nb])
    np.testing.assert_allclose(
        out[nb:], np.asarray(resize_pos_embed(jnp.asarray(table[nb:]), (4, 4), (8, 8)))
    )


def test_clip_denoised_bounds_the_predicted_x0_and_defaults_to_mar():
    from unified_mm.models.harmon import diffusion as gdiff

    s = gdiff.make_schedule("10", noise_schedule="cosine", diffusion_steps=1000)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    out = jnp.asarray(rng.normal(size=(6, 8)) * 3, jnp.float32)  # eps far from x: x_0 explodes
    t = jnp.full((6,), 9, jnp.int32)
    official = gdiff.p_mean_variance(s, out, x, t)
    clipped = gdiff.p_mean_variance(s, out, x, t, 1.0)
    assert float(jnp.abs(official["pred_xstart"]).max()) > 10.0
    assert float(jnp.abs(clipped["pred_xstart"]).max()) <= 1.0
    assert jnp.array_equal(official["log_variance"], clipped["log_variance"])
    # where x_0 is inside the bound the two agree exactly (t = 0: x_0 is about x_t)
    t0 = jnp.zeros((6,), jnp.int32)
    small = gdiff.p_mean_variance(s, jnp.zeros_like(out), 0.1 * x, t0, 1.0)
    same = gdiff.p_mean_variance(s, jnp.zeros_like(out), 0.1 * x, t0)
    assert float(jnp.abs(same["pred_xstart"]).max()) < 1.0
    assert jnp.array_equal(small["mean"], same["mean"])


def test_v_prediction_matches_epsilon_prediction_of_the_same_network():
    """A v-network and the epsilon-network it implies give the same posterior, loss target
    relation and variance; MAR's default stays epsilon and unknown kinds are refused."""
    from unified_mm.models.harmon import diffusion as gdiff

    s_eps = gdiff.make_schedule("10", noise_schedule="linear", diffusion_steps=1000)
    s_v = gdiff.make_schedule("10", noise_schedule="linear", diffusion_steps=1000, prediction="v")
    assert s_eps.prediction == "epsilon" and s_v.prediction == "v"
    rng = np.random.default_rng(1)
    n, c = 8, 5
    x0 = jnp.asarray(rng.uniform(-1, 1, size=(n, c)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 10, size=n), jnp.int32)
    ab = jnp.asarray(s_v.alphas_cumprod[np.asarray(t)], jnp.float32)[:, None]
    x_t = gdiff.q_sample(s_v, x0, t, noise)
    v_true = jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0
    # the true v means the true epsilon
    np.testing.assert_allclose(
        np.asarray(gdiff.epsilon_from_output(s_v, v_true, x_t, t)), np.asarray(noise), atol=1e-5
    )
    var = jnp.asarray(rng.uniform(-1, 1, size=(n, c)), jnp.float32)
    from_v = gdiff.p_mean_variance(s_v, jnp.concatenate([v_true, var], -1), x_t, t)
    from_eps = gdiff.p_mean_variance(s_eps, jnp.concatenate([noise, var], -1), x_t, t)
    for k in ("mean", "log_variance", "pred_xstart"):
        np.testing.assert_allclose(np.asarray(from_v[k]), np.asarray(from_eps[k]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(from_v["pred_xstart"]), np.asarray(x0), atol=1e-4)

    # the mse term regresses v (a network that outputs the true v has zero mse) ...
    def oracle(net_target):
        def fn(x, t_net):
            return jnp.concatenate([net_target, var], -1)

        return fn

    tv = gdiff.training_losses(s_v, oracle(v_true), x0, t, noise)
    te = gdiff.training_losses(s_eps, oracle(noise), x0, t, noise)
    assert float(jnp.abs(tv["mse"]).max()) < 1e-10
    assert float(jnp.abs(te["mse"]).max()) < 1e-10
    # ... and the variance term sees the same posterior either way
    np.testing.assert_allclose(np.asarray(tv["vb"]), np.asarray(te["vb"]), rtol=1e-3, atol=1e-5)
    # an epsilon output read as v is wrong: the mse is not zero
    assert float(gdiff.training_losses(s_v, oracle(noise), x0, t, noise)["mse"].mean()) > 0.1
    with pytest.raises(ValueError, match="prediction"):
        gdiff.make_schedule("10", prediction="x0")


def test_v_prediction_config_reaches_the_diffusion_head(tiny):
    import dataclasses

    from unified_mm.models.harmon.mar import MARConfig

    cfg = tiny[0].mar
    assert cfg.diffusion_prediction == "epsilon"  # MAR's default
    v_cfg = dataclasses.replace(cfg, diffusion_prediction="v")
    assert v_cfg.diffloss.train_schedule.prediction == "v"
    assert v_cfg.diffloss.gen_schedule.prediction == "v"
    d = {
        "img_size": 64,
        "vae_stride": 16,
        "patch_size": 1,
        "vae_embed_dim": 16,
        "encoder_embed_dim": 32,
        "encoder_depth": 1,
        "encoder_num_heads": 2,
        "decoder_embed_dim": 32,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
        "buffer_size": 4,
        "diffloss_d": 1,
        "diffloss_w": 32,
        "diffusion_prediction": "v",
    }
    assert MARConfig.from_fixture_json(d).diffloss.prediction == "v"


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_mask_ratio_min_outside_unit_interval_is_refused(tiny, ratio):
    import dataclasses

    with pytest.raises(ValueError, match=f"mask_ratio_min={ratio} must lie in"):
        dataclasses.replace(tiny[0].mar, mask_ratio_min=ratio)
    relaxed = dataclasses.replace(tiny[0].mar, mask_ratio_min=0.0)
    assert relaxed.max_visible(16) == 16
