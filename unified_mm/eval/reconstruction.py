"""Reconstruction evaluation of image tokenizers (VQRAE; any model with a reconstruct function).

PSNR and SSIM per image on [0, 1] pixels (definitions in `models/vqrae/metrics.py`: SSIM with an
11-tap Gaussian window, sigma 1.5, valid filtering), averaged over the pass; for models with a
codebook, utilisation (fraction of the K codes used at least once over the whole pass, never per
batch) and code perplexity over the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from unified_mm.models.vqrae.metrics import CodeUsage, psnr, ssim, to_unit_range

# images [B, H, W, 3] in [-1, 1] -> (reconstruction in [-1, 1], code ids [B, N] or None)
ReconstructFn = Callable[[jax.Array], tuple[jax.Array, jax.Array | None]]


@jax.jit
def _batch_metrics(images: jax.Array, recon: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, y = to_unit_range(recon), to_unit_range(images)
    return psnr(x, y), ssim(x, y)


def evaluate_reconstruction(
    reconstruct: ReconstructFn,
    batches: Iterable[np.ndarray],
    *,
    codebook_size: int | None = None,
) -> dict:
    """Runs `reconstruct` over batches of [-1, 1] images; returns psnr, ssim, images and, with a
    codebook, codebook_utilisation and code_perplexity."""
    usage = CodeUsage(codebook_size) if codebook_size else None
    psnrs, ssims = [], []
    for images in batches:
        images = jnp.asarray(images, jnp.float32)
        recon, ids = reconstruct(images)
        if recon.shape != images.shape:
            raise ValueError(f"reconstruction shape {recon.shape} != input shape {images.shape}")
        p, s = _batch_metrics(images, recon)
        psnrs.append(np.asarray(p))
        ssims.append(np.asarray(s))
        if usage is not None:
            if ids is None:
                raise ValueError("a codebook size was given but the model returned no code ids")
            usage.update(np.asarray(ids))
    if not psnrs:
        raise ValueError("evaluate_reconstruction got no images")
    out = {
        "psnr": float(np.mean(np.concatenate(psnrs))),
        "ssim": float(np.mean(np.concatenate(ssims))),
        "images": int(sum(len(p) for p in psnrs)),
    }
    if usage is not None:
        out["codebook_utilisation"] = usage.utilisation()
        out["code_perplexity"] = usage.perplexity()
        out["codebook_size"] = int(codebook_size)
    return out


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (x / 255 * 2 - 1)."""
    return np.asarray(images, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def unit_to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 with rounding (reconstructions are compared at full precision)."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.rint(x).astype(np.uint8)
