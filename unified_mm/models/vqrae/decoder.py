"""Symmetric ViT pixel decoder in the style of RAE's `GeneralDecoder` (vqrae_rae.md 1.4, 5.2).

tokens [B, N, d_in] -> linear embed -> prepend a trainable CLS token -> add fixed 2D
sin-cos positions (MAE convention, zero row for CLS) -> pre-LN blocks (eps 1e-12, erf GELU) -> LayerNorm
-> per-token linear head to q*q*3 pixels -> drop CLS -> unpatchify in (p, q, c) order.

The output is in the *encoder-normalised* pixel space (RAE de-normalises with the encoder's mean/std);
`VQRAE` does that mapping. One token is one position (decoder patch 1 over the token grid), so the image
side is grid * q. ASSUMPTION: xavier-uniform kernels and zero biases (RAE keeps torch defaults).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.vqrae.config import DecoderConfig
from unified_mm.models.vqrae.layers import (
    BlockStack,
    LayerNorm,
    ViTBlock,
    dense,
    dtype_of,
    unpatchify,
)

Array = jax.Array


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> np.ndarray:
    """[(1+) gh*gw, dim] fixed 2D sin-cos table, bit-compatible with MAE/RAE for square grids.

    MAE convention (pitfall 8): `meshgrid(w, h)` puts the *column* coordinate in the first half of the
    channels and the row coordinate in the second half; the CLS slot is a zero row.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim {dim} must be a multiple of 4")
    gh, gw = grid
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


class ViTDecoder(nnx.Module):
    def __init__(self, cfg: DecoderConfig, in_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not (cfg.hidden_size and cfg.num_layers and cfg.num_heads and cfg.patch_size):
            raise ValueError(
                "ViTDecoder needs a resolved DecoderConfig (DecoderConfig.resolved(enc))"
            )
        self.cfg = cfg
        dtype = dtype_of(cfg.dtype or "float32")
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed = dense(in_dim, d, (None, "embed"), **kw)
        # ASSUMPTION/deviation: RAE zero-initialises this trainable CLS token; with its zero position
        # row the first LayerNorm (eps 1e-12) then sees an all-zero vector and back-propagates ~1e6-scaled
        # gradients into it, which swamps global-norm clipping. A small random init avoids that.
        self.cls_token = nnx.Param(
            jax.random.normal(rngs.params(), (d,), param_dtype) * 0.02, out_sharding=("embed",)
        )
        self.blocks = BlockStack(
            cfg.num_layers,
            lambda r: ViTBlock(
                d,
                cfg.num_heads,
                cfg.mlp_dim,
                eps=cfg.layer_norm_eps,
                act=cfg.hidden_act,
                rngs=r,
                dtype=dtype,
                param_dtype=param_dtype,
            ),
            rngs=rngs,
            remat=cfg.remat,
        )
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        # `pred` is the "last layer" of the adaptive GAN weight (RAE: decoder_pred.weight).
        self.pred = dense(d, cfg.patch_size**2 * 3, ("embed", None), **kw)

    def features(self, tokens: Array, grid: tuple[int, int]) -> Array:
        """Tokens -> final-normed decoder features [B, N, D] (CLS dropped), the input of `pred`."""
        b, n, _ = tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"ViTDecoder: {n} tokens do not fill the grid {grid}")
        x = self.embed(tokens)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + jnp.asarray(sincos_2d(x.shape[-1], tuple(grid)), x.dtype)
        x = self.norm(self.blocks(x))
        return x[:, 1:]

    def predict_pixels(
        self, feats: Array, grid: tuple[int, int], kernel: Array | None = None
    ) -> Array:
        """Features -> [B, H, W, 3] (encoder-normalised). `kernel` overrides pred's weight (used by the
        adaptive GAN weight, which differentiates with respect to it)."""
        if kernel is None:
            out = self.pred(feats)
        else:
            out = jnp.dot(feats, kernel.astype(feats.dtype)) + self.pred.bias[...].astype(
                feats.dtype
            )
        return unpatchify(out.astype(jnp.float32), tuple(grid), self.cfg.patch_size)

    def __call__(self, tokens: Array, grid: tuple[int, int]) -> Array:
        return self.predict_pixels(self.features(tokens, grid), grid)
