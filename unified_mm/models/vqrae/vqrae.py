"""VQRAE tokenizer: one vision foundation encoder, SimVQ codes, a symmetric ViT decoder (vqrae_rae.md 1-2).

Images enter as NHWC float32 in [-1, 1]. Inside they are mapped to [0, 1], resized to the encoder's input
size if needed (torch bicubic, no antialias, as RAE) and normalised with the *encoder's* mean/std; the
decoder predicts encoder-normalised pixels that are de-normalised with the same statistics and mapped
back to [-1, 1] (pitfall 3).

Training stages (the trainer picks the trainable parameters with `trainable_filter(stage)`):
  0  encoder pre-training for the from-scratch "vit" encoder (`encoder_pretrain_loss`);
  1  encoder frozen; SimVQ projections, W, decoder and discriminator heads trained;
  2  encoder unfrozen, plus self-distillation against `teacher`, a frozen copy of the stage-2 starting
     encoder (call `init_teacher_from_encoder()` when stage 2 begins).

Single-backward GAN (`tokenizer_loss`): the generator and the discriminator are trained from ONE scalar.
The generator terms see the discriminator through stop_gradient on its parameters (a merged copy of its
state), so they only move the generator; the hinge term sees the reconstruction through stop_gradient,
so it only moves the discriminator. Deviation from RAE (ASSUMPTION): RAE shows the discriminator fakes
from the *updated* generator after its step; here the fakes come from the same forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from unified_mm.models.vqrae import encoder_convert
from unified_mm.models.vqrae.config import VQRAEConfig
from unified_mm.models.vqrae.decoder import ViTDecoder
from unified_mm.models.vqrae.dinov2 import Dinov2RegEncoder
from unified_mm.models.vqrae.discriminator import build_discriminator, diffaug
from unified_mm.models.vqrae.layers import dense, dtype_of, unpatchify
from unified_mm.models.vqrae.losses import (
    adaptive_weight,
    cosine_similarity,
    distill_loss,
    generator_loss,
    hinge_d_loss,
    pixel_loss,
    quantize_8bit,
)
from unified_mm.models.vqrae.lpips import LPIPS, set_lpips_params
from unified_mm.models.vqrae.metrics import psnr, to_unit_range
from unified_mm.models.vqrae.resize import resize
from unified_mm.models.vqrae.siglip import SiglipVisionEncoder
from unified_mm.models.vqrae.simvq import SimVQ

Array = jax.Array
sg = jax.lax.stop_gradient


def build_encoder(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """siglip2 and vit -> SiglipVisionEncoder; dinov2_reg -> Dinov2RegEncoder."""
    if cfg.kind == "dinov2_reg":
        return Dinov2RegEncoder(cfg, rngs=rngs)
    return SiglipVisionEncoder(cfg, rngs=rngs)


def trainable_filter(stage: int) -> nnx.filterlib.Filter:
    """nnx filter of the parameters trained in tokenizer stage 0, 1 or 2 (see the module docstring).

    The teacher, the DINO discriminator backbone, the codebook C and LPIPS are never included.
    """
    groups = {
        0: ("encoder", "pretrain_head"),
        1: ("quantizer", "decoder", "discriminator"),
        2: ("encoder", "quantizer", "decoder", "discriminator"),
    }
    if stage not in groups:
        raise ValueError(f"trainable_filter: stage must be 0, 1 or 2, got {stage!r}")
    return nnx.All(
        nnx.Param,
        nnx.Any(*(nnx.PathContains(g) for g in groups[stage])),
        nnx.Not(nnx.PathContains("backbone")),
        nnx.Not(nnx.PathContains("teacher")),
    )


class VQRAE(nnx.Module):
    def __init__(self, cfg: VQRAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        enc = cfg.encoder
        self.decoder_cfg = cfg.decoder.resolved(enc)
        self.encoder = build_encoder(enc, rngs=rngs)
        self.teacher = build_encoder(enc, rngs=rngs) if cfg.with_teacher else None
        d = enc.hidden_size
        # ASSUMPTION: the quantizer maps back to the encoder width d and the decoder keeps RAE's own
        # linear embed d -> D, so the decoder also accepts continuous Z_I (vqrae_rae.md 1.4, pitfall 19).
        self.quantizer = SimVQ(cfg.quantizer, d, d, rngs=rngs, dtype=dtype_of(enc.dtype))
        self.decoder = ViTDecoder(self.decoder_cfg, d, rngs=rngs)
        loss = cfg.loss
        self.discriminator = (
            build_discriminator(loss.disc, rngs=rngs) if loss.gan_weight > 0 else None
        )
        # Pretrained weights are read by `load_pretrained()`, not here, so an abstract or jitted
        # (sharded) construction does not bake files into the program. nnx.data: a submodule slot
        # that may hold None.
        if loss.lpips_weight > 0 and loss.lpips_path:
            self.lpips = nnx.data(LPIPS())
        else:
            self.lpips = nnx.data(None)
            logging.info(
                "LPIPS term is off (LossConfig.lpips_path is not set or lpips_weight is 0)"
            )
        self.pretrain_head = (
            dense(d, enc.patch_size**2 * 3, ("embed", None), rngs=rngs)
            if enc.kind == "vit"
            else None
        )

    # ----------------------------------------------------------------------------- weights
    def load_pretrained(self) -> None:
        """Reads every configured weight file: the VFM (into encoder and teacher), LPIPS-VGG and the
        DINO discriminator backbone. Call once after construction (or after a sharded init)."""
        cfg = self.cfg
        if cfg.encoder.pretrained_path:
            self.load_pretrained_encoder(cfg.encoder.pretrained_path)
        elif cfg.encoder.kind != "vit":
            logging.warning(
                "VQRAE: no EncoderConfig.pretrained_path, the %s encoder is random",
                cfg.encoder.kind,
            )
        if self.lpips is not None:
            set_lpips_params(self.lpips, encoder_convert.read_weights(cfg.loss.lpips_path))
            logging.info("LPIPS-VGG weights loaded from %s", cfg.loss.lpips_path)
        if self.discriminator is not None and cfg.loss.disc.kind == "dino":
            if cfg.loss.disc.dino_path:
                bb = self.discriminator.backbone
                sd = encoder_convert.read_weights(cfg.loss.disc.dino_path)
                encoder_convert.load_params(
                    bb, encoder_convert.dino_v1_params_from_timm(sd, bb.cfg)
                )
            else:
                logging.warning(
                    "DINO discriminator: no DiscConfig.dino_path, the backbone is random"
                )

    def load_pretrained_encoder(self, path: str) -> None:
        """Loads VFM weights (.safetensors from HF, big_vision .npz) into the encoder and the teacher."""
        params = encoder_convert.encoder_params(
            encoder_convert.read_weights(path), self.cfg.encoder
        )
        encoder_convert.load_params(self.encoder, params)
        if self.teacher is not None:
            encoder_convert.load_params(self.teacher, params)

    def init_teacher_from_encoder(self) -> None:
        """Copies the current encoder weights into the frozen teacher (call at the start of stage 2)."""
        if self.teacher is None:
            raise ValueError("VQRAE.init_teacher_from_encoder: built with with_teacher=False")
        nnx.update(self.teacher, jax.tree.map(jnp.copy, nnx.state(self.encoder, nnx.Param)))

    # ----------------------------------------------------------------------------- pixels
    @property
    def grid(self) -> tuple[int, int]:
        g = self.cfg.encoder.grid
        return (g, g)

    def preprocess(self, images: Array) -> Array:
        """[-1, 1] NHWC -> encoder input (resized to the encoder resolution, encoder mean/std)."""
        enc = self.cfg.encoder
        x = (images.astype(jnp.float32) + 1.0) * 0.5
        s = enc.resolution
        x = resize(x, (s, s), method="bicubic", antialias=False)
        return (x - jnp.asarray(enc.image_mean)) / jnp.asarray(enc.image_std)

    def _to_images(self, normed: Array) -> Array:
        """Encoder-normalised pixels -> [-1, 1] (not clipped: losses see the raw output)."""
        enc = self.cfg.encoder
        return (normed * jnp.asarray(enc.image_std) + jnp.asarray(enc.image_mean)) * 2.0 - 1.0

    # ----------------------------------------------------------------------------- tokenizer API
    def encode_continuous(self, images: Array) -> Array:
        """Z_I [B, N, d]: the continuous features (understanding path and quantizer input)."""
        return self.encoder(self.preprocess(images))

    def quantize(self, z: Array) -> tuple[Array, Array, Array, dict[str, Array]]:
        """Z_I -> (decoder tokens, ids [B, N] int32, quantization loss, metrics)."""
        return self.quantizer(z)

    def decode_tokens(self, tokens: Array, grid: tuple[int, int] | None = None) -> Array:
        """Decoder-input tokens [B, N, d] -> images in [-1, 1]."""
        grid = self.grid if grid is None else tuple(grid)
        return self._to_images(self.decoder(tokens, grid))

    def decode_ids(self, ids: Array, grid: tuple[int, int] | None = None) -> Array:
        """Code ids [B, N] -> images in [-1, 1] (through C.W, the projection and the decoder)."""
        return self.decode_tokens(self.quantizer.decode_ids(ids), grid)

    def reconstruct(self, images: Array) -> tuple[Array, Array]:
        """images -> (reconstruction in [-1, 1], ids)."""
        tokens, ids, _, _ = self.quantize(self.encode_continuous(images))
        return self.decode_tokens(tokens), ids

    # ----------------------------------------------------------------------------- losses
    def _rec_loss(self, recon: Array, images: Array) -> tuple[Array, Array, Array]:
        loss_cfg = self.cfg.loss
        pix = pixel_loss((recon + 1.0) * 0.5, (images + 1.0) * 0.5, loss_cfg.pixel_loss)
        perc = jnp.zeros((), jnp.float32)
        if self.lpips is not None:
            perc = jnp.mean(self.lpips(recon, images.astype(jnp.float32)))
        return loss_cfg.pixel_weight * pix + loss_cfg.lpips_weight * perc, pix, perc

    def tokenizer_loss(
        self,
        images: Array,
        key: Array,
        *,
        step: Array | int,
        stage_distill: bool,
        deterministic: bool = False,
        train_encoder: bool | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """L_rec + L_quant (+ GAN from its start step) (+ lambda_d L_distill in stage 2).

        `step` may be traced. `train_encoder` (default: `stage_distill`) lets gradients reach the
        encoder; in stage 1 the features are stop-gradient'd so no encoder backward is computed.
        `deterministic` is accepted for the trainer's uniform signature (no dropout in this model).
        """
        del deterministic
        if stage_distill and self.teacher is None:
            raise ValueError("tokenizer_loss: stage_distill needs a teacher (with_teacher=True)")
        loss_cfg = self.cfg.loss
        train_encoder = stage_distill if train_encoder is None else train_encoder
        images = images.astype(jnp.float32)
        grid = self.grid
        pixels = self.preprocess(images)
        z = self.encoder(pixels)
        if not train_encoder:
            z = sg(z)
        tokens, ids, q_loss, metrics = self.quantize(z)
        feats = self.decoder.features(tokens, grid)
        recon = self._to_images(self.decoder.predict_pixels(feats, grid))
        if recon.shape != images.shape:
            raise ValueError(
                f"VQRAE: decoder output {recon.shape} != input {images.shape}; set DecoderConfig."
                "patch_size so that grid * patch equals the image size"
            )
        rec, pix, perc = self._rec_loss(recon, images)
        total = rec + loss_cfg.quant_weight * q_loss
        metrics = dict(metrics)
        metrics |= {"loss/pixel": pix, "loss/lpips": perc, "loss/quant": q_loss}
        metrics["psnr"] = jnp.mean(psnr(to_unit_range(sg(recon)), to_unit_range(images)))

        if self.discriminator is not None:
            total = total + self._gan_terms(images, recon, feats, grid, key, step, metrics)

        if stage_distill:
            t = sg(self.teacher(pixels))
            dl = distill_loss(z, t)
            total = total + loss_cfg.distill_weight * dl
            metrics["distill/loss"] = dl
            metrics["distill/cos"] = cosine_similarity(sg(z), t)
        metrics["loss/total"] = total
        return total, metrics

    def _gan_terms(self, images, recon, feats, grid, key, step, metrics) -> Array:
        loss_cfg = self.cfg.loss
        k_gen, k_real, k_fake = jax.random.split(key, 3)
        aug = loss_cfg.disc.diffaug
        graphdef, dstate = nnx.split(self.discriminator)
        d_frozen = nnx.merge(graphdef, sg(dstate))  # generator side: no gradient to D

        def gan_of(x: Array) -> Array:
            return generator_loss(d_frozen(diffaug(x, k_gen) if aug else x))

        g_loss = gan_of(recon)
        gan_on = jnp.asarray(step) >= loss_cfg.gan_start_step
        if loss_cfg.adaptive_weight:
            kernel = self.decoder.pred.kernel[...]
            f = sg(feats)

            def img_of(k: Array) -> Array:
                return self._to_images(self.decoder.predict_pixels(f, grid, kernel=k))

            def compute() -> Array:
                return adaptive_weight(
                    lambda k: self._rec_loss(img_of(k), images)[0],
                    lambda k: gan_of(img_of(k)),
                    kernel,
                    loss_cfg.max_adaptive_weight,
                )

            # The two extra backward passes only run once the GAN term is on.
            w = jax.lax.cond(gan_on, compute, lambda: jnp.zeros((), jnp.float32))
        else:
            w = jnp.ones((), jnp.float32)
        gen_term = jnp.where(gan_on, loss_cfg.gan_weight * w * g_loss, 0.0)

        # Discriminator side: the fakes carry no gradient back to the generator.
        fake = sg(recon)
        if loss_cfg.disc_fake_8bit:
            fake = quantize_8bit(fake)
        real = images
        if aug:
            fake, real = diffaug(fake, k_fake), diffaug(real, k_real)
        logits = self.discriminator(jnp.concatenate([real, fake], axis=0))
        b = images.shape[0]
        l_real, l_fake = logits[:b], logits[b:]
        d_loss = hinge_d_loss(l_real, l_fake)
        disc_on = jnp.asarray(step) >= loss_cfg.disc_start_step
        metrics |= {
            "loss/gan_g": g_loss,
            "loss/disc": d_loss,
            "gan/adaptive_weight": w,
            "gan/logits_real": jnp.mean(l_real),
            "gan/logits_fake": jnp.mean(l_fake),
            "gan/on": gan_on.astype(jnp.float32),
        }
        return gen_term + jnp.where(disc_on, d_loss, 0.0)

    def encoder_pretrain_loss(
        self, images: Array, key: Array | None = None, *, deterministic: bool = False
    ) -> tuple[Array, dict[str, Array]]:
        """Stage 0 for the from-scratch "vit" encoder: per-token pixel autoencoding through a linear
        head, L2 in the encoder-normalised space. `key` and `deterministic` are unused (no noise)."""
        del key, deterministic
        if self.pretrain_head is None:
            raise ValueError(
                "encoder_pretrain_loss: only the 'vit' encoder kind has a pretrain head"
            )
        enc = self.cfg.encoder
        pixels = self.preprocess(images)
        z = self.encoder(pixels)
        pred = unpatchify(self.pretrain_head(z).astype(jnp.float32), self.grid, enc.patch_size)
        loss = jnp.mean(jnp.square(pred - pixels))
        recon01 = to_unit_range(self._to_images(sg(pred)))
        target01 = to_unit_range(self._to_images(pixels))
        return loss, {"pretrain/loss": loss, "pretrain/psnr": jnp.mean(psnr(recon01, target01))}
