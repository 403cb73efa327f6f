"""LPIPS-VGG forward against a torch reference built here from torch.nn layers at random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.vqrae.lpips import (
    load_lpips,
    lpips_params_from_torch,
    save_lpips_npz,
)

torch = pytest.importorskip("torch", reason="torch references need the 'convert' extra")
tnn = torch.nn

CHANNELS = (8, 12, 16, 16, 16)  # reduced VGG16 widths: same 13-conv / 4-pool topology
_CFG = [0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4]
_CFG_BLOCKS = [v for v in _CFG if v != "M"]


def _torch_vgg_features(channels):
    """torchvision.vgg16().features layout (indices 0..29) with the given block widths."""
    layers, c_in = [], 3
    for v in _CFG:
        if v == "M":
            layers.append(tnn.MaxPool2d(2, 2))
        else:
            layers += [tnn.Conv2d(c_in, channels[v], 3, padding=1), tnn.ReLU()]
            c_in = channels[v]
    return tnn.Sequential(*layers)


def _torch_lpips(features, lins, x, y):
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]

    def taps(t):
        t = (t - shift) / scale
        out = []
        for lo, hi in bounds:
            for i in range(lo, hi):
                t = features[i](t)
            out.append(t)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        total = total + lins[k]((a - b) ** 2).mean([2, 3], keepdim=True)
    return total.reshape(-1)


@pytest.mark.parity
def test_lpips_matches_torch_reference(tmp_path):
    torch.manual_seed(0)
    features = _torch_vgg_features(CHANNELS).eval()
    lins = [tnn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS]
    with torch.no_grad():
        for lin in lins:
            lin.weight.uniform_(0.0, 1.0)  # LPIPS heads are non-negative
    # State dicts in the torch `lpips` package layout: net.slice{s}.{idx}.* and lin{k}.model.1.weight.
    sd = {}
    slice_of = {
        i: s
        for s, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], 1)
        for i in range(lo, hi)
    }
    for k, v in features.state_dict().items():
        idx = int(k.split(".")[0])
        sd[f"net.slice{slice_of[idx]}.{k}"] = v.numpy()
    for k, lin in enumerate(lins):
        sd[f"lin{k}.model.1.weight"] = lin.weight.detach().numpy()
    sd["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)  # ignored buffer
    path = tmp_path / "lpips.npz"
    save_lpips_npz(path, lpips_params_from_torch(sd))
    ours = load_lpips(path, channels=CHANNELS)

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        ref = _torch_lpips(
            features,
            lins,
            torch.tensor(x.transpose(0, 3, 1, 2)),
            torch.tensor(y.transpose(0, 3, 1, 2)),
        ).numpy()
    fn = nnx.jit(lambda m, a, b: m(a, b))
    got = np.asarray(fn(ours, jnp.asarray(x), jnp.asarray(y)))
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"LPIPS vs torch reference: ours {got}, torch {ref}, max rel diff {rel:.2e}")
    assert rel < 1e-4
    assert np.allclose(np.asarray(fn(ours, jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)


def test_lpips_converter_with_taming_heads_and_torchvision_vgg():
    """taming's vgg.pth holds only the heads (lin{k}.model.1.weight); the VGG comes from torchvision."""
    vgg = {
        f"features.{k}": v.numpy() for k, v in _torch_vgg_features(CHANNELS).state_dict().items()
    }
    vgg["classifier.0.weight"] = np.zeros((2, 2), np.float32)  # ignored
    heads = {
        f"lin{k}.model.1.weight": np.ones((1, c, 1, 1), np.float32) for k, c in enumerate(CHANNELS)
    }
    out = lpips_params_from_torch(heads, vgg)
    assert sorted(k for k in out if k.startswith("lin")) == [f"lin{k}.weight" for k in range(5)]
    assert "features.28.weight" in out and "classifier.0.weight" not in out
    with pytest.raises(ValueError, match="missing"):
        lpips_params_from_torch(heads)


def test_vqrae_loads_full_vgg16_lpips_from_its_path(tmp_path):
    from unified_mm.models.vqrae.config import EncoderConfig, LossConfig, SimVQConfig, VQRAEConfig
    from unified_mm.models.vqrae.vqrae import VQRAE

    rng = np.random.default_rng(0)
    c_in, params = 3, {}
    for i, blk in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), _CFG_BLOCKS, strict=True):
        c_out = (64, 128, 256, 512, 512)[blk]
        params[f"features.{i}.weight"] = rng.normal(0, 0.05, (c_out, c_in, 3, 3)).astype(np.float32)
        params[f"features.{i}.bias"] = rng.normal(0, 0.05, (c_out,)).astype(np.float32)
        c_in = c_out
    for k, c in enumerate((64, 128, 256, 512, 512)):
        params[f"lin{k}.weight"] = rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
    path = tmp_path / "lpips_vgg16.npz"
    save_lpips_npz(path, params)
    enc = EncoderConfig(
        kind="vit",
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    )
    cfg = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=8, code_dim=32),
        loss=LossConfig(gan_weight=0.0, lpips_path=str(path)),
        with_teacher=False,
    )
    model = nnx.eval_shape(lambda: VQRAE(cfg, rngs=nnx.Rngs(0)))
    model.load_pretrained()
    np.testing.assert_array_equal(
        np.asarray(model.lpips.kernels[12][...]), params["features.28.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        np.asarray(model.lpips.lins[4][...]), params["lin4.weight"].reshape(-1)
    )
