"""Harmon (wusize/Harmon): KL-16 VAE + MAR encoder/decoder + Qwen2 + proj_in / proj_out.

harmon_mar.md section 2 and pitfalls 2-6:
  * tokens = VAE posterior mode * vae_scale, layout [B, h, w, C]; the VAE is frozen
    (`jax.lax.stop_gradient`);
  * `extract_visual_feature`: MAR encoder with `fake_latent` in every buffer slot, then proj_in,
    buffers moved to the END for the LLM;
  * `forward_mae_encoder`: LLM over [text embeds (right padded); image rows], key mask
    [text mask, image validity], positions cumsum(mask) - 1 clamped at 0, buffers moved back to
    the front, residual x_enc + proj_out(llm);
  * understanding: the image placeholder span of `input_ids` is replaced by the z_enc rows.

The sparse encoder pads the visible tokens to a static count (see mar.py); the LLM then sees
[visible tokens, padding, buffers]: padding rows are masked keys that do not advance positions, so
every real row's hidden state equals the official one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from unified_mm.models.harmon.conv_stem import check_conv_stem
from unified_mm.models.harmon.diffloss import dense
from unified_mm.models.harmon.mar import (
    MAR,
    MARConfig,
    mask_by_order,
    num_masked_tokens,
    sample_mask_ratio,
    sample_orders,
)
from unified_mm.models.harmon.vae import (
    AutoencoderKL,
    PixelPatchTokenizer,
    PixelTokenizerConfig,
    VAEConfig,
)
from unified_mm.models.llm.qwen2 import KVCache, Qwen2, Qwen2Config, default_positions


@dataclasses.dataclass(frozen=True)
class HarmonConfig:
    """Everything needed to build a Harmon model. Exactly one of `vae` / `pixel` is set."""

    mar: MARConfig
    llm: Qwen2Config
    vae: VAEConfig | None = None
    pixel: PixelTokenizerConfig | None = None
    proj_in_hidden: int | None = None  # None: the LLM width (official build_mlp)
    proj_out_hidden: int | None = None
    image_size: int = 512
    image_token_id: int = 151665
    pad_token_id: int = 151645
    eos_token_id: int = 151645
    grad_scale: float = 0.1

    def __post_init__(self):
        if (self.vae is None) == (self.pixel is None):
            raise ValueError("HarmonConfig needs exactly one tokenizer: vae (KL-16) or pixel")
        tok_dim = self.vae.token_dim if self.vae is not None else self.pixel.token_dim
        if tok_dim != self.mar.token_embed_dim:
            raise ValueError(
                f"tokenizer token_dim {tok_dim} != MAR token_embed_dim {self.mar.token_embed_dim}"
            )
        check_conv_stem(self.mar.conv_stem, self.mar.conv_stem_patch, tok_dim)
        if self.image_size % self.stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of stride {self.stride}"
            )

    @property
    def stride(self) -> int:
        """Pixels per token side."""
        if self.vae is not None:
            return self.vae.stride * self.vae.patch_size
        return self.pixel.patch

    def latent_grid(self, image_size: int | None = None) -> tuple[int, int]:
        s = (image_size or self.image_size) // self.stride
        return s, s

    @classmethod
    def from_fixture_json(
        cls,
        d: dict,
        *,
        dtype: str = "float32",
        remat: bool = False,
        tokenizer: str = "kl16",
        pixel_patch: int | None = None,
        pixel_colour_cell: int = 0,
    ) -> HarmonConfig:
        """Reads the fixture / bench config.json format (sections vae, mar, llm, harmon, fixture).

        tokenizer="pixel" swaps the KL-16 VAE for `PixelPatchTokenizer` with patch `pixel_patch`
        (default: the VAE stride); MAR then embeds 3 * patch^2 channels per token, or the factorised
        occupancy + cell-colour layout when `pixel_colour_cell` > 0 (`PixelTokenizerConfig`).
        """
        if tokenizer not in ("kl16", "pixel"):
            raise ValueError(f"tokenizer must be 'kl16' or 'pixel', got {tokenizer!r}")
        if tokenizer == "kl16" and pixel_colour_cell:
            raise ValueError(
                f"pixel_colour_cell {pixel_colour_cell} is a pixel-tokenizer layout; the KL-16 VAE "
                "has none"
            )
        h, fx = d.get("harmon", {}), d.get("fixture", {})
        mar = MARConfig.from_fixture_json(d["mar"], dtype=dtype, remat=remat)
        scale = float(h.get("vae_scale", d["vae"].get("scale", 0.2325)))
        vae = pixel = None
        if tokenizer == "kl16":
            vae = VAEConfig.from_fixture_json(
                d["vae"], scale=scale, patch_size=mar.patch_size, dtype=dtype
            )
        else:
            p = int(pixel_patch or d["vae"].get("stride", 16))
            pixel = PixelTokenizerConfig(patch=p, scale=scale, colour_cell=int(pixel_colour_cell))
            mar = dataclasses.replace(mar, vae_embed_dim=pixel.token_dim, patch_size=1)
        llm = Qwen2Config.from_hf_dict(d["llm"], dtype=dtype, remat=remat)
        proj_in = h.get("proj_in", [mar.encoder_embed_dim, llm.hidden_size, llm.hidden_size])
        proj_out = h.get("proj_out", [llm.hidden_size, llm.hidden_size, mar.encoder_embed_dim])
        if proj_in[0] != mar.encoder_embed_dim or proj_in[2] != llm.hidden_size:
            raise ValueError(f"harmon.proj_in {proj_in} does not map MAR width to LLM width")
        if proj_out[0] != llm.hidden_size or proj_out[2] != mar.encoder_embed_dim:
            raise ValueError(f"harmon.proj_out {proj_out} does not map LLM width to MAR width")
        vocab = llm.vocab_size
        return cls(
            mar=mar,
            llm=llm,
            vae=vae,
            pixel=pixel,
            proj_in_hidden=int(proj_in[1]),
            proj_out_hidden=int(proj_out[1]),
            image_size=int(d.get("image_size", mar.seq_h * 16)),
            image_token_id=int(fx.get("image_token_id", vocab - 1)),
            pad_token_id=int(fx.get("pad_token_id", vocab - 2)),
            eos_token_id=int(fx.get("eos_token_id", vocab - 2)),
        )


class ProjMLP(nnx.Module):
    """Linear - SiLU - Linear (official `build_mlp`, PyTorch default init, not zero-initialised)."""

    def __init__(self, din: int, hidden: int, dout: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.linear_1 = dense(
            din, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, kernel_init=init
        )
        self.linear_2 = dense(
            hidden, dout, ("mlp", "embed"), rngs=rngs, dtype=dtype, kernel_init=init
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class VisualFeature(struct.PyTreeNode):
    """Output of `Harmon.extract_visual_feature`."""

    x_enc: jax.Array  # [B, buffer + N, De]: buffers, visible tokens ascending, padding
    valid: jax.Array  # [B, buffer + N] bool, validity of x_enc rows
    z_enc: jax.Array  # [B, N + buffer, H]: proj_in(x_enc) with the buffers moved to the end
    z_valid: jax.Array  # [B, N + buffer] bool


def splice_image_rows(
    llm: Qwen2, input_ids: jax.Array, rows: jax.Array, image_token_id: int
) -> jax.Array:
    """`llm`'s text embeddings of input_ids with the `image_token_id` span replaced by `rows`
    [B, N, D] in order (each row of input_ids holds exactly N image tokens)."""
    is_img = input_ids == image_token_id
    text = llm.embed(jnp.where(is_img, 0, input_ids))
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, rows.shape[1] - 1)
    picked = jnp.take_along_axis(rows, idx[..., None], axis=1).astype(text.dtype)
    return jnp.where(is_img[..., None], picked, text)


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Identity forward, gradient multiplied by `scale` (HarmonDev `_ScaleGradient`). `scale`
    may be traced (it receives a zero cotangent)."""
    return x


def _scale_fwd(x, scale):
    return x, jnp.asarray(scale, jnp.float32)


def _scale_bwd(scale, g):
    return (g * scale.astype(g.dtype), jnp.zeros_like(scale))


scale_gradient.defvjp(_scale_fwd, _scale_bwd)


class Harmon(nnx.Module):
    def __init__(self, cfg: HarmonConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.mar.dtype)
        if cfg.vae is not None:
            self.vae = AutoencoderKL(cfg.vae, rngs=rngs)
        else:
            self.vae = PixelPatchTokenizer(cfg.pixel)
        self.mar = MAR(cfg.mar, rngs=rngs)
        self.llm = Qwen2(cfg.llm, rngs=rngs)
        de, hh = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
        self.proj_in = ProjMLP(de, cfg.proj_in_hidden or hh, hh, dtype=dt, rngs=rngs)
        self.proj_out = ProjMLP(hh, cfg.proj_out_hidden or hh, de, dtype=dt, rngs=rngs)

    # -- tokenizer -----------------------------------------------------------------------------
    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> tokens [B, h, w, C] (frozen VAE, mode * scale)."""
        return jax.lax.stop_gradient(self.vae.tokenize(images))

    def decode(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, h, w, C] -> images [B, H, W, 3] (not clamped)."""
        return self.vae.detokenize(tokens)

    # -- MAR + LLM -----------------------------------------------------------------------------
    def extract_visual_feature(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        *,
        max_visible: int | None = None,
        key: jax.Array | None = None,
        deterministic: bool = True,
    ) -> VisualFeature:
        """tokens [B, h, w, C]; mask [B, h*w] (1 = masked) or None (everything visible)."""
        b, h, w, c = tokens.shape
        nb = self.cfg.mar.buffer_size
        x_enc, valid = self.mar.forward_mae_encoder(
            tokens.reshape(b, h * w, c),
            mask,
            self.mar.null_buffer_embeds(b),
            image_shape=(h, w),
            max_visible=max_visible,
            key=key,
            deterministic=deterministic,
        )
        z = self.proj_in(x_enc)
        z_enc = jnp.concatenate([z[:, nb:], z[:, :nb]], axis=1)
        z_valid = jnp.concatenate([valid[:, nb:], valid[:, :nb]], axis=1)
        return VisualFeature(x_enc=x_enc, valid=valid, z_enc=z_enc, z_valid=z_valid)

    def llm_on_image(
        self,
        feat: VisualFeature,
        *,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array,
        inputs_embeds: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array:
        """LLM hidden states of the image rows ([visible, padding, buffers] order).

        Without a cache the text (ids or embeds, right padded, mask `attention_mask`) and the
        image rows run in one causal pass. With a cache holding the prefilled text (its key mask
        already the text mask) only the image rows run, at positions after each row's valid text.
        """
        n_img = feat.z_enc.shape[1]
        if cache is None:
            if inputs_embeds is None:
                inputs_embeds = self.llm.embed(input_ids)
            embeds = jnp.concatenate(
                [inputs_embeds, feat.z_enc.astype(inputs_embeds.dtype)], axis=1
            )
            mask = jnp.concatenate([attention_mask.astype(bool), feat.z_valid], axis=1)
            hidden, _ = self.llm(embeds, attention_mask=mask)
            return hidden[:, -n_img:]
        positions = default_positions(feat.z_valid, attention_mask.astype(jnp.int32).sum(axis=1))
        hidden, _ = self.llm(
            feat.z_enc, attention_mask=feat.z_valid, position_ids=positions, cache=cache
        )
        return hidden

    def forward_mae_encoder(
        self,
        tokens: jax.Array,
        mask: jax.Array,
        *,
        attention_mask: jax.Array,
        input_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        cache: KVCache | None = None,
        max_visible: int | None = None,
        key: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ):
        """Harmon.forward_mae_encoder: x_enc + proj_out(LLM(image rows)) -> ([B, nb + N, De], valid).

        return_hidden=True also returns the LLM hidden state of the image rows (LLM order).
        """
        nb = self.cfg.mar.buffer_size
        feat = self.extract_visual_feature(
            tokens, mask, max_visible=max_visible, key=key, deterministic=deterministic
        )
        hidden = self.llm_on_image(
            feat,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
        )
        z_llm = jnp.concatenate([hidden[:, -nb:], hidden[:, :-nb]], axis=1)
        x_enc = feat.x_enc + self.proj_out(z_llm.astype(feat.x_enc.dtype))
        if return_hidden:
            return x_enc, feat.valid, hidden
        return x_enc, feat.valid

    def forward_mae_decoder(
        self,
        x_enc: jax.Array,
        mask: jax.Array,
        *,
        image_shape: tuple[int, int],
        key: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        return self.mar.forward_mae_decoder(
            x_enc, mask, image_shape=image_shape, key=key, deterministic=deterministic
        )

    # -- understanding -------------------------------------------------------------------------
    def splice_image_embeds(self, input_ids: jax.Array, z_enc: jax.Array) -> jax.Array:
        """Text embeddings with the image placeholder span replaced by the z_enc rows.

        Each row of input_ids must hold exactly z_enc.shape[1] `image_token_id` entries (the
        official splice fills them with z_enc flattened in row-major order).
        """
        return splice_image_rows(self.llm, input_ids, z_enc, self.cfg.image_token_id)

    def understanding_embeds(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        *,
        key: jax.Array | None = None,
        deterministic: bool = True,
        grad_scale: float | jax.Array | None = None,
    ) -> jax.Array:
        feat = self.extract_visual_feature(
            self.encode(images), None, key=key, deterministic=deterministic
        )
        z = feat.z_enc if grad_scale is None else scale_gradient(feat.z_enc, grad_scale)
        return self.splice_image_embeds(input_ids, z)

    # -- training losses -----------------------------------------------------------------------
    def t2i_loss(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        key: jax.Array,
        *,
        deterministic: bool,
        orders: jax.Array | None = None,
        mask_ratio: jax.Array | float | None = None,
        diffusion_t: jax.Array | None = None,
        diffusion_noise: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """HarmonDev.text2image_loss: masked-token diffusion loss (diffusion_batch_mul copies).

        images NHWC in [-1, 1]; input_ids / attention_mask right-padded prompts. Orders, mask
        ratio, diffusion t / noise and dropout come from `key` unless injected (tests).
        """
        mcfg = self.cfg.mar
        tokens = self.encode(images)
        b, h, w, c = tokens.shape
        ll = h * w
        k_ord, k_ratio, k_enc, k_dec, k_diff = jax.random.split(key, 5)
        if orders is None:
            orders = sample_orders(k_ord, b, ll)
        if mask_ratio is None:
            mask_ratio = sample_mask_ratio(k_ratio, mcfg.mask_ratio_min)
        mask = mask_by_order(orders, num_masked_tokens(mask_ratio, ll, mcfg.mask_ratio_min))
        x_enc, _ = self.forward_mae_encoder(
            tokens,
            mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_visible=mcfg.max_visible(ll),
            key=k_enc,
            deterministic=deterministic,
        )
        z = self.forward_mae_decoder(
            x_enc, mask, image_shape=(h, w), key=k_dec, deterministic=deterministic
        )
        loss, terms = self.mar.forward_loss(
            z, tokens.reshape(b, ll, c), mask, key=k_diff, t=diffusion_t, noise=diffusion_noise
        )
        rows = jnp.tile(mask.reshape(-1), (mcfg.diffusion_batch_mul,))
        denom = rows.sum()
        metrics = {
            "loss": loss,
            "mse": (terms["mse"] * rows).sum() / denom,
            "vb": (terms["vb"] * rows).sum() / denom,
            "mask_ratio": mask.mean(),
        }
        return loss, metrics

    def i2t_loss(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        labels: jax.Array,
        key: jax.Array,
        *,
        deterministic: bool,
        grad_scale: float | jax.Array = 0.1,
        label_rows_per_sample: int | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """HarmonDev.image2text_loss: token-mean next-token CE over labels >= 0 (HF convention:
        labels aligned with input_ids, shifted here). The gradient reaching z_enc (proj_in, MAR
        encoder) is scaled by `grad_scale`. `label_rows_per_sample` (static) takes logits only on
        each sample's first that many labelled rows, shrinking the float32 [B, T, vocab] tensor;
        it must be at least the sample's labelled-row count, or labels are dropped. The rows are
        gathered within each sample, so the batch axis keeps its sharding (a gather over the
        flattened global batch made XLA replicate it: 119 GB of temporaries per chip for
        Harmon-1.5B hires on v6e-64 at 45 per chip). None computes logits everywhere.
        """
        embeds = self.understanding_embeds(
            images, input_ids, key=key, deterministic=deterministic, grad_scale=grad_scale
        )
        hidden, _ = self.llm(embeds, attention_mask=attention_mask)
        hidden, targets = hidden[:, :-1], jnp.asarray(labels)[:, 1:]
        valid = targets >= 0
        if label_rows_per_sample is not None:
            order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True)
            order = order[:, :label_rows_per_sample]
            hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
            targets = jnp.take_along_axis(targets, order, axis=1)
            valid = jnp.take_along_axis(valid, order, axis=1)
        logits = self.llm.logits(hidden)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
        n = jnp.maximum(valid.sum(), 1)
        loss = jnp.where(valid, ce, 0.0).sum() / n
        acc = jnp.where(valid, jnp.argmax(logits, -1) == targets, False).sum() / n
        return loss, {"loss": loss, "accuracy": acc, "label_tokens": valid.sum()}

    # -- generation (sampling.py) --------------------------------------------------------------
    def sample(self, input_ids: jax.Array, attention_mask: jax.Array, **kwargs):
        """Text-to-image sampling; see `sampling.sample_t2i` for the arguments."""
        from unified_mm.models.harmon import sampling

        return sampling.sample_t2i(self, input_ids, attention_mask, **kwargs)
