"""torch-compatible image resizing (vqrae_rae.md pitfall 4).

`jax.image.resize("bicubic")` uses Keys a=-0.5 and antialiases when downsampling, which does not match
`torch.nn.functional.interpolate`. Here each axis is resized by a dense [out, in] weight matrix built in
NumPy (shapes are static) that reproduces torch's kernels with align_corners=False:

* bicubic, antialias=False: a=-0.75, source index clamped at the borders (RAE's 256->224 input resize,
  SigLIP's position-embedding interpolation);
* bicubic, antialias=True: PIL-style separable filter, a=-0.5, support widened by the scale when
  downsampling, window cut at the borders and renormalised (DINOv2 position-embedding interpolation);
* bilinear, antialias=False (the DINO discriminator's resize to 224).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
        for k in range(4):
            m[i, min(max(base - 1 + k, 0), in_size - 1)] += weights[k]
    return m


@functools.lru_cache(maxsize=64)
def _bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero as torch's cast does
        hi = min(int(center + support + 0.5), in_size)
        js = np.arange(lo, hi)
        w = _cubic((js - center + 0.5) * invscale, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        x0 = int(src)
        x1 = x0 + 1 if x0 < in_size - 1 else x0
        lam = src - x0
        m[i, x0] += 1.0 - lam
        m[i, x1] += lam
    return m


def resize_matrix(in_size: int, out_size: int, method: str, antialias: bool = False) -> np.ndarray:
    """The [out, in] float32 interpolation matrix torch would apply along one axis."""
    if in_size == out_size:
        return np.eye(in_size, dtype=np.float32)
    if method == "bicubic":
        m = (
            _bicubic_aa_matrix(in_size, out_size)
            if antialias
            else _bicubic_matrix(in_size, out_size)
        )
    elif method == "bilinear":
        if antialias:
            raise ValueError("resize_matrix: antialiased bilinear is not implemented")
        m = _bilinear_matrix(in_size, out_size)
    else:
        raise ValueError(f"resize_matrix: unknown method {method!r}; expected bicubic|bilinear")
    return m.astype(np.float32)


def resize(
    x: Array, size: tuple[int, int], *, method: str = "bicubic", antialias: bool = False
) -> Array:
    """Resizes [..., H, W, C] to [..., size[0], size[1], C] like torch `F.interpolate` (NCHW there).

    Computed in float32 with exact matmul precision and cast back to the input dtype.
    """
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(resize_matrix(h, size[0], method, antialias))
    mw = jnp.asarray(resize_matrix(w, size[1], method, antialias))
    y = jnp.einsum(
        "oh,...hwc->...owc", mh, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    y = jnp.einsum("pw,...owc->...opc", mw, y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
