"""MAR encoder / decoder (LTH14/mar, Harmon's copy) with static shapes.

harmon_mar.md 1.2 and pitfalls 1-3:
  encoder  z_proj -> [buffer slots (one broadcast embedding), tokens] -> + encoder_pos_embed
           -> z_proj_ln (AFTER the positional embedding) -> keep the visible rows -> blocks -> norm
  decoder  decoder_embed -> scatter into mask_token rows -> + decoder_pos_embed -> blocks -> norm
           -> drop buffers -> + diffusion_pos_embed (no norm after)

The official code drops masked rows with a dynamic gather. Here the kept rows (buffers first, then
visible tokens in ascending index) are gathered into a STATIC count `buffer + max_visible`, the
padding rows come after the real ones and are masked as attention keys, so every real row sees
exactly the official computation. Positional embeddings are bilinearly resized from the learned
grid (`jax.image.resize`, torch `align_corners=False` semantics, no antialias) with the buffer rows
split off first, as Harmon does for any latent grid other than the learned one.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.harmon.conv_stem import ConvStem
from unified_mm.models.harmon.diffloss import (
    DiffLoss,
    DiffLossConfig,
    LayerNorm,
    dense,
    make_stack,
    scan_stack,
    shard_rows,
)

# Activation sharding names at block boundaries (resolved by the config's logical-axis rules).
_ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class MARConfig:
    """MAR hyper-parameters (fixture config.json `mar` section)."""

    seq_h: int = 16  # learned positional-embedding grid
    seq_w: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    buffer_size: int = 64
    class_num: int = 1000
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_d: int = 6
    diffloss_w: int = 1024
    diffloss_time_freq_dim: int = 256
    num_sampling_steps: str = "100"
    train_diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    diffusion_prediction: str = "epsilon"  # see DiffLossConfig.prediction
    clip_denoised: float | None = None  # see DiffLossConfig.clip_denoised
    diffusion_batch_mul: int = 4
    # Hybrid-ViT token embedding (conv_stem.py); () = the official linear `z_proj` alone.
    # Checked against the tokenizer's token size by HarmonConfig (and by ConvStem itself).
    conv_stem: tuple[int, ...] = ()
    conv_stem_patch: int = 1  # side of a token's pixel block (the pixel tokenizer's patch)
    remat: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio_min <= 1.0:
            raise ValueError(f"MAR mask_ratio_min={self.mask_ratio_min} must lie in [0, 1]")
        for name in ("encoder", "decoder"):
            d, h = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if d % h:
                raise ValueError(
                    f"MAR {name}_embed_dim={d} is not divisible by {name}_num_heads={h}"
                )

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_w

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    @property
    def z_proj_in_dim(self) -> int:
        """What `z_proj` reads per token: the conv stem's last channels, or the token itself."""
        return self.conv_stem[-1] if self.conv_stem else self.token_embed_dim

    def max_visible(self, seq_len: int) -> int:
        """Most visible tokens a training mask can leave: ratio >= mask_ratio_min."""
        return seq_len - math.ceil(seq_len * self.mask_ratio_min)

    @property
    def diffloss(self) -> DiffLossConfig:
        return DiffLossConfig(
            token_dim=self.token_embed_dim,
            cond_dim=self.decoder_embed_dim,
            width=self.diffloss_w,
            depth=self.diffloss_d,
            time_freq_dim=self.diffloss_time_freq_dim,
            num_sampling_steps=str(self.num_sampling_steps),
            train_diffusion_steps=self.train_diffusion_steps,
            noise_schedule=self.noise_schedule,
            prediction=self.diffusion_prediction,
            clip_denoised=self.clip_denoised,
            remat=self.remat,
            dtype=self.dtype,
        )

    @classmethod
    def from_fixture_json(
        cls, d: dict, *, dtype: str = "float32", remat: bool = False
    ) -> MARConfig:
        seq_h = int(d.get("seq_h", d["img_size"] // d["vae_stride"] // d["patch_size"]))
        seq_w = int(d.get("seq_w", seq_h))
        return cls(
            seq_h=seq_h,
            seq_w=seq_w,
            patch_size=int(d["patch_size"]),
            vae_embed_dim=int(d["vae_embed_dim"]),
            encoder_embed_dim=int(d["encoder_embed_dim"]),
            encoder_depth=int(d["encoder_depth"]),
            encoder_num_heads=int(d["encoder_num_heads"]),
            decoder_embed_dim=int(d["decoder_embed_dim"]),
            decoder_depth=int(d["decoder_depth"]),
            decoder_num_heads=int(d["decoder_num_heads"]),
            mlp_ratio=float(d.get("mlp_ratio", 4.0)),
            norm_eps=float(d.get("norm_eps", 1e-6)),
            buffer_size=int(d["buffer_size"]),
            class_num=int(d.get("class_num", 1000)),
            label_drop_prob=float(d.get("label_drop_prob", 0.1)),
            mask_ratio_min=float(d.get("mask_ratio_min", 0.7)),
            attn_dropout=float(d.get("attn_dropout", 0.1)),
            proj_dropout=float(d.get("proj_dropout", 0.1)),
            diffloss_d=int(d["diffloss_d"]),
            diffloss_w=int(d["diffloss_w"]),
            diffloss_time_freq_dim=int(d.get("diffloss_time_freq_dim", 256)),
            num_sampling_steps=str(d.get("num_sampling_steps", "100")),
            train_diffusion_steps=int(d.get("train_diffusion_steps", 1000)),
            noise_schedule=str(d.get("noise_schedule", "cosine")),
            diffusion_prediction=str(d.get("diffusion_prediction", "epsilon")),
            clip_denoised=(None if d.get("clip_denoised") is None else float(d["clip_denoised"])),
            diffusion_batch_mul=int(d.get("diffusion_batch_mul", 4)),
            conv_stem=tuple(int(c) for c in d.get("conv_stem", ())),
            conv_stem_patch=int(d.get("conv_stem_patch", 1)),
            remat=bool(remat or d.get("grad_checkpointing", False)),
            dtype=dtype,
        )


def _dropout(x: jax.Array, rate: float, keep: jax.Array | None) -> jax.Array:
    """Inverted dropout with a precomputed keep mask (None: dropout off)."""
    if keep is None or rate == 0.0:
        return x
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _keep_masks(
    key: jax.Array | None, specs: list[tuple[tuple[int, ...], float]], deterministic: bool
) -> list[jax.Array | None]:
    """Keep masks for several dropout sites from ONE draw of random bits.

    One threefry call per block instead of one per site: XLA compiles each random-bits call as a
    large unrolled graph, and four of them per ViT block dominated the training-step compile time.
    """
    if deterministic or all(rate == 0.0 for _, rate in specs):
        return [None] * len(specs)
    if key is None:
        raise ValueError("dropout is active (deterministic=False) but no key was given")
    batch = specs[0][0][0]
    if any(shape[0] != batch for shape, _ in specs):
        raise ValueError(f"dropout sites must share the leading batch dimension, got {specs}")
    sizes = [math.prod(shape[1:]) for shape, _ in specs]
    # Batch-leading bits keep the batch sharding, so each device draws only its own rows: a flat
    # draw has no batch axis, and every device drew the bits of the global batch (48 GiB per chip
    # for Harmon-0.5B at 64 examples per chip on v6e-64).
    bits = jax.random.bits(key, (batch, sum(sizes)), jnp.uint32)
    bits = nn.with_logical_constraint(bits, ("activation_batch", None))
    out, start = [], 0
    for (shape, rate), size in zip(specs, sizes):
        threshold = np.uint32(min(round((1.0 - rate) * 2.0**32), 2**32 - 1))
        keep = (bits[:, start : start + size] < threshold).reshape(shape)
        out.append(None if rate == 0.0 else keep)
        start += size
    return out


class Attention(nnx.Module):
    """timm Attention: fused qkv (rows ordered (3, heads, head_dim)) with bias, softmax in f32."""

    def __init__(self, dim: int, heads: int, cfg: MARConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.heads, self.attn_drop = heads, cfg.attn_dropout
        self.qkv = dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.proj = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x, key_mask, *, keep=None) -> jax.Array:
        """keep: dropout keep mask of the attention probabilities [B, heads, N, N] or None."""
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd**-0.5)
        if key_mask is not None:
            s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1)
        p = _dropout(p, self.attn_drop, keep).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, cfg: MARConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dt)


class ViTBlock(nnx.Module):
    """timm 0.9.12 Block: pre-LN (eps 1e-6), exact-erf GELU, proj dropout after attn.proj, after
    the GELU and after fc2, attention dropout on the probabilities."""

    def __init__(self, dim: int, heads: int, cfg: MARConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.drop = cfg.proj_dropout
        self.norm1 = LayerNorm(dim, cfg.norm_eps, dtype=dt)
        self.attn = Attention(dim, heads, cfg, rngs=rngs)
        self.norm2 = LayerNorm(dim, cfg.norm_eps, dtype=dt)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg, rngs=rngs)

    def __call__(self, x, key_mask, *, key=None, deterministic: bool = True) -> jax.Array:
        b, n, d = x.shape
        hidden = self.mlp.fc1.out_features
        k_attn, k_proj, k_act, k_fc2 = _keep_masks(
            key,
            [
                ((b, self.attn.heads, n, n), self.attn.attn_drop),
                ((b, n, d), self.drop),
                ((b, n, hidden), self.drop),
                ((b, n, d), self.drop),
            ],
            deterministic,
        )
        h = self.attn(self.norm1(x), key_mask, keep=k_attn)
        x = x + _dropout(h, self.drop, k_proj)
        h = jax.nn.gelu(self.mlp.fc1(self.norm2(x)), approximate=False)
        h = _dropout(self.mlp.fc2(_dropout(h, self.drop, k_act)), self.drop, k_fc2)
        return x + h


def run_blocks(stack, x, key_mask, *, depth: int, key, deterministic: bool, remat: bool):
    """Scan a stacked ViTBlock module; one dropout key per layer."""
    keys = None if (deterministic or key is None) else jax.random.split(key, depth)

    def body(block, h, k):
        h = block(h, key_mask, key=k, deterministic=deterministic)
        return nn.with_logical_constraint(h, _ACT_AXES)

    return scan_stack(stack, body, x, keys, remat=remat)


def resize_pos_embed(pe: jax.Array, src: tuple[int, int], dst: tuple[int, int]) -> jax.Array:
    """Bilinear resize of grid rows [h0*w0, D] -> [h*w, D] (torch F.interpolate bilinear,
    align_corners=False, no antialias). Identity when the grids agree."""
    if tuple(src) == tuple(dst):
        return pe
    grid = pe.reshape(src[0], src[1], pe.shape[-1]).astype(jnp.float32)
    out = jax.image.resize(grid, (dst[0], dst[1], pe.shape[-1]), "bilinear", antialias=False)
    return out.reshape(dst[0] * dst[1], pe.shape[-1]).astype(pe.dtype)


def visible_index(mask: jax.Array, buffer_size: int, n_keep: int):
    """Rows the sparse encoder keeps: buffers then visible tokens in ascending index, padded to
    `n_keep` (>= buffers + visible) rows. Returns (index [B, n_keep], valid [B, n_keep])."""
    b = mask.shape[0]
    keep = jnp.concatenate([jnp.ones((b, buffer_size), bool), mask == 0], axis=1)
    # Stable argsort of "dropped" puts kept rows first in ascending index, padding after.
    order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), axis=1, stable=True)
    index = order[:, :n_keep]
    valid = jnp.arange(n_keep)[None, :] < keep.sum(axis=1, keepdims=True)
    return index, valid


def sample_orders(key: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """One random permutation of 0..L-1 per row (MAR.sample_orders)."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: jax.random.permutation(k, seq_len))(keys).astype(jnp.int32)


def sample_mask_ratio(key: jax.Array, mask_ratio_min: float) -> jax.Array:
    """One ratio per batch from N(1, 0.25^2) truncated to [mask_ratio_min, 1]."""
    lower = (mask_ratio_min - 1.0) / 0.25
    return 1.0 + 0.25 * jax.random.truncated_normal(key, lower, 0.0, (), jnp.float32)


def num_masked_tokens(ratio: jax.Array | float, seq_len: int, mask_ratio_min: float) -> jax.Array:
    """ceil(L * ratio), never below ceil(L * mask_ratio_min) (float rounding must not let a mask
    exceed the static visible-token bound)."""
    n = jnp.ceil(seq_len * jnp.asarray(ratio, jnp.float32)).astype(jnp.int32)
    return jnp.clip(n, math.ceil(seq_len * mask_ratio_min), seq_len)


def mask_by_order(orders: jax.Array, num_masked: jax.Array | int) -> jax.Array:
    """float32 mask [B, L]: the first `num_masked` entries of each order are masked (1)."""
    rank = jnp.argsort(orders, axis=1)  # rank[b, p] = position of token p in the order
    return (rank < num_masked).astype(jnp.float32)


class MAR(nnx.Module):
    """MAR encoder/decoder + DiffLoss head (parameter tree of the official `mar.*`)."""

    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        de, dd, nb, ll = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.buffer_size, cfg.seq_len
        normal = nnx.initializers.normal(0.02)

        def param(shape, names):
            return nnx.Param(nnx.with_partitioning(normal, names)(rngs.params(), shape))

        self.class_emb = nnx.Embed(
            cfg.class_num,
            de,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(normal, (None, "embed")),
            rngs=rngs,
        )
        self.fake_latent = param((de,), ("embed",))
        self.conv_stem = (
            ConvStem(cfg.conv_stem, cfg.conv_stem_patch, cfg.token_embed_dim, dtype=dt, rngs=rngs)
            if cfg.conv_stem
            else None
        )
        self.z_proj = dense(cfg.z_proj_in_dim, de, ("latent", "embed"), rngs=rngs, dtype=dt)
        self.z_proj_ln = LayerNorm(de, cfg.norm_eps, dtype=dt)
        self.encoder_pos_embed_learned = param((nb + ll, de), ("position", "embed"))
        self.encoder_blocks = make_stack(
            lambda r: ViTBlock(de, cfg.encoder_num_heads, cfg, rngs=r), cfg.encoder_depth, rngs
        )
        self.encoder_norm = LayerNorm(de, cfg.norm_eps, dtype=dt)
        self.decoder_embed = dense(de, dd, ("mlp", "embed"), rngs=rngs, dtype=dt)
        self.mask_token = param((dd,), ("embed",))
        self.decoder_pos_embed_learned = param((nb + ll, dd), ("position", "embed"))
        self.decoder_blocks = make_stack(
            lambda r: ViTBlock(dd, cfg.decoder_num_heads, cfg, rngs=r), cfg.decoder_depth, rngs
        )
        self.decoder_norm = LayerNorm(dd, cfg.norm_eps, dtype=dt)
        self.diffusion_pos_embed_learned = param((ll, dd), ("position", "embed"))
        self.diffloss = DiffLoss(cfg.diffloss, rngs=rngs)

    # -- positional embeddings -----------------------------------------------------------------
    def _grid_pe(self, table: jax.Array, with_buffer: bool, h: int, w: int) -> jax.Array:
        nb = self.cfg.buffer_size if with_buffer else 0
        image = resize_pos_embed(table[nb:], (self.cfg.seq_h, self.cfg.seq_w), (h, w))
        return jnp.concatenate([table[:nb], image], axis=0) if nb else image

    def encoder_pos_embed(self, h: int, w: int) -> jax.Array:
        return self._grid_pe(self.encoder_pos_embed_learned.get_value(), True, h, w)

    def decoder_pos_embed(self, h: int, w: int) -> jax.Array:
        return self._grid_pe(self.decoder_pos_embed_learned.get_value(), True, h, w)

    def diffusion_pos_embed(self, h: int, w: int) -> jax.Array:
        return self._grid_pe(self.diffusion_pos_embed_learned.get_value(), False, h, w)

    # -- buffers -------------------------------------------------------------------------------
    def null_buffer_embeds(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.fake_latent.get_value(), (batch, self.cfg.encoder_embed_dim))

    def class_buffer_embeds(
        self, labels: jax.Array, *, key: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        """class_emb(labels), replaced by fake_latent with prob label_drop_prob in training."""
        emb = self.class_emb(labels)
        if deterministic or self.cfg.label_drop_prob == 0.0:
            return emb
        if key is None:
            raise ValueError("label drop is active (deterministic=False) but no key was given")
        drop = jax.random.uniform(key, (labels.shape[0],)) < self.cfg.label_drop_prob
        return jnp.where(drop[:, None], self.fake_latent.get_value()[None], emb)

    # -- encoder / decoder ---------------------------------------------------------------------
    def forward_mae_encoder(
        self,
        tokens: jax.Array,
        mask: jax.Array | None,
        buffer_embeds: jax.Array,
        *,
        image_shape: tuple[int, int],
        max_visible: int | None = None,
        key: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """tokens [B, L, C], mask [B, L] (1 = masked, None = all visible), buffer_embeds [B, De].

        Returns x_enc [B, buffer + N, De] (buffers, visible tokens ascending, padding) and its
        validity mask; N = max_visible (static; defaults to L).
        """
        cfg = self.cfg
        b, ll, _ = tokens.shape
        h, w = image_shape
        if h * w != ll:
            raise ValueError(f"image_shape {image_shape} does not match {ll} tokens")
        if self.conv_stem is not None:
            if mask is not None:
                tokens = tokens * (1.0 - mask)[..., None].astype(tokens.dtype)
            tokens = self.conv_stem(tokens, (h, w))
        x = self.z_proj(tokens)
        bufs = jnp.broadcast_to(buffer_embeds[:, None, :], (b, cfg.buffer_size, x.shape[-1]))
        x = jnp.concatenate([bufs.astype(x.dtype), x], axis=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed(h, w).astype(x.dtype))
        n_vis = ll if max_visible is None else int(max_visible)
        if mask is None:
            mask = jnp.zeros((b, ll), jnp.float32)
        index, valid = visible_index(mask, cfg.buffer_size, cfg.buffer_size + n_vis)
        x = jnp.take_along_axis(x, index[..., None], axis=1)
        x = run_blocks(
            self.encoder_blocks,
            x,
            valid,
            depth=cfg.encoder_depth,
            key=key,
            deterministic=deterministic,
            remat=cfg.remat,
        )
        return self.encoder_norm(x), valid

    def forward_mae_decoder(
        self,
        x_enc: jax.Array,
        mask: jax.Array,
        *,
        image_shape: tuple[int, int],
        key: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x_enc [B, buffer + N, De] from `forward_mae_encoder` with the same mask -> z [B, L, Dd]."""
        cfg = self.cfg
        b, ll = mask.shape
        h, w = image_shape
        x = self.decoder_embed(x_enc)
        keep = jnp.concatenate([jnp.ones((b, cfg.buffer_size), bool), mask == 0], axis=1)
        # Gather (not scatter): full position p takes encoder row rank(p) among the kept rows.
        src = jnp.clip(jnp.cumsum(keep, axis=1) - 1, 0, x.shape[1] - 1)
        gathered = jnp.take_along_axis(x, src[..., None], axis=1)
        x = jnp.where(keep[..., None], gathered, self.mask_token.get_value().astype(x.dtype))
        x = x + self.decoder_pos_embed(h, w).astype(x.dtype)
        x = run_blocks(
            self.decoder_blocks,
            x,
            None,
            depth=cfg.decoder_depth,
            key=key,
            deterministic=deterministic,
            remat=cfg.remat,
        )
        x = self.decoder_norm(x)[:, cfg.buffer_size :]
        return x + self.diffusion_pos_embed(h, w).astype(x.dtype)

    # -- training loss -------------------------------------------------------------------------
    def forward_loss(
        self,
        z: jax.Array,
        target: jax.Array,
        mask: jax.Array,
        *,
        key: jax.Array | None = None,
        t: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Diffusion loss on rows tiled diffusion_batch_mul times, averaged over masked tokens."""
        mul = self.cfg.diffusion_batch_mul
        b, ll, c = target.shape
        # The tiled rows keep the batch sharding (see DiffLoss's row constraints).
        target = shard_rows(jnp.tile(target.reshape(b * ll, c), (mul, 1)))
        z = shard_rows(jnp.tile(z.reshape(b * ll, -1), (mul, 1)))
        mask = shard_rows(jnp.tile(mask.reshape(b * ll), (mul,)))
        loss, terms = self.diffloss(target, z, mask, key=key, t=t, noise=noise)
        return loss, {**terms, "row_mask": mask}

    def class_conditional_loss(
        self,
        latents: jax.Array,
        labels: jax.Array,
        key: jax.Array,
        *,
        deterministic: bool = False,
        orders: jax.Array | None = None,
        mask_ratio: jax.Array | float | None = None,
        t: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """LTH14 MAR.forward(imgs, labels) on the learned grid. latents [B, h, w, C] (token layout).
        orders / mask_ratio / t / noise are drawn from `key` unless injected (tests)."""
        cfg = self.cfg
        b, h, w, c = latents.shape
        ll = h * w
        k_ord, k_ratio, k_lab, k_enc, k_dec, k_diff = jax.random.split(key, 6)
        x = latents.reshape(b, ll, c)
        if orders is None:
            orders = sample_orders(k_ord, b, ll)
        if mask_ratio is None:
            mask_ratio = sample_mask_ratio(k_ratio, cfg.mask_ratio_min)
        mask = mask_by_order(orders, num_masked_tokens(mask_ratio, ll, cfg.mask_ratio_min))
        bufs = self.class_buffer_embeds(labels, key=k_lab, deterministic=deterministic)
        x_enc, _ = self.forward_mae_encoder(
            x,
            mask,
            bufs,
            image_shape=(h, w),
            max_visible=cfg.max_visible(ll),
            key=k_enc,
            deterministic=deterministic,
        )
        z = self.forward_mae_decoder(
            x_enc, mask, image_shape=(h, w), key=k_dec, deterministic=deterministic
        )
        loss, terms = self.forward_loss(z, x, mask, key=k_diff, t=t, noise=noise)
        return loss, {**terms, "mask": mask, "z": z}


def cosine_mask_schedule(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Static AR schedule shared by every row (MaskGIT / MAGE cosine, MAR.sample_tokens).

    Returns (counts [num_iter + 1]: masked tokens entering each step, then 0 after the last;
    mask_len [num_iter]: the official `mask_len` of each step, which the linear CFG schedule
    reads, = max(1, min(#masked - 1, floor(L cos(pi/2 (k+1)/num_iter)))). The last step
    predicts every remaining token.
    """
    counts, lens = [seq_len], []
    for step in range(num_iter):
        target = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
        lens.append(max(1, min(counts[-1] - 1, target)))
        counts.append(0 if step >= num_iter - 1 else lens[-1])
    return np.asarray(counts, dtype=np.int32), np.asarray(lens, dtype=np.int32)
