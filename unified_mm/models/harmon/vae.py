"""KL-16 VAE (the LDM AutoencoderKL that MAR and Harmon keep frozen) and a parameter-free pixel
tokenizer with the same interface.

Layout is NHWC throughout (images [B, H, W, 3] in [-1, 1], latents [B, h, w, z]). Parameter names
mirror the official module tree (`encoder.down.{i}.block.{j}.conv1`, ...) so the converter is a
mechanical rename plus OIHW -> HWIO.

Numerics follow the official code (harmon_mar.md 1.1 and pitfall 12): GroupNorm eps 1e-6 with the
group count from the config, swish, asymmetric (0, 1, 0, 1) zero pad + stride-2 VALID convolution to
downsample, nearest x2 then 3x3 convolution to upsample, logvar clamped to [-30, 20].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from unified_mm.models.harmon.diffloss import norm_param

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# PyTorch's default Conv2d init (kaiming_uniform, a=sqrt(5)); the VAE is normally loaded frozen.
_TORCH_DEFAULT_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters (the fixture config.json `vae` section)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 16
    embed_dim: int = 16
    double_z: bool = True
    use_variational: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    encoder_attn_levels: tuple[int, ...] = (4,)
    decoder_attn_levels: tuple[int, ...] = ()
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    # Harmon's latent scale (tokens = mode * scale) and the MAR patch folded into token channels.
    scale: float = 0.2325
    patch_size: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        for width in (self.ch * m for m in self.ch_mult):
            if width % self.norm_num_groups:
                raise ValueError(
                    f"VAE width {width} is not divisible by norm_num_groups={self.norm_num_groups}"
                )

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_dim(self) -> int:
        return self.embed_dim * self.patch_size**2

    @classmethod
    def from_fixture_json(cls, d: dict, *, scale: float, patch_size: int, dtype: str) -> VAEConfig:
        levels = len(d["ch_mult"])

        def levels_from(res_key: str, level_key: str) -> tuple[int, ...]:
            if level_key in d:
                return tuple(int(i) for i in d[level_key])
            res = int(d.get("resolution_param", 256))
            return tuple(i for i in range(levels) if res // 2**i in d.get(res_key, ()))

        return cls(
            ch=int(d["ch"]),
            ch_mult=tuple(int(m) for m in d["ch_mult"]),
            num_res_blocks=int(d["num_res_blocks"]),
            in_channels=int(d.get("in_channels", 3)),
            out_ch=int(d.get("out_ch", 3)),
            z_channels=int(d["z_channels"]),
            embed_dim=int(d["embed_dim"]),
            double_z=bool(d.get("double_z", True)),
            use_variational=bool(d.get("use_variational", True)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-6)),
            encoder_attn_levels=levels_from("encoder_attn_resolutions", "encoder_attn_levels"),
            decoder_attn_levels=levels_from("decoder_attn_resolutions", "decoder_attn_levels"),
            logvar_clamp=tuple(float(v) for v in d.get("logvar_clamp", (-30.0, 20.0))),
            scale=float(scale),
            patch_size=int(patch_size),
            dtype=dtype,
        )


def patchify_latents(z: jax.Array, p: int) -> jax.Array:
    """[B, m*p, n*p, c] -> [B, m, n, c*p*p] with channels ordered (c, p, q) like the official
    `rearrange('b c (m p) (n q) -> b m n (c p q)')`."""
    b, hp, wp, c = z.shape
    z = z.reshape(b, hp // p, p, wp // p, p, c)
    return z.transpose(0, 1, 3, 5, 2, 4).reshape(b, hp // p, wp // p, c * p * p)


def unpatchify_latents(tokens: jax.Array, p: int) -> jax.Array:
    """Inverse of `patchify_latents`."""
    b, m, n, cpp = tokens.shape
    c = cpp // (p * p)
    z = tokens.reshape(b, m, n, c, p, p)
    return z.transpose(0, 1, 4, 2, 5, 3).reshape(b, m * p, n * p, c)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC (channels grouped contiguously), statistics in float32."""

    def __init__(self, channels: int, groups: int, eps: float, *, dtype):
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = norm_param(nnx.initializers.ones_init(), channels)
        self.bias = norm_param(nnx.initializers.zeros_init(), channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale.get_value() + self.bias.get_value()).astype(self.dtype)


def _conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, dtype, stride: int = 1, pad=None):
    if pad is None:
        pad = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=stride,
        padding=pad,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_TORCH_DEFAULT_INIT, _CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def _swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.norm1 = GroupNorm(cin, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv1 = _conv(cin, cout, 3, rngs=rngs, dtype=dt)
        self.norm2 = GroupNorm(cout, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv2 = _conv(cout, cout, 3, rngs=rngs, dtype=dt)
        # The official block uses a 1x1 `nin_shortcut` whenever the width changes.
        self.nin_shortcut = _conv(cin, cout, 1, rngs=rngs, dtype=dt) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1 convolutions (LDM AttnBlock)."""

    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.norm = GroupNorm(c, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.q = _conv(c, c, 1, rngs=rngs, dtype=dt)
        self.k = _conv(c, c, 1, rngs=rngs, dtype=dt)
        self.v = _conv(c, c, 1, rngs=rngs, dtype=dt)
        self.proj_out = _conv(c, c, 1, rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, hh * ww, c)
        k = self.k(h).reshape(b, hh * ww, c)
        v = self.v(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (int(c) ** (-0.5))
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        # torch pads (left 0, right 1, top 0, bottom 1) then runs a VALID stride-2 convolution.
        self.conv = _conv(
            c, c, 3, rngs=rngs, dtype=jnp.dtype(cfg.dtype), stride=2, pad=((0, 1), (0, 1))
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, rngs=rngs, dtype=jnp.dtype(cfg.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class _Level(nnx.Module):
    """One resolution level: `block` list, `attn` list and an optional resampler."""

    def __init__(self, blocks: Sequence, attns: Sequence, resample, name: str):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        setattr(self, name, resample)
        self._resample_name = name

    def resample(self, x: jax.Array) -> jax.Array:
        mod = getattr(self, self._resample_name)
        return x if mod is None else mod(x)


class _Mid(nnx.Module):
    def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(c, c, cfg, rngs=rngs)
        self.attn_1 = AttnBlock(c, cfg, rngs=rngs)
        self.block_2 = ResnetBlock(c, c, cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        n = len(cfg.ch_mult)
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, rngs=rngs, dtype=dt)
        in_mult = (1,) + tuple(cfg.ch_mult)
        levels = []
        block_in = cfg.ch
        for i in range(n):
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg, rngs=rngs))
                block_in = block_out
                if i in cfg.encoder_attn_levels:
                    attns.append(AttnBlock(block_in, cfg, rngs=rngs))
            down = Downsample(block_in, cfg, rngs=rngs) if i != n - 1 else None
            levels.append(_Level(blocks, attns, down, "downsample"))
        self.down = nnx.List(levels)
        self.mid = _Mid(block_in, cfg, rngs=rngs)
        self.norm_out = GroupNorm(block_in, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        zc = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = _conv(block_in, zc, 3, rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            h = level.resample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, block_in, 3, rngs=rngs, dtype=dt)
        self.mid = _Mid(block_in, cfg, rngs=rngs)
        levels: list[_Level | None] = [None] * n
        for i in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg, rngs=rngs))
                block_in = block_out
                if i in cfg.decoder_attn_levels:
                    attns.append(AttnBlock(block_in, cfg, rngs=rngs))
            up = Upsample(block_in, cfg, rngs=rngs) if i != 0 else None
            levels[i] = _Level(blocks, attns, up, "upsample")
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv_out = _conv(block_in, cfg.out_ch, 3, rngs=rngs, dtype=dt)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(list(self.up)):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            h = level.resample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class DiagonalGaussian(struct.PyTreeNode):
    """Posterior N(mean, exp(logvar)); `mode()` is what Harmon uses, `sample(key)` what MAR uses."""

    mean: jax.Array
    logvar: jax.Array

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        std = jnp.exp(0.5 * self.logvar)
        return self.mean + std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class AutoencoderKL(nnx.Module):
    """LDM KL autoencoder; `tokenize` / `detokenize` give Harmon's scaled, patchified tokens."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        mult = 2 if cfg.use_variational else 1
        self.quant_conv = _conv(2 * cfg.embed_dim, mult * cfg.embed_dim, 1, rngs=rngs, dtype=dt)
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.embed_dim, 1, rngs=rngs, dtype=dt)

    @property
    def token_dim(self) -> int:
        return self.cfg.token_dim

    @property
    def stride(self) -> int:
        return self.cfg.stride * self.cfg.patch_size

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """images [B, H, W, 3] in [-1, 1] -> posterior over [B, H/16, W/16, embed_dim]."""
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        if not self.cfg.use_variational:
            moments = jnp.concatenate([moments, jnp.ones_like(moments)], axis=-1)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        lo, hi = self.cfg.logvar_clamp
        return DiagonalGaussian(mean, jnp.clip(logvar, lo, hi))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, embed_dim] -> images [B, 16h, 16w, 3] (not clamped)."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """Harmon.encode: posterior mode * scale, patchified to [B, h, w, C]."""
        z = self.encode(images).mode() * self.cfg.scale
        return patchify_latents(z, self.cfg.patch_size)

    def detokenize(self, tokens: jax.Array) -> jax.Array:
        """Harmon.decode: tokens / scale, unpatchified, decoded to [B, H, W, 3]."""
        z = unpatchify_latents(tokens.astype(jnp.float32) / self.cfg.scale, self.cfg.patch_size)
        return self.decode(z)


@dataclasses.dataclass(frozen=True)
class PixelTokenizerConfig:
    """Pixel patches as tokens, scaled by `scale`.

    `colour_cell` 0: the RGB patch, C = 3 * patch^2. `colour_cell` c > 0: the factorised layout
    for flat-coloured objects on a black background, C = patch^2 + 3 * (patch / c)^2: every
    pixel's occupancy (+1 object, -1 background) followed by the mean colour of the object pixels
    in each c x c cell (-1 where a cell is empty). Shape lives in the occupancy channels whatever
    the colour, and colour in its own channels whatever the shape.
    """

    patch: int = 16
    scale: float = 1.0
    in_channels: int = 3
    colour_cell: int = 0

    def __post_init__(self):
        if self.colour_cell < 0 or (self.colour_cell and self.patch % self.colour_cell):
            raise ValueError(
                f"pixel tokenizer colour_cell {self.colour_cell} must be 0 or divide the patch "
                f"{self.patch}"
            )

    @property
    def token_dim(self) -> int:
        if self.colour_cell:
            return self.patch**2 + self.in_channels * (self.patch // self.colour_cell) ** 2
        return self.in_channels * self.patch**2


# A pixel whose brightest channel exceeds this (in [0, 1]) is an object pixel: the background is
# black and the darkest palette colour's brightest channel is ~0.7.
OCCUPANCY_THRESHOLD = 0.25


class PixelPatchTokenizer(nnx.Module):
    """Parameter-free stand-in for the KL-16 VAE (configs that cannot download kl16.ckpt)."""

    def __init__(self, cfg: PixelTokenizerConfig):
        self.cfg = cfg

    @property
    def token_dim(self) -> int:
        return self.cfg.token_dim

    @property
    def stride(self) -> int:
        return self.cfg.patch

    def tokenize(self, images: jax.Array) -> jax.Array:
        images = images.astype(jnp.float32)
        p, c = self.cfg.patch, self.cfg.colour_cell
        if not c:
            return patchify_latents(images, p) * self.cfg.scale
        unit = (images + 1.0) * 0.5
        occupied = (unit.max(axis=-1, keepdims=True) > OCCUPANCY_THRESHOLD).astype(jnp.float32)
        b, h, w, ch = unit.shape
        cells = (unit * occupied).reshape(b, h // c, c, w // c, c, ch).sum(axis=(2, 4))
        counts = occupied.reshape(b, h // c, c, w // c, c, 1).sum(axis=(2, 4))
        colour = cells / jnp.maximum(counts, 1.0)
        tokens = jnp.concatenate(
            [
                patchify_latents(occupied * 2.0 - 1.0, p),
                patchify_latents(colour * 2.0 - 1.0, p // c),
            ],
            axis=-1,
        )
        return tokens * self.cfg.scale

    def detokenize(self, tokens: jax.Array) -> jax.Array:
        tokens = tokens.astype(jnp.float32) / self.cfg.scale
        p, c = self.cfg.patch, self.cfg.colour_cell
        if not c:
            return unpatchify_latents(tokens, p)
        occupied = jnp.clip((unpatchify_latents(tokens[..., : p * p], p) + 1.0) * 0.5, 0.0, 1.0)
        colour = (unpatchify_latents(tokens[..., p * p :], p // c) + 1.0) * 0.5
        colour = jnp.repeat(jnp.repeat(colour, c, axis=1), c, axis=2)
        return occupied * colour * 2.0 - 1.0
