"""Stage-3 VQRAE unified model, tiny: losses with gradients, sampling, answering, cache consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.llm.qwen2 import Qwen2Config
from unified_mm.models.vqrae.config import EncoderConfig, LossConfig, SimVQConfig, VQRAEConfig
from unified_mm.models.vqrae.unified import UnifiedConfig, VQRAEUnified, unified_trainable_filter

TEXT_VOCAB, K, IMG = 40, 32, 3  # IMG: the image placeholder id
N = 16  # 16x16 images, patch 4


@pytest.fixture(scope="module")
def model():
    enc = EncoderConfig(
        kind="vit",
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    )
    tok = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=K, code_dim=48),
        loss=LossConfig(gan_weight=0.0, lpips_weight=0.0),
    )
    llm = Qwen2Config(
        vocab_size=TEXT_VOCAB + K + 2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    cfg = UnifiedConfig(tokenizer=tok, llm=llm, text_vocab_size=TEXT_VOCAB, image_token_id=IMG)
    return VQRAEUnified(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def _images(seed, b=2):
    return jax.random.uniform(jax.random.key(seed), (b, 16, 16, 3), minval=-1.0, maxval=1.0)


def _i2t_batch():
    # [bos, image x 16, question(3), answer(2), pad]; row 1 has one pad fewer in the question.
    ids = np.array([[1] + [IMG] * N + [5, 6, 7, 8, 9, 0], [1] + [IMG] * N + [5, 6, 10, 11, 0, 0]])
    mask = (np.arange(ids.shape[1])[None] < np.array([[23], [22]])).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[0, 20:22], labels[1, 19:21] = ids[0, 20:22], ids[1, 19:21]
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels)


def test_config_validation(model):
    cfg = model.cfg
    assert (cfg.code_offset, cfg.boi_id, cfg.eoi_id) == (
        TEXT_VOCAB,
        TEXT_VOCAB + K,
        TEXT_VOCAB + K + 1,
    )
    with pytest.raises(ValueError, match="vocab_size"):
        UnifiedConfig(
            tokenizer=cfg.tokenizer, llm=cfg.llm, text_vocab_size=TEXT_VOCAB + 1, image_token_id=IMG
        )


def test_losses_are_finite_with_gradients(model):
    ids, mask, labels = _i2t_batch()
    text = jnp.asarray([[1, 12, 13, 14], [1, 15, 16, 0]])
    text_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]])
    graphdef, params, rest = nnx.split(model, unified_trainable_filter(), ...)

    @jax.jit
    def grads(params):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            l1, m1 = m.i2t_loss(_images(0), ids, mask, labels, None)
            l2, m2 = m.t2i_loss(_images(1), text, text_mask, jax.random.key(2))
            return l1 + l2, {**m1, **m2}

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (total, met), g = grads(params)
    print({k: round(float(v), 4) for k, v in met.items()})
    assert np.isfinite(float(total))
    assert float(met["i2t/tokens"]) == 4.0
    # Random init: CE close to log(V) for i2t; t2i over the same extended vocabulary.
    assert abs(float(met["i2t/loss"]) - np.log(TEXT_VOCAB + K + 2)) < 1.0
    assert abs(float(met["t2i/loss"]) - np.log(TEXT_VOCAB + K + 2)) < 1.0
    tops = {p[0] for p, _ in nnx.to_flat_state(g)}
    assert tops == {"projector", "llm"}  # the tokenizer is frozen
    norms = {p[0]: 0.0 for p, _ in nnx.to_flat_state(g)}
    for p, v in nnx.to_flat_state(g):
        assert np.isfinite(np.asarray(v[...])).all()
        norms[p[0]] += float(jnp.sum(jnp.square(v[...])))
    assert norms["projector"] > 0 and norms["llm"] > 0
    with pytest.raises(ValueError, match="image placeholders"):
        model.i2t_loss(_images(0), ids.at[0, 1].set(5), mask, labels, None)


def test_sampling_decodes_images_and_matches_teacher_forcing(model):
    text = jnp.asarray([[1, 12, 13, 14], [1, 15, 16, 0]])
    text_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]])
    null = jnp.asarray([[1, 2]])
    null_mask = jnp.asarray([[1, 1]])
    sample = nnx.jit(VQRAEUnified.sample_t2i, static_argnames=("top_k", "grid", "greedy"))
    images, codes = sample(
        model,
        text,
        text_mask,
        null,
        null_mask,
        jax.random.key(3),
        temperature=1.0,
        top_k=8,
        cfg_scale=3.0,
        grid=(4, 4),
    )
    assert images.shape == (2, 16, 16, 3) and codes.shape == (2, N) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    assert np.isfinite(np.asarray(images)).all()
    # Greedy without CFG must equal the argmax of the teacher-forced training forward: the KV-cache
    # sampler and the t2i training layout (positions, <boi>, padding) agree.
    _, greedy_codes = sample(
        model, text, text_mask, None, None, jax.random.key(0), grid=(4, 4), greedy=True
    )
    logits = nnx.jit(VQRAEUnified.t2i_logits)(model, text, text_mask, greedy_codes)
    forced = jnp.argmax(logits[..., TEXT_VOCAB : TEXT_VOCAB + K], axis=-1)
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(greedy_codes))


def test_generate_i2t_returns_ids(model):
    ids, mask, _ = _i2t_batch()
    gen = nnx.jit(
        VQRAEUnified.generate_i2t,
        static_argnames=("max_new_tokens", "eos_id", "pad_id", "top_k", "greedy"),
    )
    new_ids, logits = gen(model, _images(0), ids, mask, max_new_tokens=5, eos_id=2, pad_id=0)
    assert new_ids.shape == (2, 5) and new_ids.dtype == jnp.int32
    assert logits.shape == (2, 5, TEXT_VOCAB + K + 2)
    assert int(new_ids.min()) >= 0 and int(new_ids.max()) < TEXT_VOCAB + K + 2
