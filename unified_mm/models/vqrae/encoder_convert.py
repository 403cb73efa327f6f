"""Pretrained vision-encoder weights -> parameters of the NNX encoders.

Sources:
* Hugging Face safetensors of `SiglipVisionModel` / `SiglipModel` (SigLIP2 fixed-resolution checkpoints
  such as google/siglip2-so400m-patch16-256 use this layout; text tower and MAP head are ignored);
* big_vision `.npz` SigLIP2 checkpoints (`params/img/...`, per-block or scanned `encoderblock`);
* Hugging Face safetensors of `Dinov2WithRegistersModel`, in the on-disk (legacy `attention.attention.query`)
  or the transformers-5 in-memory (`attention.q_proj`) naming.

Conversion produces a flat `{"a/b/c": np.ndarray}` dict keyed by the module's parameter paths, with
per-layer tensors stacked on the leading "layers" axis; `load_params` checks names and shapes and writes
them into a module. torch layouts: Linear [out, in] -> kernel [in, out]; Conv OIHW -> HWIO.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.vqrae.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig

Params = dict[str, np.ndarray]

_BLOCK = "blocks/blocks"


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a .safetensors or .npz file into a flat {name: np.ndarray} dict."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    raise ValueError(
        f"unsupported weights format {path.suffix!r} for {path}; use .safetensors or .npz"
    )


def _strip_prefix(sd: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = np.asarray(v, dtype=np.float32)
    return out


def _stack(sd: Mapping[str, np.ndarray], fmt: str, n: int, fn: Callable[[np.ndarray], np.ndarray]):
    try:
        return np.stack([fn(sd[fmt.format(i=i)]) for i in range(n)])
    except KeyError as e:
        raise ValueError(f"checkpoint is missing {e.args[0]!r}") from None


def _t(w: np.ndarray) -> np.ndarray:
    return w.T


def _id(w: np.ndarray) -> np.ndarray:
    return w


def _get(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(f"checkpoint is missing {key!r}")
    return sd[key]


def _hf_block_params(sd, n, layer_fmt: str, names: Mapping[str, str]) -> Params:
    """Stacks per-layer HF tensors; `names` maps our sub-path -> HF sub-key (without .weight/.bias)."""
    out = {}
    for ours, theirs in names.items():
        is_linear = ours.startswith(("attn/", "mlp/"))
        w_ours = f"{_BLOCK}/{ours}/{'kernel' if is_linear else 'scale'}"
        out[w_ours] = _stack(sd, f"{layer_fmt}.{theirs}.weight", n, _t if is_linear else _id)
        out[f"{_BLOCK}/{ours}/bias"] = _stack(sd, f"{layer_fmt}.{theirs}.bias", n, _id)
    return out


def siglip_params_from_hf(state_dict: Mapping[str, Any], cfg: EncoderConfig) -> Params:
    """HF SiglipVisionModel / SiglipModel state dict -> SiglipVisionEncoder params."""
    sd = _strip_prefix(state_dict, ("vision_model.",))
    if _get(sd, "embeddings.patch_embedding.weight").ndim != 4:
        raise ValueError(
            "NaFlex SigLIP2 checkpoints (Siglip2Model, linear patch embedding) are not supported; "
            "use a fixed-resolution one such as google/siglip2-so400m-patch16-256"
        )
    n = cfg.num_layers
    out: Params = {
        "patch_embed/kernel": _get(sd, "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
        "patch_embed/bias": _get(sd, "embeddings.patch_embedding.bias"),
        "pos_embed": _get(sd, "embeddings.position_embedding.weight"),
    }
    names = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn/q": "self_attn.q_proj",
        "attn/k": "self_attn.k_proj",
        "attn/v": "self_attn.v_proj",
        "attn/o": "self_attn.out_proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }
    out |= _hf_block_params(sd, n, "encoder.layers.{i}", names)
    if cfg.final_ln_affine:
        out["final_norm/scale"] = _get(sd, "post_layernorm.weight")
        out["final_norm/bias"] = _get(sd, "post_layernorm.bias")
    return out


def siglip_params_from_big_vision(npz: Mapping[str, Any], cfg: EncoderConfig) -> Params:
    """big_vision SigLIP2 image tower (`params/img/...`) -> SiglipVisionEncoder params."""
    sd = _strip_prefix(npz, ("params/img/", "img/", "params/"))
    d, n = cfg.hidden_size, cfg.num_layers
    pos = _get(sd, "pos_embedding")
    out: Params = {
        "patch_embed/kernel": _get(sd, "embedding/kernel"),
        "patch_embed/bias": _get(sd, "embedding/bias"),
        "pos_embed": pos.reshape(-1, d),
    }
    scanned = any(k.startswith("Transformer/encoderblock/") for k in sd)

    def block(sub: str, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        if scanned:
            stacked = _get(sd, f"Transformer/encoderblock/{sub}")
            return np.stack([fn(stacked[i]) for i in range(n)])
        return _stack(sd, "Transformer/encoderblock_{i}/" + sub, n, fn)

    def to2d(w: np.ndarray) -> np.ndarray:
        """Flax MHA layout: (D, H, hd) -> (D, D); out (H, hd, D) -> (D, D); biases (H, hd) -> (D,)."""
        if w.ndim <= 2:
            return w.reshape(-1)
        return w.reshape(d, -1) if w.shape[0] == d and w.shape[-1] != d else w.reshape(-1, d)

    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
        out[f"{_BLOCK}/{ours}/scale"] = block(f"{theirs}/scale", _id)
        out[f"{_BLOCK}/{ours}/bias"] = block(f"{theirs}/bias", _id)
    mha = "MultiHeadDotProductAttention_0"
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
        out[f"{_BLOCK}/attn/{ours}/kernel"] = block(f"{mha}/{theirs}/kernel", to2d)
        out[f"{_BLOCK}/attn/{ours}/bias"] = block(f"{mha}/{theirs}/bias", to2d)
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[f"{_BLOCK}/mlp/{ours}/kernel"] = block(f"MlpBlock_0/{theirs}/kernel", _id)
        out[f"{_BLOCK}/mlp/{ours}/bias"] = block(f"MlpBlock_0/{theirs}/bias", _id)
    if cfg.final_ln_affine:
        out["final_norm/scale"] = _get(sd, "Transformer/encoder_norm/scale")
        out["final_norm/bias"] = _get(sd, "Transformer/encoder_norm/bias")
    return out


_DINO_V5_NAMES = (
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
)


def dinov2_params_from_hf(state_dict: Mapping[str, Any], cfg: EncoderConfig) -> Params:
    """HF Dinov2WithRegistersModel state dict (either naming) -> Dinov2RegEncoder params."""
    sd = _strip_prefix(state_dict, ("dinov2_with_registers.", "dinov2."))
    for pat, rep in _DINO_V5_NAMES:
        sd = {re.sub(pat, rep, k): v for k, v in sd.items()}
    if any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd):
        raise ValueError("DINOv2 checkpoints with a SwiGLU FFN (giant) are not supported")
    n, d = cfg.num_layers, cfg.hidden_size
    out: Params = {
        "patch_embed/kernel": _get(sd, "embeddings.patch_embeddings.projection.weight").transpose(
            2, 3, 1, 0
        ),
        "patch_embed/bias": _get(sd, "embeddings.patch_embeddings.projection.bias"),
        "cls_token": _get(sd, "embeddings.cls_token").reshape(d),
        "pos_embed": _get(sd, "embeddings.position_embeddings").reshape(-1, d),
        "register_tokens": _get(sd, "embeddings.register_tokens").reshape(-1, d)
        if cfg.num_register_tokens
        else np.zeros((0, d), np.float32),
    }
    names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn/q": "attention.attention.query",
        "attn/k": "attention.attention.key",
        "attn/v": "attention.attention.value",
        "attn/o": "attention.output.dense",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }
    out |= _hf_block_params(sd, n, "encoder.layer.{i}", names)
    if cfg.layerscale_value is not None:
        out[f"{_BLOCK}/ls1"] = _stack(sd, "encoder.layer.{i}.layer_scale1.lambda1", n, _id)
        out[f"{_BLOCK}/ls2"] = _stack(sd, "encoder.layer.{i}.layer_scale2.lambda1", n, _id)
    if cfg.final_ln_affine:
        out["final_norm/scale"] = _get(sd, "layernorm.weight")
        out["final_norm/bias"] = _get(sd, "layernorm.bias")
    return out


def dino_v1_params_from_timm(state_dict: Mapping[str, Any], cfg: EncoderConfig) -> Params:
    """DINO v1 ViT (timm layout, e.g. dino_vit_small_patch8_224.pth) -> the DINO discriminator backbone.

    The key part of every fused qkv bias is zeroed, as RAE does when it loads its discriminator.
    """
    sd = _strip_prefix(state_dict, ("module.", "backbone."))
    n, d = cfg.num_layers, cfg.hidden_size
    out: Params = {
        "patch_embed/kernel": _get(sd, "patch_embed.proj.weight").transpose(2, 3, 1, 0),
        "patch_embed/bias": _get(sd, "patch_embed.proj.bias"),
        "cls_token": _get(sd, "cls_token").reshape(d),
        "pos_embed": _get(sd, "pos_embed").reshape(-1, d),
        "register_tokens": np.zeros((0, d), np.float32),
    }
    qkv_w = _stack(sd, "blocks.{i}.attn.qkv.weight", n, _id)  # [L, 3D, D]
    qkv_b = _stack(sd, "blocks.{i}.attn.qkv.bias", n, _id).copy()  # [L, 3D]
    qkv_b[:, d : 2 * d] = 0.0
    for j, name in enumerate("qkv"):
        out[f"{_BLOCK}/attn/{name}/kernel"] = qkv_w[:, j * d : (j + 1) * d].transpose(0, 2, 1)
        out[f"{_BLOCK}/attn/{name}/bias"] = qkv_b[:, j * d : (j + 1) * d]
    names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn/o": "attn.proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }
    out |= _hf_block_params(sd, n, "blocks.{i}", names)
    return out


def encoder_params(state_dict: Mapping[str, Any], cfg: EncoderConfig) -> Params:
    """Dispatches on the encoder kind and on the checkpoint layout (HF vs big_vision)."""
    if cfg.kind == "dinov2_reg":
        return dinov2_params_from_hf(state_dict, cfg)
    if any("Transformer/encoderblock" in k for k in state_dict):
        return siglip_params_from_big_vision(state_dict, cfg)
    return siglip_params_from_hf(state_dict, cfg)


def load_params(
    module: nnx.Module, params: Mapping[str, np.ndarray], *, strict: bool = True
) -> None:
    """Writes flat `{"a/b": array}` params into the module's nnx.Param variables (names and shapes checked).

    With strict=False, module parameters absent from `params` keep their values (e.g. a fresh head).
    """
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    ours = {"/".join(str(p) for p in path): var for path, var in flat}
    unexpected = sorted(set(params) - set(ours))
    missing = sorted(set(ours) - set(params))
    if unexpected or (strict and missing):
        raise ValueError(f"load_params: missing {missing}, unexpected {unexpected}")
    for name, var in ours.items():
        if name not in params:
            continue
        value = np.asarray(params[name])
        if value.shape != var.shape:
            raise ValueError(f"load_params: {name} has shape {value.shape}, expected {var.shape}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    nnx.update(module, nnx.from_flat_state(flat))


def load_pretrained_encoder(module: nnx.Module, path: str | Path, cfg: EncoderConfig) -> None:
    """Reads a checkpoint file (.safetensors from HF, or a big_vision .npz) into an encoder module."""
    load_params(module, encoder_params(read_weights(path), cfg))


def encoder_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> EncoderConfig:
    """EncoderConfig from an HF config.json dict (SiglipConfig, SiglipVisionConfig or DINOv2-reg)."""
    c = dict(hf_config.get("vision_config", hf_config))
    model_type = hf_config.get("model_type", c.get("model_type", ""))
    if "dinov2" in model_type:
        if c.get("use_swiglu_ffn", False):
            raise ValueError("DINOv2 checkpoints with a SwiGLU FFN (giant) are not supported")
        d = c["hidden_size"]
        base = dict(
            kind="dinov2_reg",
            image_size=c["image_size"],
            patch_size=c["patch_size"],
            hidden_size=d,
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            mlp_dim=int(d * c.get("mlp_ratio", 4)),
            layer_norm_eps=c.get("layer_norm_eps", 1e-6),
            hidden_act="gelu" if c.get("hidden_act", "gelu") == "gelu" else "gelu_tanh",
            qkv_bias=c.get("qkv_bias", True),
            num_register_tokens=c.get("num_register_tokens", 4),
            layerscale_value=c.get("layerscale_value", 1.0),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    elif "siglip" in model_type or "patch_size" in c:
        act = c.get("hidden_act", "gelu_pytorch_tanh")
        base = dict(
            kind="siglip2",
            image_size=c["image_size"],
            patch_size=c["patch_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            mlp_dim=c["intermediate_size"],
            layer_norm_eps=c.get("layer_norm_eps", 1e-6),
            hidden_act="gelu_tanh" if "tanh" in act else "gelu",
        )
    else:
        raise ValueError(f"encoder_config_from_hf: unsupported model_type {model_type!r}")
    return EncoderConfig(**{**base, **overrides})
