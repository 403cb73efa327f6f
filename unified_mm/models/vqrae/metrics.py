"""Tokenizer evaluation metrics (vqrae_rae.md pitfalls 16-17, section 8).

* codebook utilisation: the fraction of the K codes used at least once over a whole evaluation pass
  (accumulate `CodeUsage` over batches; per-batch usage is not the reported number);
* code perplexity over the same pass;
* PSNR: mean of per-image PSNR on [0, 1] images;
* SSIM: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, valid filtering, mean over channels and
  positions (the dm-pix / torchmetrics definition), per image;
* distillation cosine similarity (`losses.cosine_similarity`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unified_mm.models.vqrae.losses import cosine_similarity

Array = jax.Array

__all__ = ["CodeUsage", "cosine_similarity", "psnr", "ssim", "to_unit_range"]


def to_unit_range(x: Array) -> Array:
    """[-1, 1] -> [0, 1], clipped."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def psnr(x01: Array, y01: Array, max_val: float = 1.0) -> Array:
    """Per-image PSNR [B] in dB of NHWC images in [0, max_val]."""
    mse = jnp.mean(jnp.square(x01.astype(jnp.float32) - y01.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-12))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def ssim(x01: Array, y01: Array, max_val: float = 1.0, size: int = 11, sigma: float = 1.5) -> Array:
    """Per-image SSIM [B] of NHWC images in [0, max_val]."""
    g = jnp.asarray(_gaussian(size, sigma))

    def blur(z: Array) -> Array:  # separable valid filtering over H then W
        h = z.shape[1] - size + 1
        w = z.shape[2] - size + 1
        z = sum(g[i] * z[:, i : i + h] for i in range(size))
        return sum(g[i] * z[:, :, i : i + w] for i in range(size))

    x = x01.astype(jnp.float32)
    y = y01.astype(jnp.float32)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


class CodeUsage:
    """Host-side histogram of code ids over an evaluation pass (call `update` per batch)."""

    def __init__(self, codebook_size: int):
        self.counts = np.zeros((codebook_size,), np.int64)

    def update(self, ids: Array | np.ndarray) -> None:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.counts.size):
            raise ValueError(f"CodeUsage: ids outside [0, {self.counts.size})")
        self.counts += np.bincount(ids, minlength=self.counts.size)

    def utilisation(self) -> float:
        """Fraction of the K codes used at least once."""
        return float(np.mean(self.counts > 0))

    def perplexity(self) -> float:
        total = self.counts.sum()
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0] / total
        return float(np.exp(-np.sum(p * np.log(p))))
