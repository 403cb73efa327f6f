"""Convolutional token embedding for the MAR encoder (a hybrid ViT stem), off in the paper models.

Official MAR embeds each latent token with one linear map (`z_proj`). That suffices on KL-16
latents, whose convolutional VAE already describes local structure. On the pixel-patch tokenizer
of the CPU configs a linear map of a raw 8x8 patch is not translation-equivariant: the same shape
edge at another offset inside the patch is an unrelated input, and the encoder learns shape
slowly. This stem puts the tokens back on their pixel grid and runs `len(channels)` 3x3 conv +
ReLU stages; the first log2(patch) of them end with a 2x2 max-pool, so one feature vector per
token comes out and `z_proj` maps it to the encoder width (the hybrid ViT of Dosovitskiy et al.
2021, section 3.1). Measured in README.

Masked tokens are zeroed before the stem, so a visible token's feature never depends on the
content of a masked neighbour (the official encoder drops masked rows before any mixing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unified_mm.models.harmon.vae import unpatchify_latents


def conv_stem_pools(patch: int) -> int:
    """How many stem stages end in a 2x2 max-pool: log2(patch), bringing a patch to one vector."""
    return int(math.log2(patch))


def check_conv_stem(channels: tuple[int, ...], patch: int, token_dim: int) -> None:
    """Raises ValueError (one line) when the stem cannot map `token_dim` tokens to one vector."""
    if not channels:
        return
    if patch < 1 or patch & (patch - 1):
        raise ValueError(f"MAR conv_stem_patch={patch} must be a power of two")
    pools = conv_stem_pools(patch)
    if len(channels) < pools:
        raise ValueError(
            f"MAR conv_stem {tuple(channels)} has {len(channels)} stage(s); conv_stem_patch={patch} "
            f"needs at least {pools} (each of the first log2(patch) stages halves the grid)"
        )
    if token_dim % (patch * patch):
        raise ValueError(
            f"MAR token dim {token_dim} is not a multiple of conv_stem_patch^2={patch * patch}"
        )
    if any(c < 1 for c in channels):
        raise ValueError(f"MAR conv_stem channels {tuple(channels)} must be positive")


class ConvStem(nnx.Module):
    """tokens [B, L, C] on an (h, w) grid, C = c * patch^2 -> features [B, L, channels[-1]]."""

    def __init__(
        self,
        channels: tuple[int, ...],
        patch: int,
        token_dim: int,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        check_conv_stem(channels, patch, token_dim)
        self.patch = patch
        self.pools = conv_stem_pools(patch)
        widths = (token_dim // (patch * patch), *channels)
        names = ("conv_height", "conv_width", "conv_in", "conv_out")
        self.convs = nnx.List(
            [
                nnx.Conv(
                    widths[i],
                    widths[i + 1],
                    (3, 3),
                    padding="SAME",
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nnx.with_partitioning(
                        nnx.initializers.variance_scaling(2.0, "fan_in", "normal"), names
                    ),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
                    rngs=rngs,
                )
                for i in range(len(channels))
            ]
        )

    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        b, ll, c = tokens.shape
        h, w = grid
        x = unpatchify_latents(tokens.reshape(b, h, w, c), self.patch)
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i < self.pools:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return x.reshape(b, ll, x.shape[-1])
