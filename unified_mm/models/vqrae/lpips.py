"""LPIPS-VGG perceptual distance (Zhang et al.; the VQGAN/taming variant RAE uses, vqrae_rae.md 5.4).

VGG16 `features` (13 conv3x3 + ReLU, 4 max-pools) tapped after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3; inputs in [-1, 1] pass the ScalingLayer (shift -.030 -.088 -.188, scale .458 .448 .450); each
tap is unit-normalised over channels (eps 1e-10), the squared difference is weighted per channel by the
linear heads (1x1 conv, no bias; dropout inactive as in eval), averaged over space and summed over taps.

Weights are never trained (`Frozen` variables) and are loaded from a file the user gives.

Expected key layout of that file (.npz or .safetensors, torch layouts, float32):
    features.{i}.weight  [Cout, Cin, 3, 3]   i in 0 2 5 7 10 12 14 17 19 21 24 26 28 (torchvision idx)
    features.{i}.bias    [Cout]
    lin{k}.weight        [1, C_k, 1, 1]      k in 0..4
`lpips_params_from_torch` builds it from the torch `lpips` package state dict (`net.slice*.{i}.*`,
`lin{k}.model.{0|1}.weight`) or from taming's `vgg.pth` heads plus a torchvision vgg16 state dict
(`features.{i}.*`); `save_lpips_npz` writes it. Load the torch files with `torch.load(...,
weights_only=True)` and pass `{k: v.numpy()}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.vqrae.encoder_convert import read_weights
from unified_mm.models.vqrae.layers import Frozen

Array = jax.Array

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# (torchvision feature index of each conv, block it belongs to); blocks have 2, 2, 3, 3, 3 convs.
_CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_BLOCK = (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nnx.Module):
    def __init__(self, channels: Sequence[int] = VGG16_CHANNELS, *, rngs: nnx.Rngs | None = None):
        """Random He-normal weights with `rngs`, zeros without (then load real weights)."""
        self.channels = tuple(channels)
        kernels, biases = [], []
        c_in = 3
        for blk in CONV_BLOCK:
            c_out = self.channels[blk]
            shape = (3, 3, c_in, c_out)
            if rngs is None:
                w = jnp.zeros(shape)
            else:
                w = jax.random.normal(rngs.params(), shape) * (2.0 / (9 * c_in)) ** 0.5
            kernels.append(
                Frozen(w, out_sharding=("conv_height", "conv_width", "conv_in", "conv_out"))
            )
            biases.append(Frozen(jnp.zeros((c_out,)), out_sharding=("conv_out",)))
            c_in = c_out
        self.kernels = nnx.List(kernels)
        self.biases = nnx.List(biases)
        self.lins = nnx.List(
            [Frozen(jnp.full((c,), 1.0 / c), out_sharding=("conv_in",)) for c in self.channels]
        )

    def features(self, x: Array) -> list[Array]:
        taps = []
        for j, blk in enumerate(CONV_BLOCK):
            if j and blk != CONV_BLOCK[j - 1]:
                taps.append(x)
                x = jax.lax.reduce_window(
                    x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
            x = jax.lax.conv_general_dilated(
                x,
                self.kernels[j][...],
                (1, 1),
                ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            x = jax.nn.relu(x + self.biases[j][...])
        taps.append(x)
        return taps

    def __call__(self, x: Array, y: Array) -> Array:
        """Per-image LPIPS distance [B] between images in [-1, 1], NHWC."""
        b = x.shape[0]
        inp = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - _SHIFT) / _SCALE
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(self.features(inp)):
            # +1e-20 inside the sqrt keeps the gradient finite where a ReLU map is all zero.
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-20) + 1e-10)
            d = jnp.square(f[:b] - f[b:])
            total = total + jnp.mean(jnp.sum(d * self.lins[k][...], axis=-1), axis=(1, 2))
        return total


def lpips_params_from_torch(
    lpips_state_dict: Mapping[str, Any], vgg_state_dict: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """torch `lpips` / taming state dicts (+ torchvision vgg16) -> the canonical key layout above."""
    out: dict[str, np.ndarray] = {}
    for src in (vgg_state_dict or {}), lpips_state_dict:
        for k, v in src.items():
            v = np.asarray(v, np.float32)
            if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", k):
                out[f"features.{m[1]}.{m[2]}"] = v
            elif m := re.fullmatch(r"lin(\d)(?:\.model\.\d)?\.weight", k):
                out[f"lin{m[1]}.weight"] = v
    missing = [f"features.{i}.weight" for i in _CONV_IDX if f"features.{i}.weight" not in out]
    missing += [f"lin{k}.weight" for k in range(5) if f"lin{k}.weight" not in out]
    if missing:
        raise ValueError(f"LPIPS conversion: missing {missing} (taming's vgg.pth also needs vgg16)")
    return out


def save_lpips_npz(path: str | Path, params: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in params.items()})


def set_lpips_params(module: LPIPS, params: Mapping[str, np.ndarray]) -> None:
    """Writes canonical-layout weights into an LPIPS module (shapes checked)."""
    params = lpips_params_from_torch(params)
    for j, idx in enumerate(_CONV_IDX):
        w = params[f"features.{idx}.weight"].transpose(2, 3, 1, 0)
        if w.shape != module.kernels[j].shape:
            raise ValueError(f"LPIPS: features.{idx}.weight {w.shape} != {module.kernels[j].shape}")
        module.kernels[j].set_value(jnp.asarray(w))
        module.biases[j].set_value(jnp.asarray(params[f"features.{idx}.bias"]))
    for k in range(5):
        w = params[f"lin{k}.weight"].reshape(-1)
        if w.shape != module.lins[k].shape:
            raise ValueError(f"LPIPS: lin{k}.weight {w.shape} != {module.lins[k].shape}")
        module.lins[k].set_value(jnp.asarray(w))


def load_lpips(path: str | Path, *, channels: Sequence[int] = VGG16_CHANNELS) -> LPIPS:
    """An LPIPS module with weights from `path` (.npz or .safetensors in the layout above)."""
    module = LPIPS(channels)
    set_lpips_params(module, read_weights(path))
    return module
