"""DINOv2 with registers (HF `Dinov2WithRegistersModel`) as a Flax NNX module.

Token order inside is [CLS, registers x R, patches]; the encoder returns the patch tokens only (RAE drops
1 + R tokens, vqrae_rae.md pitfall 2) unless `keep_prefix_tokens=True`. Position embeddings are
interpolated like HF: bicubic with antialias=True in float32 (pitfall 4). LayerScale on both branches,
exact-erf GELU, LayerNorm eps 1e-6. The SwiGLU FFN of the giant model is not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unified_mm.models.vqrae.config import EncoderConfig
from unified_mm.models.vqrae.layers import BlockStack, LayerNorm, ViTBlock, dtype_of
from unified_mm.models.vqrae.resize import resize
from unified_mm.models.vqrae.siglip import layers_to_run

Array = jax.Array


class Dinov2RegEncoder(nnx.Module):
    """Pixels (normalised with ImageNet mean/std), NHWC -> patch tokens [B, N, D]."""

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
        init = nnx.initializers.truncated_normal(0.02)
        n_pos = (cfg.image_size // p) ** 2 + 1
        self.cls_token = nnx.Param(init(rngs.params(), (d,), pdtype), out_sharding=("embed",))
        self.pos_embed = nnx.Param(
            init(rngs.params(), (n_pos, d), pdtype), out_sharding=("position", "embed")
        )
        self.register_tokens = nnx.Param(
            jnp.zeros((cfg.num_register_tokens, d), pdtype), out_sharding=(None, "embed")
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
                layerscale=cfg.layerscale_value,
                rngs=r,
                dtype=dtype,
                param_dtype=pdtype,
            ),
            rngs=rngs,
            remat=cfg.remat,
        )
        self.final_norm = LayerNorm(
            d, eps=cfg.layer_norm_eps, affine=cfg.final_ln_affine, dtype=dtype, param_dtype=pdtype
        )

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def position_embeddings(self, grid: tuple[int, int]) -> Array:
        """[1 + gh*gw, D]: the CLS row, then patch rows (HF antialiased bicubic, fp32, if resized)."""
        g0 = self.cfg.image_size // self.cfg.patch_size
        table = self.pos_embed[...]
        if tuple(grid) == (g0, g0):
            return table
        patch = table[1:].astype(jnp.float32).reshape(g0, g0, -1)
        patch = resize(patch, grid, method="bicubic", antialias=True).astype(table.dtype)
        return jnp.concatenate([table[:1], patch.reshape(grid[0] * grid[1], -1)], axis=0)

    def embed(self, pixels: Array) -> Array:
        """Pixels -> the block input [B, 1 + R + N, D]: [CLS + pos, registers, patches + pos]."""
        cfg = self.cfg
        p = cfg.patch_size
        b, h, w, _ = pixels.shape
        if h % p or w % p:
            raise ValueError(f"DINOv2 encoder: image {h}x{w} is not a multiple of patch {p}")
        grid = (h // p, w // p)
        x = self.patch_embed(pixels.astype(self.patch_embed.dtype)).reshape(
            b, grid[0] * grid[1], -1
        )
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings(grid).astype(x.dtype)
        regs = jnp.broadcast_to(
            self.register_tokens[...].astype(x.dtype), (b, cfg.num_register_tokens, x.shape[-1])
        )
        return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)

    def __call__(
        self, pixels: Array, *, layer_index: int | None = None, keep_prefix_tokens: bool = False
    ) -> Array:
        cfg = self.cfg
        x = self.blocks(self.embed(pixels), num_layers=layers_to_run(cfg, layer_index))
        if cfg.final_ln:
            x = self.final_norm(x)
        return x if keep_prefix_tokens else x[:, self.num_prefix_tokens :]
