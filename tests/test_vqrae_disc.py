"""Discriminator pieces: the DINO backbone against a torch reference (timm layout, key bias zeroed),
spectral normalisation, per-sample norm, DiffAug keying, and config parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.vqrae import encoder_convert as ec
from unified_mm.models.vqrae.config import DiscConfig, VQRAEConfig
from unified_mm.models.vqrae.discriminator import (
    DinoDiscriminator,
    SampleNorm,
    SNConv1d,
    diffaug,
)

torch = pytest.importorskip("torch", reason="torch references need the 'convert' extra")
tnn = torch.nn
F = torch.nn.functional

D, HEADS, LAYERS, PATCH, SIZE = 16, 2, 3, 8, 32


class _TorchBlock(tnn.Module):
    """RAE's SABlockNoDrop: fused qkv, LN eps 1e-6, tanh-GELU MLP (written here from torch.nn)."""

    def __init__(self):
        super().__init__()
        self.norm1 = tnn.LayerNorm(D, eps=1e-6)
        self.attn = tnn.Module()
        self.attn.qkv = tnn.Linear(D, 3 * D)
        self.attn.proj = tnn.Linear(D, D)
        self.norm2 = tnn.LayerNorm(D, eps=1e-6)
        self.mlp = tnn.Module()
        self.mlp.fc1 = tnn.Linear(D, 4 * D)
        self.mlp.fc2 = tnn.Linear(4 * D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            self.attn.qkv(self.norm1(x)).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        )
        a = torch.softmax(q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5, -1) @ v
        x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, D))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class _TorchDino(tnn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = tnn.Module()
        self.patch_embed.proj = tnn.Conv2d(3, D, PATCH, PATCH)
        self.cls_token = tnn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = tnn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2 + 1, D) * 0.1)
        self.blocks = tnn.ModuleList([_TorchBlock() for _ in range(LAYERS)])
        self.norm = tnn.LayerNorm(D, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x[:, 1:])
        return outs


def _cfg() -> DiscConfig:
    return DiscConfig(
        kind="dino",
        dino_input_size=SIZE,
        dino_patch_size=PATCH,
        dino_hidden_size=D,
        dino_num_layers=LAYERS,
        dino_num_heads=HEADS,
        dino_mlp_dim=4 * D,
        key_depths=(0, 1),
    )


@pytest.mark.parity
def test_dino_backbone_matches_torch_reference_with_key_bias_zeroed():
    torch.manual_seed(0)
    ref = _TorchDino().eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    disc = nnx.eval_shape(lambda: DinoDiscriminator(_cfg(), rngs=nnx.Rngs(0)))
    ec.load_params(disc.backbone, ec.dino_v1_params_from_timm(sd, disc.backbone.cfg))
    with torch.no_grad():  # RAE zeroes the key third of every qkv bias when it loads DINO
        for blk in ref.blocks:
            blk.attn.qkv.bias[D : 2 * D] = 0.0
        x = torch.randn(2, 3, SIZE, SIZE)
        want = ref(x)
    bb = disc.backbone
    got = nnx.jit(lambda m, a: m.blocks.outputs(m.embed(a), [1, 2, 3]))(
        bb, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    )
    diffs = [float(np.abs(np.asarray(g[:, 1:]) - w.numpy()).max()) for g, w in zip(got, want)]
    print(f"DINO discriminator backbone max abs diff per block: {diffs}")
    assert max(diffs) <= 1e-4
    assert float(np.abs(np.asarray(bb.blocks.blocks.attn.k.bias[...])).max()) == 0.0


def test_dino_discriminator_logits_shape():
    disc = DinoDiscriminator(_cfg(), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    x = jax.random.uniform(jax.random.key(1), (2, 24, 24, 3), minval=-1, maxval=1)  # resized to 32
    logits = nnx.jit(lambda m, a: m(a))(disc, x)
    assert logits.shape == (2, 3 * (SIZE // PATCH) ** 2)  # (2 key depths + final) heads x tokens
    assert np.isfinite(np.asarray(logits)).all()


def test_spectral_norm_and_sample_norm():
    conv = SNConv1d(6, 5, 3, iters=4, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    k = np.asarray(conv.kernel[...])
    w = k.transpose(2, 1, 0).reshape(5, -1)
    top = np.linalg.svd(w, compute_uv=False)[0]
    assert float(conv.sigma()) == pytest.approx(top, rel=2e-2)
    x = jax.random.normal(jax.random.key(1), (2, 7, 6))
    y = conv(x)
    assert y.shape == (2, 7, 5)
    # Circular padding: shifting the tokens circularly shifts the output.
    np.testing.assert_allclose(
        np.asarray(conv(jnp.roll(x, 2, axis=1))), np.asarray(jnp.roll(y, 2, axis=1)), atol=1e-5
    )
    norm = SampleNorm(5, eps=1e-6)
    z = np.asarray(norm(y))
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-5)  # per sample, per channel
    np.testing.assert_allclose(z.std(axis=1), 1.0, atol=1e-3)


def test_diffaug_is_keyed():
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    a = diffaug(x, jax.random.key(1))
    assert a.shape == x.shape and np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(diffaug(x, jax.random.key(1))))
    assert float(jnp.abs(a - diffaug(x, jax.random.key(2))).max()) > 1e-3
    assert float(jnp.abs(a - x).max()) > 1e-3


def test_config_from_dict():
    cfg = VQRAEConfig.from_dict(
        {
            "encoder": {
                "kind": "vit",
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "mlp_dim": 64,
                "image_mean": [0.5] * 3,
            },
            "quantizer": {"codebook_size": 64, "code_dim": 64, "legacy_beta_placement": True},
            "loss": {"pixel_loss": "l1", "disc": {"kind": "patch", "key_depths": [1, 2]}},
        }
    )
    assert cfg.encoder.image_mean == (0.5, 0.5, 0.5) and cfg.quantizer.legacy_beta_placement
    assert cfg.loss.disc.kind == "patch" and cfg.loss.disc.key_depths == (1, 2)
    assert cfg.decoder.resolved(cfg.encoder).hidden_size == 32
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        VQRAEConfig.from_dict({"encoder": {"bogus": 1}})
    with pytest.raises(ValueError, match="pixel_loss"):
        VQRAEConfig.from_dict({"loss": {"pixel_loss": "l3"}})
