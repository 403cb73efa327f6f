"""The analytic FLOP models behind MFU (models/flops_common.py, harmon/flops.py, vqrae/flops.py)
against XLA's cost analysis of the real functions, compiled at tiny sizes.

Why the comparison is exact enough: XLA's ``cost_analysis()["flops"]`` counts every dot and
convolution at 2 FLOPs per multiply-add (convolutions over the taps that land on real input, as
the analytic conv models do) plus the elementwise work (norms, softmax, GELU's erf polynomial,
losses) the analytic models leave out; it counts a ``lax.scan``-ned body once, so every stack
here has depth 1. At width 256 on tens of tokens matmuls dominate, so XLA >= analytic with a
gap under 5 % (measured forward ratios 0.956-0.998): the bounds are ``FORWARD_LO`` <= analytic
/ XLA <= 1. A dropped matmul of a block moves the ratio down by more than that, a counted
matmul the code does not run moves it above 1 (Harmon's i2t counted proj_out this way: 1.014).

Two conventions are added back before comparing: MaxText's causal halving (the Qwen2 here
computes the full score matrix under a mask, so XLA sees the other half too: ``causal_half``),
and, for training steps, the model-FLOPs rule that a trained layer costs 3 x forward even where
XLA skips its input gradient (patch embedding, ``proj_in`` behind stop_gradient, C.W with the
frozen C): up to 2 % here, hence ``TRAIN_HI``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx
from trained_checkpoints import load_config

import unified_mm  # noqa: F401  (nnx.use_eager_sharding(False))
from unified_mm import families
from unified_mm.models.flops_common import xla_flops
from unified_mm.models.harmon import flops as harmon_flops
from unified_mm.models.harmon.harmon import HarmonConfig
from unified_mm.models.harmon.vae import AutoencoderKL
from unified_mm.models.vqrae import flops as vqrae_flops
from unified_mm.models.vqrae.config import (
    DiscConfig,
    EncoderConfig,
    SimVQConfig,
    VQRAEConfig,
)
from unified_mm.models.vqrae.decoder import ViTDecoder
from unified_mm.models.vqrae.discriminator import build_discriminator
from unified_mm.models.vqrae.lpips import LPIPS
from unified_mm.models.vqrae.simvq import SimVQ
from unified_mm.models.vqrae.vqrae import build_encoder
from unified_mm.train.stages import stages_from_config

W = 256  # wide enough for matmuls to dominate, cheap to compile
B = 2  # rows per task: per-call work (C.W) is spread over them by the analytic model
FORWARD_LO = 0.94
TRAIN_HI = 1.02
SDS = jax.ShapeDtypeStruct


def causal_half(llm, tokens: int) -> float:
    """The masked half of the causal scores and values that XLA counts and MaxText does not."""
    return llm.num_hidden_layers * 2.0 * tokens**2 * llm.num_attention_heads * llm.head_dim


def module_flops(make, *args, static: tuple = ()) -> float:
    """XLA FLOPs of ``make()(*args, *static)`` with abstract parameters (nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return xla_flops(lambda s, *a: nnx.merge(graphdef, s)(*a, *static), state, *args)


def images(size: int) -> SDS:
    return SDS((B, size, size, 3), jnp.float32)


# ----------------------------------------------------------------------------- VQRAE modules
def _encoder(kind: str) -> EncoderConfig:
    dino = kind == "dinov2_reg"
    return EncoderConfig(
        kind=kind,
        image_size=32,
        patch_size=4,
        hidden_size=W,
        num_layers=1,
        num_heads=4,
        mlp_dim=4 * W,
        num_register_tokens=4 if dino else 0,
        layerscale_value=1.0 if dino else None,
    )


def _tokenizer() -> VQRAEConfig:
    return VQRAEConfig(encoder=_encoder("vit"), quantizer=SimVQConfig(codebook_size=64, code_dim=W))


def _encoder_case(kind):
    enc = _encoder(kind)
    return (
        lambda: build_encoder(enc, rngs=nnx.Rngs(0)),
        (images(32),),
        (),
        vqrae_flops.encoder_flops(enc),
    )


def _decoder_case():
    cfg = _tokenizer()
    dec = cfg.decoder.resolved(cfg.encoder)
    tokens = SDS((B, cfg.encoder.grid**2, W), jnp.float32)
    g = (cfg.encoder.grid,) * 2
    make = lambda: ViTDecoder(dec, W, rngs=nnx.Rngs(0))  # noqa: E731
    return make, (tokens,), (g,), vqrae_flops.decoder_flops(cfg)


def _simvq_case():
    cfg = _tokenizer()
    z = SDS((B, cfg.encoder.grid**2, W), jnp.float32)
    parts = vqrae_flops.tokenizer_parts(cfg, distill=False, gan_on=False, examples_per_call=B)
    expected = sum(p.forward for p in parts if p.name.startswith("quantizer."))
    return lambda: SimVQ(cfg.quantizer, W, W, rngs=nnx.Rngs(0)), (z,), (), expected


def _lpips_case():
    # reconstruction and target run as one batch of 2B images
    return LPIPS, (images(32), images(32)), (), 2 * vqrae_flops.lpips_flops(32)


def _disc_case(disc: DiscConfig):
    backbone, heads = vqrae_flops.discriminator_flops(disc, 32)
    make = lambda: build_discriminator(disc, rngs=nnx.Rngs(0))  # noqa: E731
    return make, (images(32),), (), backbone + heads


DINO = DiscConfig(
    kind="dino",
    dino_input_size=48,  # != the image size: the bilinear resize matmuls run
    dino_patch_size=8,
    dino_hidden_size=W,
    dino_num_layers=2,
    dino_num_heads=4,
    dino_mlp_dim=4 * W,
    key_depths=(0,),  # one block to the first tap, one more to the final: 2 heads
    head_kernel_size=3,
)
MODULE_CASES = {
    "encoder_vit": lambda: _encoder_case("vit"),
    "encoder_dinov2_reg": lambda: _encoder_case("dinov2_reg"),
    "decoder": _decoder_case,
    "simvq": _simvq_case,
    "lpips": _lpips_case,
    "disc_patch": lambda: _disc_case(DiscConfig(kind="patch", patch_channels=32)),
    "disc_dino": lambda: _disc_case(DINO),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_vqrae_module_forward_matches_xla(name):
    make, args, static, per_example = MODULE_CASES[name]()
    xla = module_flops(make, *args, static=static) / B
    ratio = per_example / xla
    print(f"{name}: analytic {per_example:.4g}, XLA {xla:.4g}, ratio {ratio:.4f}")
    assert FORWARD_LO <= ratio <= 1.0, (name, ratio)


def test_harmon_vae_encoder_matches_xla():
    """The KL-16 VAE encoder (loop-free, so XLA's count is the whole of it) at a tiny width."""
    from test_harmon_units import TINY  # the units tests' tiny KL-16 layout

    tiny = dict(TINY, vae=dict(TINY["vae"], ch=32, norm_num_groups=8))
    cfg = HarmonConfig.from_fixture_json(tiny)
    make = lambda: AutoencoderKL(cfg.vae, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, state = nnx.split(nnx.eval_shape(make))
    xla = xla_flops(lambda s, x: nnx.merge(graphdef, s).tokenize(x), state, images(32)) / B
    ratio = harmon_flops.vae_encode_flops(cfg, 32) / xla
    print(f"vae encoder: ratio {ratio:.4f}")
    assert FORWARD_LO <= ratio <= 1.0


# ----------------------------------------------------------------------------- VQRAE stages
def _vqrae_config(gan: bool) -> ml_collections.ConfigDict:
    """configs/shapes_vqrae.py:smoke at depth 1 and width W, with or without the patch GAN (on
    from step 0, so its adaptive weight counts). LPIPS stays off: its VGG backward alone takes
    ~10 s to compile here; its forward is checked above and its pass rule (THROUGH) is the one
    the GAN's generator side checks."""
    c = load_config("shapes_vqrae", "smoke")
    with c.unlocked():
        t = c.model.tokenizer
        t.encoder.update(hidden_size=W, num_layers=1, mlp_dim=4 * W)
        t.quantizer.update(codebook_size=64, code_dim=W)
        t.loss.update(gan_weight=0.1 if gan else 0.0, gan_start_step=0, disc_start_step=0)
        t.loss.disc.update(patch_channels=8, patch_layers=1)
        c.model.llm.update(
            hidden_size=W, intermediate_size=2 * W, num_hidden_layers=1, head_dim=W // 4
        )
    return c


@pytest.fixture(scope="module")
def vqrae_setups():
    """{gan: (config, family, graphdef, abstract state)}, built on first use."""
    cache = {}

    def get(gan: bool):
        if gan not in cache:
            config = _vqrae_config(gan)
            family = families.build(config)
            model = nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0)))
            cache[gan] = (config, family, *nnx.split(model))
        return cache[gan]

    return get


@pytest.mark.parametrize(
    "stage_name, gan",
    [("encoder", False), ("tokenizer", False), ("distill", True), ("unified", False)],
)
def test_vqrae_stage_matches_xla(vqrae_setups, stage_name, gan):
    """Each stage's loss as the trainer runs it: the forward against the parts' forward FLOPs,
    the gradient w.r.t. the stage's trainable groups against the parts' pass counts. The GAN
    (the slowest to compile) is on in the distill stage, which runs every other part too."""
    config, family, graphdef, state = vqrae_setups(gan)
    (stage,) = [s for s in stages_from_config(config) if s.name == stage_name]
    batch = family.abstract_batch(stage, {t: B for t in stage.task_batch})
    step = SDS((), jnp.int32)  # traced, as in the train step: the GAN's lax.cond is compiled
    groups = family.param_groups()
    trainable = nnx.All(nnx.Param, nnx.Any(*[groups[g] for g in stage.trainable]))
    trained, frozen = nnx.split_state(state, trainable, ...)

    def loss(params, batch, step):
        model = nnx.merge(graphdef, *params)
        return family.loss(model, batch, jax.random.key(0), step=step, stage=stage)[0]

    xla_forward = xla_flops(lambda t, f, b, s: loss((t, f), b, s), trained, frozen, batch, step)
    xla_train = xla_flops(
        lambda t, f, b, s: jax.grad(lambda t: loss((t, f), b, s))(t), trained, frozen, batch, step
    )
    kw = dict(
        objective=stage.options["objective"],
        distill=bool(stage.options.get("distill", False)),
        gan_on=True,
        text_len=int(config.data.max_text_len),
        und_len=int(config.data.max_und_len),
        examples_per_call=B,
    )
    forward = train = 0.0
    grid2 = family.tokenizer_cfg.encoder.grid**2
    llm_tokens = {"t2i": int(config.data.max_text_len) + grid2, "i2t": int(config.data.max_und_len)}
    for task in stage.task_batch:
        parts = vqrae_flops.stage_parts(family.model_cfg, task, **kw)
        half = causal_half(family.model_cfg.llm, llm_tokens[task]) if task in llm_tokens else 0.0
        forward += sum(p.forward for p in parts) + half
        train += sum(p.training for p in parts) + 3 * half
    r_fwd, r_train = forward / (xla_forward / B), train / (xla_train / B)
    print(f"{stage_name}: forward ratio {r_fwd:.4f}, training ratio {r_train:.4f}")
    assert FORWARD_LO <= r_fwd <= 1.0
    assert FORWARD_LO <= r_train <= TRAIN_HI
    # the family's own figure is the sum of the parts' training counts
    per_example = family.flops_per_example(stage)
    assert set(per_example) == set(stage.task_batch) and all(v > 0 for v in per_example.values())


# ----------------------------------------------------------------------------- Harmon
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


# ----------------------------------------------------------------------------- the families
@pytest.mark.parametrize("name", ["shapes_vqrae", "vqrae_siglip2"])
def test_every_vqrae_stage_has_flops_for_its_tasks(name):
    config = load_config(name)
    family = families.build(config)
    for stage in stages_from_config(config):
        per_example = family.flops_per_example(stage)
        assert set(per_example) == set(stage.task_batch), stage.name
        assert all(v > 0 for v in per_example.values()), (stage.name, per_example)


def test_adaptive_gan_weight_counted_only_once_the_stage_reaches_it():
    """The smoke config's GAN starts at step 5: the tokenizer stage (steps 2-3) never runs the
    adaptive weight's extra passes, the distill stage (steps 4-5) does."""
    config = load_config("shapes_vqrae", "smoke")
    stages = {s.name: s for s in stages_from_config(config)}
    family = families.build(config)
    before = family.flops_per_example(stages["tokenizer"])["image"]
    with config.unlocked():
        config.model.tokenizer.loss.gan_start_step = 0
    from_start = families.build(config).flops_per_example(stages["tokenizer"])["image"]
    assert from_start > before
    with config.unlocked():
        config.model.tokenizer.loss.gan_weight = 0.0
    no_gan = families.build(config).flops_per_example(stages["tokenizer"])["image"]
    assert no_gan < before


@pytest.mark.parametrize(
    "stage_name, task", [("align", "t2i"), ("align", "i2t"), ("full", "t2i"), ("full", "i2t")]
)
def test_harmon_training_matches_xla(harmon_setup, stage_name, task):
    """The gradient w.r.t. a stage's trainable groups against the 3 / 2 / 1 pass rule: in the
    align stage the frozen LLM still carries the input gradient back to the MAR encoder (2 x),
    and the frozen VAE never does (1 x)."""
    c, family, graphdef, state, _ = harmon_setup
    (stage,) = [s for s in stages_from_config(c) if s.name == stage_name]
    cfg = family.model_cfg
    batch = family.abstract_batch(stage, {task: B})
    groups = family.param_groups()
    trainable = nnx.All(nnx.Param, nnx.Any(*[groups[g] for g in stage.trainable]))
    trained, frozen = nnx.split_state(state, trainable, ...)

    def loss(t, f, b):
        model = nnx.merge(graphdef, t, f)
        return family.loss(model, b, jax.random.key(0), step=0, stage=stage)[0]

    xla = xla_flops(jax.grad(loss), trained, frozen, batch) / B
    h, w = cfg.latent_grid(stage.image_size)
    if task == "t2i":
        tokens = int(c.data.max_text_len) + cfg.mar.buffer_size + cfg.mar.max_visible(h * w)
    else:
        tokens = int(c.data.max_und_len)
    llm_passes = 3.0 if "llm" in stage.trainable else 2.0
    analytic = family.flops_per_example(stage)[task] + llm_passes * causal_half(cfg.llm, tokens)
    ratio = analytic / xla
    print(f"harmon {stage_name} {task}: training ratio {ratio:.4f}")
    assert FORWARD_LO <= ratio <= TRAIN_HI
    if stage_name == "align":  # the frozen LLM counts 2 x, not 3 x
        full = _flops_if_everything_trained(c, family, stage, task)
        assert family.flops_per_example(stage)[task] < full


def _flops_if_everything_trained(c, family, stage, task: str) -> float:
    """The same task under the default rule: every group but the VAE trains."""
    return harmon_flops.training_flops_per_example(
        family.model_cfg,
        image_size=stage.image_size,
        text_len=int(c.data.max_text_len),
        und_len=int(c.data.max_und_len),
    )[task]
