"""The analytic FLOP models behind MFU (models/flops_common.py, harmon/flops.py)
against XLA's cost analysis of the real functions, compiled at tiny sizes.

Why the comparison is exact enough: XLA's ``cost_analysis()["flops"]`` counts every dot and
convolution at 2 FLOPs per multiply-add (convolutions over the taps that land on real input, as
the analytic conv models do) plus the elementwise work (norms, softmax, GELU's erf polynomial,
losses) the analytic models leave out; it counts a ``lax.scan``-ned body once, so every stack
here has depth 1. At width 256 on tens of tokens matmuls dominate, so XLA >= analytic with a
gap under 5 % (measured forward ratios 0.956-0.998): the bounds are ``FORWARD_LO`` <= analytic
/ XLA <= 1. A dropped matmul of a block moves the ratio down by more than that, a counted
matmul the code does not run moves it above 1 (Harmon's i2t counted proj_out this way: 1.014).

MaxText's causal halving is added back before comparing: the Qwen2 here computes the full score
matrix under a mask, so XLA sees the other half too (``causal_half``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from trained_checkpoints import load_config

import unified_mm  # noqa: F401  (nnx.use_eager_sharding(False))
from unified_mm import families
from unified_mm.models.flops_common import xla_flops
from unified_mm.models.harmon import flops as harmon_flops
from unified_mm.train.stages import stages_from_config

W = 256  # wide enough for matmuls to dominate, cheap to compile
B = 2  # rows per task: per-call work (C.W) is spread over them by the analytic model
FORWARD_LO = 0.94
SDS = jax.ShapeDtypeStruct


def causal_half(llm, tokens: int) -> float:
    """The masked half of the causal scores and values that XLA counts and MaxText does not."""
    return llm.num_hidden_layers * 2.0 * tokens**2 * llm.num_attention_heads * llm.head_dim


def images(size: int) -> SDS:
    return SDS((B, size, size, 3), jnp.float32)


# ----------------------------------------------------------------------------- Harmon
def test_harmon_vae_encoder_matches_xla():
    """The KL-16 VAE encoder (loop-free, so XLA's count is the whole of it) at a tiny width."""
    from test_harmon_units import TINY

    from unified_mm.models.harmon.harmon import HarmonConfig
    from unified_mm.models.harmon.vae import AutoencoderKL

    tiny = dict(TINY, vae=dict(TINY["vae"], ch=32, norm_num_groups=8))
    cfg = HarmonConfig.from_fixture_json(tiny)
    make = lambda: AutoencoderKL(cfg.vae, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, state = nnx.split(nnx.eval_shape(make))
    xla = xla_flops(lambda s, x: nnx.merge(graphdef, s).tokenize(x), state, images(32)) / B
    ratio = harmon_flops.vae_encode_flops(cfg, 32) / xla
    print(f"vae encoder: ratio {ratio:.4f}")
    assert FORWARD_LO <= ratio <= 1.0


@pytest.fixture(scope="module")
def harmon_setup():
    c = load_config("shapes_harmon", "smoke")
    with c.unlocked():
        c.model.mar.update(
            encoder_embed_dim=W, decoder_embed_dim=W, encoder_depth=1, decoder_depth=1
        )
        c.model.mar.update(diffloss_d=1, diffloss_w=W)
        c.model.llm.update(
            hidden_size=W, intermediate_size=2 * W, num_hidden_layers=1, head_dim=W // 4
        )
    family = families.build(c)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0))))
    (stage,) = [s for s in stages_from_config(c) if s.name == "full"]
    return c, family, graphdef, state, stage


@pytest.mark.parametrize("task", ["t2i", "i2t"])
def test_harmon_forward_matches_xla(harmon_setup, task):
    c, family, graphdef, state, stage = harmon_setup
    cfg = family.model_cfg
    batch = family.abstract_batch(stage, {task: B})

    def loss(s, b):
        return family.loss(nnx.merge(graphdef, s), b, jax.random.key(0), step=0, stage=stage)[0]

    xla = xla_flops(loss, state, batch) / B
    h, w = cfg.latent_grid(stage.image_size)
    if task == "t2i":
        analytic = harmon_flops.t2i_forward_flops(
            cfg, image_size=stage.image_size, text_len=int(c.data.max_text_len)
        )
        tokens = int(c.data.max_text_len) + cfg.mar.buffer_size + cfg.mar.max_visible(h * w)
    else:
        analytic = harmon_flops.i2t_forward_flops(
            cfg, image_size=stage.image_size, und_len=int(c.data.max_und_len)
        )
        tokens = int(c.data.max_und_len)
    ratio = (analytic + causal_half(cfg.llm, tokens)) / xla
    print(f"harmon {task}: ratio {ratio:.4f}")
    assert FORWARD_LO <= ratio <= 1.0
