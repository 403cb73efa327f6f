"""FID: the Frechet distance, the skip path, and the JAX Inception-v3 against a torch statement of
pytorch-fid's network at random weights in its key layout (the real weights are never downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

from unified_mm.eval import fid


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in fid.torch_state_shapes().items():
        if k.endswith("conv.weight"):
            sd[k] = (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
        elif k.endswith(("running_var", "bn.weight")):
            sd[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        else:
            sd[k] = (0.1 * rng.standard_normal(s)).astype(np.float32)
    sd["fc.weight"] = np.zeros((1008, 2048), np.float32)  # present in the real file, unused
    return sd


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 3))
    mu, sigma = fid.statistics(a)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # diagonal Gaussians: |m1 - m2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    m1, m2 = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    want = 1 + 4 + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want)
    # the low-rank feature path equals the covariance path
    f1 = rng.standard_normal((5, 8))
    f2 = rng.standard_normal((7, 8)) * 2 + 0.5
    ref = fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f2))
    assert fid.frechet_distance_from_features(f1, f2) == pytest.approx(ref, rel=1e-6)
    assert fid.frechet_distance_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_skipped_without_weights(tmp_path):
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    r = fid.maybe_fid(None, imgs, imgs)
    assert set(r) == {"skipped"} and "Inception" in r["skipped"]
    r = fid.maybe_fid(str(tmp_path / "nope.pth"), imgs, imgs)
    assert "does not exist" in r["skipped"]


def test_weights_file_validation(tmp_path):
    from safetensors.numpy import save_file

    sd = _random_state_dict()
    path = tmp_path / "inception.safetensors"
    save_file(sd, str(path))
    params = fid.params_from_state_dict(fid.load_weights(str(path)))
    assert params["Mixed_7c.branch_pool"]["w"].shape == (1, 1, 2048, 192)
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    sd["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="missing keys.*wrong shapes"):
        fid.params_from_state_dict(sd)


def _torch_features(sd: dict, x01: np.ndarray) -> np.ndarray:
    """pytorch-fid's InceptionV3 (FID blocks, pool3 output, no resize) written with torch ops."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def conv(x, name, stride=1, padding=0):
        y = F.conv2d(x, t[f"{name}.conv.weight"], stride=stride, padding=padding)
        y = F.batch_norm(
            y,
            t[f"{name}.bn.running_mean"],
            t[f"{name}.bn.running_var"],
            t[f"{name}.bn.weight"],
            t[f"{name}.bn.bias"],
            False,
            0.0,
            1e-3,
        )
        return F.relu(y)

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    x = torch.from_numpy(x01).permute(0, 3, 1, 2) * 2 - 1
    x = conv(x, "Conv2d_1a_3x3", 2)
    x = conv(x, "Conv2d_2a_3x3")
    x = conv(x, "Conv2d_2b_3x3", padding=1)
    x = F.max_pool2d(x, 3, 2)
    x = conv(x, "Conv2d_3b_1x1")
    x = conv(x, "Conv2d_4a_3x3")
    x = F.max_pool2d(x, 3, 2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat(
            [
                conv(x, f"{n}.branch1x1"),
                conv(conv(x, f"{n}.branch5x5_1"), f"{n}.branch5x5_2", padding=2),
                conv(
                    conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1),
                    f"{n}.branch3x3dbl_3",
                    padding=1,
                ),
                conv(avg(x), f"{n}.branch_pool"),
            ],
            1,
        )
    n = "Mixed_6a"
    x = torch.cat(
        [
            conv(x, f"{n}.branch3x3", 2),
            conv(
                conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1),
                f"{n}.branch3x3dbl_3",
                2,
            ),
            F.max_pool2d(x, 3, 2),
        ],
        1,
    )
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = conv(x, f"{n}.branch7x7_1")
        b7 = conv(b7, f"{n}.branch7x7_2", padding=(0, 3))
        b7 = conv(b7, f"{n}.branch7x7_3", padding=(3, 0))
        bd = conv(x, f"{n}.branch7x7dbl_1")
        for i, pad in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
            bd = conv(bd, f"{n}.branch7x7dbl_{i}", padding=pad)
        x = torch.cat([conv(x, f"{n}.branch1x1"), b7, bd, conv(avg(x), f"{n}.branch_pool")], 1)
    n = "Mixed_7a"
    b3 = conv(conv(x, f"{n}.branch3x3_1"), f"{n}.branch3x3_2", 2)
    b7 = conv(x, f"{n}.branch7x7x3_1")
    b7 = conv(b7, f"{n}.branch7x7x3_2", padding=(0, 3))
    b7 = conv(b7, f"{n}.branch7x7x3_3", padding=(3, 0))
    b7 = conv(b7, f"{n}.branch7x7x3_4", 2)
    x = torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)
    for n, use_max in (("Mixed_7b", False), ("Mixed_7c", True)):
        b3 = conv(x, f"{n}.branch3x3_1")
        b3 = torch.cat(
            [
                conv(b3, f"{n}.branch3x3_2a", padding=(0, 1)),
                conv(b3, f"{n}.branch3x3_2b", padding=(1, 0)),
            ],
            1,
        )
        bd = conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1)
        bd = torch.cat(
            [
                conv(bd, f"{n}.branch3x3dbl_3a", padding=(0, 1)),
                conv(bd, f"{n}.branch3x3dbl_3b", padding=(1, 0)),
            ],
            1,
        )
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if use_max else avg(x)
        x = torch.cat([conv(x, f"{n}.branch1x1"), b3, bd, conv(pooled, f"{n}.branch_pool")], 1)
    return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()


def test_inception_matches_torch_statement():
    torch = pytest.importorskip("torch", reason="torch (the convert extra) is the reference")
    import torch.nn.functional as F

    sd = _random_state_dict(1)
    params = fid.params_from_state_dict(sd)
    x = np.random.default_rng(2).uniform(0, 1, (2, 83, 83, 3)).astype(np.float32)
    got = np.asarray(fid.inception_features(params, x, resize=False))
    want = _torch_features(sd, x)
    assert got.shape == (2, fid.FEATURE_DIM)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    # the input resize: bilinear with half-pixel centres, as F.interpolate(align_corners=False)
    import jax

    small = x[:, :32, :32]
    up = np.asarray(jax.image.resize(small, (2, 299, 299, 3), "bilinear", antialias=False))
    ref = (
        F.interpolate(
            torch.from_numpy(small).permute(0, 3, 1, 2),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(up, ref, atol=1e-5)


def test_fid_of_identical_sets_is_zero(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file(_random_state_dict(3), str(path))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    r = fid.maybe_fid(str(path), a, a)
    assert r["images"] == 4 and abs(r["fid"]) < 1e-3
    assert fid.fid(str(path), a, b) > 1e-3
