"""GAN discriminators for tokenizer training, and DiffAug (vqrae_rae.md 5.4).

* `DinoDiscriminator`: RAE's frozen DINO ViT-S/8 (key bias zeroed at load time; tanh-GELU MLP as in
  RAE's re-implementation) with five trainable heads on the patch tokens after blocks 3, 6, 9, 12 and
  the final block output again (RAE's order: final first). Each head: SN-Conv1d(k=1), per-sample norm,
  LeakyReLU(0.2), a residual [SN-Conv1d(k=9, circular), per-sample norm, LeakyReLU] scaled by 1/sqrt 2,
  then SN-Conv1d(-> 1). Input in [-1, 1], bilinearly resized to 224 and mapped to ImageNet statistics.
* `PatchDiscriminator`: a small convolutional PatchGAN for CPU runs (ASSUMPTION: GroupNorm in place of
  taming's BatchNorm so the step stays a pure function of the parameters).

Spectral norm: torch keeps a persistent power-iteration vector u updated once per training forward.
Mutable state inside the loss would break the pure train step, so here u is a fixed random buffer and
`power_iterations` iterations run from it on every call (stop-gradient), then sigma = u^T W v.
ASSUMPTION/deviation: with 4 iterations sigma is close to the top singular value, like torch's after
warm-up; the exact torch trajectory is not reproduced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unified_mm.models.vqrae.config import IMAGENET_MEAN, IMAGENET_STD, DiscConfig, EncoderConfig
from unified_mm.models.vqrae.dinov2 import Dinov2RegEncoder
from unified_mm.models.vqrae.resize import resize

Array = jax.Array


class SpectralVector(nnx.Variable):
    """Fixed power-iteration start vector of a spectrally normalised weight (never trained)."""


def _l2n(x: Array, eps: float = 1e-12) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SNConv1d(nnx.Module):
    """Spectrally normalised Conv1d over tokens, channels last; circular padding as RAE's heads."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, iters: int, rngs: nnx.Rngs):
        bound = (c_in * kernel_size) ** -0.5  # torch Conv1d default init range
        k1, k2, k3 = jax.random.split(rngs.params(), 3)
        self.kernel = nnx.Param(
            jax.random.uniform(k1, (kernel_size, c_in, c_out), jnp.float32, -bound, bound),
            out_sharding=("conv_width", "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(
            jax.random.uniform(k2, (c_out,), jnp.float32, -bound, bound), out_sharding=("conv_out",)
        )
        self.u = SpectralVector(
            _l2n(jax.random.normal(k3, (c_out,), jnp.float32)), out_sharding=("conv_out",)
        )
        self.iters = iters
        self.kernel_size = kernel_size

    def sigma(self) -> Array:
        k = self.kernel[...]
        w = k.transpose(2, 1, 0).reshape(
            k.shape[2], -1
        )  # torch weight [out, in, k] flattened, dim=0
        u = self.u[...]
        ws = jax.lax.stop_gradient(w)
        v = _l2n(ws.T @ u)
        for _ in range(self.iters):
            u = _l2n(ws @ v)
            v = _l2n(ws.T @ u)
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        return u @ (w @ v)

    def __call__(self, x: Array) -> Array:
        pad = self.kernel_size // 2
        if pad:
            x = jnp.concatenate([x[:, -pad:], x, x[:, :pad]], axis=1)
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...] / self.sigma(),
            (1,),
            "VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...]


class SampleNorm(nnx.Module):
    """RAE's BatchNormLocal with virtual batch 1: per-sample, per-channel norm over the token axis."""

    def __init__(self, c: int, eps: float):
        self.scale = nnx.Param(jnp.ones((c,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((c,)), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        mean = x.mean(axis=1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class DiscHead(nnx.Module):
    def __init__(self, c: int, kernel_size: int, eps: float, *, iters: int, rngs: nnx.Rngs):
        self.conv_in = SNConv1d(c, c, 1, iters=iters, rngs=rngs)
        self.norm_in = SampleNorm(c, eps)
        self.conv_res = SNConv1d(c, c, kernel_size, iters=iters, rngs=rngs)
        self.norm_res = SampleNorm(c, eps)
        self.conv_out = SNConv1d(c, 1, 1, iters=iters, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.leaky_relu(self.norm_in(self.conv_in(x)), 0.2)
        r = jax.nn.leaky_relu(self.norm_res(self.conv_res(x)), 0.2)
        x = (r + x) * 2**-0.5
        return self.conv_out(x)[..., 0]


def dino_backbone_config(cfg: DiscConfig) -> EncoderConfig:
    """DINO v1 ViT as a register-free, LayerScale-free DINOv2-style encoder (final norm unused)."""
    return EncoderConfig(
        kind="dinov2_reg",
        image_size=cfg.dino_input_size,
        patch_size=cfg.dino_patch_size,
        hidden_size=cfg.dino_hidden_size,
        num_layers=cfg.dino_num_layers,
        num_heads=cfg.dino_num_heads,
        mlp_dim=cfg.dino_mlp_dim,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu_tanh",
        num_register_tokens=0,
        layerscale_value=None,
        final_ln=False,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


class DinoDiscriminator(nnx.Module):
    def __init__(self, cfg: DiscConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = Dinov2RegEncoder(dino_backbone_config(cfg), rngs=rngs)
        depths = tuple(d for d in cfg.key_depths if d < cfg.dino_num_layers)
        self.depths = depths
        self.heads = nnx.List(
            [
                DiscHead(
                    cfg.dino_hidden_size,
                    cfg.head_kernel_size,
                    cfg.norm_eps,
                    iters=cfg.power_iterations,
                    rngs=rngs,
                )
                for _ in range(len(depths) + 1)
            ]
        )

    def __call__(self, x: Array) -> Array:
        """Images in [-1, 1], NHWC -> logits [B, 5 * tokens]."""
        s = self.cfg.dino_input_size
        x = resize(x.astype(jnp.float32), (s, s), method="bilinear")
        mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
        x = ((x + 1) * 0.5 - mean) / std
        bb = self.backbone
        tokens = bb.embed(x)
        feats = bb.blocks.outputs(tokens, [d + 1 for d in self.depths] + [bb.cfg.num_layers])
        final = feats.pop()
        acts = [final] + feats  # RAE inserts the final output first
        acts = [a[:, bb.num_prefix_tokens :].astype(jnp.float32) for a in acts]
        return jnp.concatenate([h(a) for h, a in zip(self.heads, acts, strict=True)], axis=1)


class PatchDiscriminator(nnx.Module):
    """Conv k4 s2 stages with GroupNorm and LeakyReLU(0.2), then a 1-channel k4 s1 logit map."""

    def __init__(self, cfg: DiscConfig, *, rngs: nnx.Rngs):
        names = ("conv_height", "conv_width", "conv_in", "conv_out")

        def conv(cin: int, cout: int, stride: int) -> nnx.Conv:
            return nnx.Conv(
                cin,
                cout,
                kernel_size=(4, 4),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
                rngs=rngs,
            )

        ch = cfg.patch_channels
        convs, norms = [conv(3, ch, 2)], []
        c = ch
        for i in range(1, cfg.patch_layers + 1):
            c_next = ch * min(2**i, 8)
            convs.append(conv(c, c_next, 2 if i < cfg.patch_layers else 1))
            norms.append(
                nnx.GroupNorm(
                    c_next,
                    num_groups=min(32, c_next // 4 or 1),
                    rngs=rngs,
                    scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
                )
            )
            c = c_next
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.out = conv(c, 1, 1)

    def __call__(self, x: Array) -> Array:
        h = jax.nn.leaky_relu(self.convs[0](x.astype(jnp.float32)), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
        return self.out(h).reshape(x.shape[0], -1)


def build_discriminator(cfg: DiscConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.kind == "dino":
        return DinoDiscriminator(cfg, rngs=rngs)
    if cfg.kind == "patch":
        return PatchDiscriminator(cfg, rngs=rngs)
    raise ValueError(f"DiscConfig.kind must be dino|patch, got {cfg.kind!r}")


def diffaug(x: Array, key: Array) -> Array:
    """RAE's DiffAug (prob 1, cutout off): integer translation up to 1/8 with zero fill, brightness
    +U(-.5,.5), saturation xU(0,2), contrast xU(.5,1.5); one draw per image. x: [B, H, W, C]."""
    b, h, w, _ = x.shape
    r = jax.random.uniform(key, (5, b, 1, 1, 1), jnp.float32)
    dh, dw = round(h * 0.125), round(w * 0.125)
    th = jnp.floor(r[0, :, 0, 0, 0] * (2 * dh + 1)).astype(jnp.int32) - dh
    tw = jnp.floor(r[1, :, 0, 0, 0] * (2 * dw + 1)).astype(jnp.int32) - dw
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.clip(jnp.arange(h)[None, :] + th[:, None] + 1, 0, h + 1)  # [B, H]
    cols = jnp.clip(jnp.arange(w)[None, :] + tw[:, None] + 1, 0, w + 1)  # [B, W]
    x = jax.vmap(lambda img, rr, cc: img[rr][:, cc])(xp, rows, cols)
    x = x + (r[2] - 0.5)
    m = x.mean(axis=-1, keepdims=True)
    x = (x - m) * (r[3] * 2) + m
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - m) * (r[4] + 0.5) + m
