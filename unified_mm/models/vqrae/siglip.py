"""SigLIP / SigLIP2 vision tower (HF `SiglipVisionModel`, big_vision `vit.py`) as a Flax NNX module.

Also serves the "vit" encoder kind: the same architecture at random init, trained from scratch on the
CPU shapes configuration. No CLS token; the attention-pooling head is not used (RAE/VQRAE take the
patch tokens). Position embeddings are interpolated like HF `interpolate_pos_encoding=True`: bicubic,
a=-0.75, no antialias, whenever the token grid differs from the stored one.
"""

from __future__ import annotations

import jax
from flax import nnx

from unified_mm.models.vqrae.config import EncoderConfig
from unified_mm.models.vqrae.layers import BlockStack, LayerNorm, ViTBlock, dtype_of
from unified_mm.models.vqrae.resize import resize

Array = jax.Array


class SiglipVisionEncoder(nnx.Module):
    """Pixels (already normalised with the encoder's mean/std), NHWC -> tokens [B, N, D]."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nnx.Conv(
            3,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=pdtype,
            kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(),
                ("conv_height", "conv_width", "conv_in", "conv_out"),
            ),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
            rngs=rngs,
        )
        n_pos = (cfg.image_size // p) ** 2
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(d**-0.5)(rngs.params(), (n_pos, d), pdtype),
            out_sharding=("position", "embed"),
        )
        self.blocks = BlockStack(
            cfg.num_layers,
            lambda r: ViTBlock(
                d,
                cfg.num_heads,
                cfg.mlp_dim,
                eps=cfg.layer_norm_eps,
                act=cfg.hidden_act,
                qkv_bias=cfg.qkv_bias,
                rngs=r,
                dtype=dtype,
                param_dtype=pdtype,
            ),
            rngs=rngs,
            remat=cfg.remat,
        )
        # RAE drops the final LN's affine (vqrae_rae.md 5.1): with final_ln_affine=False the scale and
        # bias are simply not created, so they can neither be trained nor silently used.
        self.final_norm = LayerNorm(
            d, eps=cfg.layer_norm_eps, affine=cfg.final_ln_affine, dtype=dtype, param_dtype=pdtype
        )

    def position_embeddings(self, grid: tuple[int, int]) -> Array:
        """[gh*gw, D] table; bicubic-interpolated (torch, no antialias) when the grid differs."""
        g0 = self.cfg.image_size // self.cfg.patch_size
        table = self.pos_embed[...]
        if tuple(grid) == (g0, g0):
            return table
        t = table.reshape(g0, g0, -1)
        return resize(t, grid, method="bicubic", antialias=False).reshape(grid[0] * grid[1], -1)

    def __call__(self, pixels: Array, *, layer_index: int | None = None) -> Array:
        cfg = self.cfg
        p = cfg.patch_size
        b, h, w, _ = pixels.shape
        if h % p or w % p:
            raise ValueError(f"SigLIP encoder: image {h}x{w} is not a multiple of patch {p}")
        x = self.patch_embed(pixels.astype(self.patch_embed.dtype))
        grid = (h // p, w // p)
        x = x.reshape(b, grid[0] * grid[1], -1)
        x = x + self.position_embeddings(grid).astype(x.dtype)
        n = layers_to_run(cfg, layer_index)
        x = self.blocks(x, num_layers=n)
        if cfg.final_ln:
            x = self.final_norm(x)
        return x


def layers_to_run(cfg: EncoderConfig, layer_index: int | None) -> int:
    """Blocks to run for `layer_index` (HF hidden_states indexing; None: the config's choice)."""
    if layer_index is None:
        return cfg.layers_to_run
    i = layer_index if layer_index >= 0 else cfg.num_layers + 1 + layer_index
    if not 0 <= i <= cfg.num_layers:
        raise ValueError(f"layer_index {layer_index} out of range for {cfg.num_layers} layers")
    return i
