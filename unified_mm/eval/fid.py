"""FID with the TF-ported Inception-v3 of pytorch-fid, in JAX, from a user-given weights file.

Nothing is downloaded: the user passes the pytorch-fid weights (`pt_inception-2015-12-05-*.pth`,
torchvision key layout) or a `.safetensors` / `.npz` conversion of them
(`python -m unified_mm.eval.fid convert IN.pth OUT.safetensors`). Without a file the metric is
skipped with a message (`maybe_fid`), never estimated some other way.

The network is pytorch-fid's `InceptionV3` up to the final average pool (2048-d): input in [0, 1]
resized to 299 x 299 (bilinear, half-pixel centres, no antialiasing: `F.interpolate(...,
align_corners=False)`), scaled to [-1, 1]; BasicConv2d = conv (no bias) + BatchNorm(eps 1e-3, folded)
+ ReLU; the FID variants of the mixed blocks: average pools exclude the padding
(`count_include_pad=False`) and the last block pools with a 3x3 max pool.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3
FEATURE_DIM = 2048


# (name, in, out, kh, kw) of every BasicConv2d, in the torchvision / pytorch-fid key layout.
def _conv_table() -> list[tuple[str, int, int, int, int]]:
    t = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        t += [
            (f"{name}.branch1x1", cin, 64, 1, 1),
            (f"{name}.branch5x5_1", cin, 48, 1, 1),
            (f"{name}.branch5x5_2", 48, 64, 5, 5),
            (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", cin, pool, 1, 1),
        ]
    t += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        t += [
            (f"{name}.branch1x1", 768, 192, 1, 1),
            (f"{name}.branch7x7_1", 768, c7, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7),
            (f"{name}.branch7x7_3", c7, 192, 7, 1),
            (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{name}.branch_pool", 768, 192, 1, 1),
        ]
    t += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        t += [
            (f"{name}.branch1x1", cin, 320, 1, 1),
            (f"{name}.branch3x3_1", cin, 384, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3),
            (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", cin, 192, 1, 1),
        ]
    return t


CONV_TABLE = tuple(_conv_table())
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def torch_state_shapes() -> dict[str, tuple[int, ...]]:
    """Every key the network reads and its torch shape (the classifier `fc.*` is not read)."""
    out = {}
    for name, cin, cout, kh, kw in CONV_TABLE:
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in _BN_LEAVES:
            out[f"{name}.bn.{leaf}"] = (cout,)
    return out


def params_from_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, jax.Array]]:
    """{conv name: {"w": HWIO kernel, "scale", "shift"}} with BatchNorm folded (float32)."""
    want = torch_state_shapes()
    missing = sorted(k for k in want if k not in sd)
    bad = sorted(
        f"{k} {tuple(np.shape(sd[k]))} (expected {s})"
        for k, s in want.items()
        if k in sd and tuple(np.shape(sd[k])) != s
    )
    if missing or bad:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {missing[:3]})")
        if bad:
            problems.append(f"wrong shapes {bad[:3]}")
        raise ValueError("not pytorch-fid Inception-v3 weights: " + "; ".join(problems))
    params = {}
    for name, *_ in CONV_TABLE:
        w = np.asarray(sd[f"{name}.conv.weight"], np.float64)
        g, b, m, v = (np.asarray(sd[f"{name}.bn.{leaf}"], np.float64) for leaf in _BN_LEAVES)
        scale = g / np.sqrt(v + BN_EPS)
        params[name] = {
            "w": jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32),
            "scale": jnp.asarray(scale, jnp.float32),
            "shift": jnp.asarray(b - m * scale, jnp.float32),
        }
    return params


def load_weights(path: str) -> dict[str, np.ndarray]:
    """The weights file as a flat dict: `.pth`/`.pt` (torch, weights_only), `.safetensors`, `.npz`."""
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from unified_mm.models.harmon.convert import load_torch_file

    return load_torch_file(path)


# ------------------------------------------------------------------------------------------------
# The network


def _conv(p, x, name: str, stride: int = 1, same: bool = True) -> jax.Array:
    w = p[name]["w"]
    kh, kw = w.shape[:2]
    pad = [((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2] if same else [(0, 0), (0, 0)]
    y = jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jax.nn.relu(y * p[name]["scale"] + p[name]["shift"])


def _max_pool(x, stride: int, pad: int = 0) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding
    )


def _avg_pool_exclude_pad(x) -> jax.Array:
    """3x3 stride-1 average over the in-image taps only (TF's pool, count_include_pad=False)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return total / count


def _block_a(p, x, n):
    b1 = _conv(p, x, f"{n}.branch1x1")
    b5 = _conv(p, _conv(p, x, f"{n}.branch5x5_1"), f"{n}.branch5x5_2")
    b3 = _conv(
        p,
        _conv(p, _conv(p, x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2"),
        f"{n}.branch3x3dbl_3",
    )
    bp = _conv(p, _avg_pool_exclude_pad(x), f"{n}.branch_pool")
    return jnp.concatenate([b1, b5, b3, bp], -1)


def _block_b(p, x, n):
    b3 = _conv(p, x, f"{n}.branch3x3", 2, same=False)
    bd = _conv(p, _conv(p, x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2")
    bd = _conv(p, bd, f"{n}.branch3x3dbl_3", 2, same=False)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], -1)


def _block_c(p, x, n):
    b1 = _conv(p, x, f"{n}.branch1x1")
    b7 = x
    for i in (1, 2, 3):
        b7 = _conv(p, b7, f"{n}.branch7x7_{i}")
    bd = x
    for i in (1, 2, 3, 4, 5):
        bd = _conv(p, bd, f"{n}.branch7x7dbl_{i}")
    bp = _conv(p, _avg_pool_exclude_pad(x), f"{n}.branch_pool")
    return jnp.concatenate([b1, b7, bd, bp], -1)


def _block_d(p, x, n):
    b3 = _conv(p, _conv(p, x, f"{n}.branch3x3_1"), f"{n}.branch3x3_2", 2, same=False)
    b7 = x
    for i in (1, 2, 3):
        b7 = _conv(p, b7, f"{n}.branch7x7x3_{i}")
    b7 = _conv(p, b7, f"{n}.branch7x7x3_4", 2, same=False)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], -1)


def _block_e(p, x, n, max_pool: bool):
    b1 = _conv(p, x, f"{n}.branch1x1")
    b3 = _conv(p, x, f"{n}.branch3x3_1")
    b3 = jnp.concatenate([_conv(p, b3, f"{n}.branch3x3_2a"), _conv(p, b3, f"{n}.branch3x3_2b")], -1)
    bd = _conv(p, _conv(p, x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2")
    bd = jnp.concatenate(
        [_conv(p, bd, f"{n}.branch3x3dbl_3a"), _conv(p, bd, f"{n}.branch3x3dbl_3b")], -1
    )
    pooled = _max_pool(x, 1, pad=1) if max_pool else _avg_pool_exclude_pad(x)
    bp = _conv(p, pooled, f"{n}.branch_pool")
    return jnp.concatenate([b1, b3, bd, bp], -1)


@functools.partial(jax.jit, static_argnames=("resize",))
def inception_features(params, images01: jax.Array, resize: bool = True) -> jax.Array:
    """[N, H, W, 3] images in [0, 1] -> [N, 2048] pool features."""
    x = images01.astype(jnp.float32)
    if resize:
        x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
    x = 2.0 * x - 1.0
    x = _conv(params, x, "Conv2d_1a_3x3", 2, same=False)
    x = _conv(params, x, "Conv2d_2a_3x3", same=False)
    x = _conv(params, x, "Conv2d_2b_3x3")
    x = _max_pool(x, 2)
    x = _conv(params, x, "Conv2d_3b_1x1")
    x = _conv(params, x, "Conv2d_4a_3x3", same=False)
    x = _max_pool(x, 2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(params, x, n)
    x = _block_b(params, x, "Mixed_6a")
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(params, x, n)
    x = _block_d(params, x, "Mixed_7a")
    x = _block_e(params, x, "Mixed_7b", max_pool=False)
    x = _block_e(params, x, "Mixed_7c", max_pool=True)
    return jnp.mean(x, axis=(1, 2))


# ------------------------------------------------------------------------------------------------
# Statistics


def activations(
    params, images_uint8: Sequence[np.ndarray] | np.ndarray, batch_size: int = 50
) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"FID expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}"
        )
    feats = []
    for s in range(0, len(images), batch_size):
        chunk = images[s : s + batch_size]
        n = len(chunk)
        if n < batch_size and len(images) > batch_size:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        x = chunk.astype(np.float32) / 255.0
        feats.append(np.asarray(inception_features(params, x), np.float64)[:n])
    return np.concatenate(feats)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)) with two symmetric
    eigendecompositions (the same eigenvalues as S1 S2, which are real and >= 0 for PSD inputs):
    exact like pytorch-fid's `scipy.linalg.sqrtm`, much faster at 2048-d and stable for the
    singular covariances of small sample sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """The same distance from two feature sets, exact and cheap when a set is smaller than the
    feature dimension: with A_i = centred features / sqrt(n_i - 1), S_i = A_i^T A_i and the
    nonzero eigenvalues of S1 S2 are the squared singular values of A1 A2^T, so
    tr((S1 S2)^(1/2)) is the nuclear norm of that n1 x n2 matrix."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*statistics(f1), *statistics(f2))
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuclear = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * nuclear)


@functools.lru_cache(maxsize=2)
def _cached_params(path: str):
    return params_from_state_dict(load_weights(path))


def fid(weights_path: str, real: np.ndarray, fake: np.ndarray, batch_size: int = 50) -> float:
    """FID between two uint8 image sets (each needs >= 2 images)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            f"FID needs >= 2 images per set, got {len(real)} real and {len(fake)} fake"
        )
    params = _cached_params(os.path.abspath(weights_path))
    return frechet_distance_from_features(
        activations(params, real, batch_size), activations(params, fake, batch_size)
    )


def maybe_fid(weights_path: str | None, real: np.ndarray, fake: np.ndarray) -> dict:
    """{"fid", "images"} or {"skipped": reason} when no weights file is configured / found."""
    if not weights_path:
        return {
            "skipped": "no Inception-v3 weights given (config.eval.fid_inception_path / --fid-inception)"
        }
    if not os.path.isfile(weights_path):
        return {"skipped": f"Inception-v3 weights file {weights_path} does not exist"}
    return {"fid": fid(weights_path, real, fake), "images": int(min(len(real), len(fake)))}


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.eval.fid",
        description="Convert pytorch-fid Inception-v3 weights (.pth) to .safetensors for FID here.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="IN.pth -> OUT.safetensors (needs torch)")
    conv.add_argument("src")
    conv.add_argument("dst")
    args = ap.parse_args(argv)
    try:
        sd = load_weights(args.src)
        params_from_state_dict(sd)  # validates the layout
        from safetensors.numpy import save_file

        keep = torch_state_shapes()
        save_file({k: np.ascontiguousarray(sd[k], np.float32) for k in keep}, args.dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
