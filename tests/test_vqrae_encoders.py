"""Parity of the VQRAE vision encoders against transformers at random tiny weights (float32).

SigLIP (SiglipVisionModel) and DINOv2 with registers (Dinov2WithRegistersModel): last hidden state, an
intermediate layer, RAE's affine-free final LN, position-embedding interpolation at another size, the
big_vision .npz layout, and the torch-compatible resize kernels.
"""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.vqrae import encoder_convert as ec
from unified_mm.models.vqrae.dinov2 import Dinov2RegEncoder
from unified_mm.models.vqrae.resize import resize
from unified_mm.models.vqrae.siglip import SiglipVisionEncoder

torch = pytest.importorskip("torch", reason="torch references need the 'convert' extra")
F = torch.nn.functional

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

TOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, LayerNorm/LayerScale included, so affine mistakes show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs.detach().numpy()).max())


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def siglip():
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(hf_cfg).eval()
    _perturb(model, 1)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, hf_cfg, sd


def _ours_siglip(hf_cfg, sd, **kw):
    cfg = ec.encoder_config_from_hf(hf_cfg.to_dict(), **kw)
    enc = nnx.eval_shape(lambda: SiglipVisionEncoder(cfg, rngs=nnx.Rngs(0)))  # no random init
    ec.load_params(enc, ec.siglip_params_from_hf(sd, cfg))
    return enc


@pytest.mark.parity
def test_siglip_matches_transformers(siglip):
    model, hf_cfg, sd = siglip
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    # HF last_hidden_state: last block + post-LN with its affine.
    enc = _ours_siglip(hf_cfg, sd, final_ln_affine=True)
    d_last = _diff(enc(_nhwc(x)), out.last_hidden_state)
    # An intermediate layer, no final LN (LLaVA-style select layer).
    enc_mid = _ours_siglip(hf_cfg, sd, layer_index=1, final_ln=False)
    d_mid = _diff(enc_mid(_nhwc(x)), out.hidden_states[1])
    # RAE latent: last block, final LN without affine.
    enc_rae = _ours_siglip(hf_cfg, sd)
    ref = F.layer_norm(out.hidden_states[-1], (32,), eps=hf_cfg.layer_norm_eps)
    d_rae = _diff(enc_rae(_nhwc(x)), ref)
    print(f"SigLIP max abs diff: last {d_last:.2e}, layer1 {d_mid:.2e}, RAE-LN {d_rae:.2e}")
    assert max(d_last, d_mid, d_rae) <= TOL
    assert "final_norm" not in nnx.state(enc_rae, nnx.Param)  # affine really dropped


@pytest.mark.parity
def test_siglip_position_interpolation_matches_transformers(siglip):
    model, hf_cfg, sd = siglip
    x = torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, interpolate_pos_encoding=True).last_hidden_state
    enc = _ours_siglip(hf_cfg, sd, final_ln_affine=True)
    d = _diff(enc(_nhwc(x)), ref)
    print(f"SigLIP interpolated (16->24x20) max abs diff {d:.2e}")
    assert d <= TOL


def _to_big_vision(sd: dict, d: int, heads: int, n: int, scanned: bool) -> dict:
    """Writes the HF weights in big_vision's `params/img/...` layout (what the .npz files hold)."""
    hd = d // heads
    bv = {
        "params/img/embedding/kernel": sd["embeddings.patch_embedding.weight"].transpose(
            2, 3, 1, 0
        ),
        "params/img/embedding/bias": sd["embeddings.patch_embedding.bias"],
        "params/img/pos_embedding": sd["embeddings.position_embedding.weight"][None],
        "params/img/Transformer/encoder_norm/scale": sd["post_layernorm.weight"],
        "params/img/Transformer/encoder_norm/bias": sd["post_layernorm.bias"],
        "params/img/MAPHead_0/probe": np.zeros((1, 1, d), np.float32),  # ignored
    }
    per_layer = []
    for i in range(n):
        p = f"encoder.layers.{i}."
        blk = {
            "LayerNorm_0/scale": sd[p + "layer_norm1.weight"],
            "LayerNorm_0/bias": sd[p + "layer_norm1.bias"],
            "LayerNorm_1/scale": sd[p + "layer_norm2.weight"],
            "LayerNorm_1/bias": sd[p + "layer_norm2.bias"],
            "MlpBlock_0/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T,
            "MlpBlock_0/Dense_0/bias": sd[p + "mlp.fc1.bias"],
            "MlpBlock_0/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T,
            "MlpBlock_0/Dense_1/bias": sd[p + "mlp.fc2.bias"],
        }
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            w = sd[p + f"self_attn.{theirs}.weight"].T.reshape(d, heads, hd)
            blk[f"MultiHeadDotProductAttention_0/{ours}/kernel"] = w
            blk[f"MultiHeadDotProductAttention_0/{ours}/bias"] = sd[
                p + f"self_attn.{theirs}.bias"
            ].reshape(heads, hd)
        blk["MultiHeadDotProductAttention_0/out/kernel"] = sd[
            p + "self_attn.out_proj.weight"
        ].T.reshape(heads, hd, d)
        blk["MultiHeadDotProductAttention_0/out/bias"] = sd[p + "self_attn.out_proj.bias"]
        per_layer.append(blk)
    if scanned:
        for k in per_layer[0]:
            bv[f"params/img/Transformer/encoderblock/{k}"] = np.stack([b[k] for b in per_layer])
    else:
        for i, blk in enumerate(per_layer):
            for k, v in blk.items():
                bv[f"params/img/Transformer/encoderblock_{i}/{k}"] = v
    return bv


@pytest.mark.parity
@pytest.mark.parametrize("scanned", [False, True])
def test_siglip_big_vision_npz(siglip, tmp_path, scanned):
    model, hf_cfg, sd = siglip
    path = tmp_path / "siglip2.npz"
    np.savez(path, **_to_big_vision(sd, 32, 4, 2, scanned))
    cfg = ec.encoder_config_from_hf(hf_cfg.to_dict(), final_ln_affine=True)
    enc = nnx.eval_shape(lambda: SiglipVisionEncoder(cfg, rngs=nnx.Rngs(5)))
    ec.load_pretrained_encoder(enc, path, cfg)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x).last_hidden_state
    d = _diff(enc(_nhwc(x)), ref)
    print(f"SigLIP from big_vision npz (scanned={scanned}) max abs diff {d:.2e}")
    assert d <= TOL


@pytest.fixture(scope="module")
def dinov2():
    hf_cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=7,
        num_register_tokens=4,
    )
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(hf_cfg).eval()
    _perturb(model, 6)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # Real checkpoints on disk use the legacy names; exercise that path.
    legacy = {}
    for k, v in sd.items():
        k = re.sub(
            r"attention\.([qkv])_proj",
            lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)],
            k,
        )  # noqa: E501
        legacy[k.replace("attention.o_proj", "attention.output.dense")] = v
    return model, hf_cfg, legacy


def _ours_dino(hf_cfg, sd, **kw):
    cfg = ec.encoder_config_from_hf(hf_cfg.to_dict(), **kw)
    enc = nnx.eval_shape(lambda: Dinov2RegEncoder(cfg, rngs=nnx.Rngs(0)))
    ec.load_params(enc, ec.dinov2_params_from_hf(sd, cfg))
    return enc


@pytest.mark.parity
def test_dinov2_reg_matches_transformers(dinov2):
    model, hf_cfg, sd = dinov2
    assert any("attention.attention.query" in k for k in sd)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    enc = _ours_dino(hf_cfg, sd, final_ln_affine=True)
    d_last = _diff(enc(_nhwc(x), keep_prefix_tokens=True), out.last_hidden_state)
    enc_mid = _ours_dino(hf_cfg, sd, layer_index=1, final_ln=False)
    d_mid = _diff(enc_mid(_nhwc(x), keep_prefix_tokens=True), out.hidden_states[1])
    enc_rae = _ours_dino(hf_cfg, sd)  # RAE: last block, LN without affine, drop CLS + 4 registers
    ref = F.layer_norm(out.hidden_states[-1], (32,), eps=hf_cfg.layer_norm_eps)[:, 5:]
    z = enc_rae(_nhwc(x))
    d_rae = _diff(z, ref)
    print(f"DINOv2-reg max abs diff: last {d_last:.2e}, layer1 {d_mid:.2e}, RAE {d_rae:.2e}")
    assert z.shape == (2, 16, 32)
    assert max(d_last, d_mid, d_rae) <= TOL


@pytest.mark.parity
def test_dinov2_reg_position_interpolation_matches_transformers(dinov2):
    model, hf_cfg, sd = dinov2
    x = torch.randn(1, 3, 42, 35, generator=torch.Generator().manual_seed(8))  # grid 4x4 -> 6x5
    with torch.no_grad():
        ref = model(x).last_hidden_state
    enc = _ours_dino(hf_cfg, sd, final_ln_affine=True)
    d = _diff(enc(_nhwc(x), keep_prefix_tokens=True), ref)
    print(f"DINOv2-reg interpolated (28->42x35) max abs diff {d:.2e}")
    assert d <= TOL


def test_load_params_rejects_bad_checkpoints(siglip):
    _, hf_cfg, sd = siglip
    cfg = ec.encoder_config_from_hf(hf_cfg.to_dict())
    enc = nnx.eval_shape(lambda: SiglipVisionEncoder(cfg, rngs=nnx.Rngs(0)))
    params = ec.siglip_params_from_hf(sd, cfg)
    bad = dict(params, pos_embed=params["pos_embed"][:3])
    with pytest.raises(ValueError, match="pos_embed has shape"):
        ec.load_params(enc, bad)
    with pytest.raises(ValueError, match="missing"):
        ec.siglip_params_from_hf({k: v for k, v in sd.items() if "fc2" not in k}, cfg)
    deeper = dataclasses.replace(cfg, num_layers=3)
    with pytest.raises(ValueError, match="encoder.layers.2"):
        ec.siglip_params_from_hf(sd, deeper)


@pytest.mark.parametrize(
    "method,antialias,src,dst",
    [
        ("bicubic", False, (16, 16), (14, 9)),
        ("bicubic", True, (37, 37), (16, 16)),
        ("bicubic", True, (4, 4), (7, 5)),
        ("bilinear", False, (16, 12), (28, 28)),
    ],
)
def test_resize_matches_torch(method, antialias, src, dst):
    x = np.random.default_rng(0).normal(size=(2, 3, *src)).astype(np.float32)
    ref = F.interpolate(
        torch.tensor(x), size=dst, mode=method, align_corners=False, antialias=antialias
    ).numpy()
    ours = np.asarray(
        resize(jnp.asarray(x.transpose(0, 2, 3, 1)), dst, method=method, antialias=antialias)
    )
    assert np.abs(ours.transpose(0, 3, 1, 2) - ref).max() < 1e-5


def test_vqrae_load_pretrained_fills_encoder_and_teacher(siglip, tmp_path):
    from safetensors.numpy import save_file

    from unified_mm.models.vqrae.config import LossConfig, SimVQConfig, VQRAEConfig
    from unified_mm.models.vqrae.vqrae import VQRAE

    model_hf, hf_cfg, sd = siglip
    path = tmp_path / "model.safetensors"
    save_file({f"vision_model.{k}": np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    enc = ec.encoder_config_from_hf(hf_cfg.to_dict(), pretrained_path=str(path))
    cfg = VQRAEConfig(
        encoder=enc,
        quantizer=SimVQConfig(codebook_size=8, code_dim=32),
        loss=LossConfig(gan_weight=0.0, lpips_weight=0.0),
    )
    model = nnx.eval_shape(lambda: VQRAE(cfg, rngs=nnx.Rngs(0)))  # structure only
    model.load_pretrained()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = F.layer_norm(
            model_hf(x, output_hidden_states=True).hidden_states[-1], (32,), eps=1e-6
        )
    fwd = nnx.jit(lambda m, a: m(a))
    d_enc = _diff(fwd(model.encoder, _nhwc(x)), ref)
    d_teacher = _diff(fwd(model.teacher, _nhwc(x)), ref)
    print(f"VQRAE.load_pretrained: encoder {d_enc:.2e}, teacher {d_teacher:.2e}")
    assert max(d_enc, d_teacher) <= TOL
