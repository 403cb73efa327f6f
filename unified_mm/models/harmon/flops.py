"""Analytic FLOPs of Harmon's training steps and sampler (for MFU; XLA's cost analysis counts a
scanned layer once, so it cannot be used with stacked layers).

Convention (MaxText's): 2 FLOPs per multiply-add of every matmul that is actually executed
(including the static padding of the sparse encoder), attention scores and values included
(causal attention halved). Training counts each part of the forward chain (VAE, MAR encoder,
proj_in, LLM, proj_out, MAR decoder, diffusion head) by the stage's trainable groups, the rule
models/vqrae/flops.py uses: 3 x its forward if it trains (input and weight gradients), 2 x if it
is frozen but a trainable part lies upstream (the input gradient passes through it: the frozen
LLM of Stage I), 1 x if nothing upstream trains (the frozen KL-16 VAE, behind stop_gradient).
No remat recompute: model FLOPs, not hardware FLOPs. Embedding gathers and norms are not
counted. The shared layer counts live in
models/flops_common.py; tests/test_flops.py checks these models against XLA at depth 1.
"""

from __future__ import annotations

from unified_mm.models.flops_common import (
    FORWARD,
    THROUGH,
    TRAINED,
    Part,
    conv2d_flops,
    qwen2_layer_flops,
    vit_block_flops,
)
from unified_mm.models.harmon.conv_stem import conv_stem_pools
from unified_mm.models.harmon.harmon import HarmonConfig


def diffloss_row_flops(cfg: HarmonConfig) -> float:
    """SimpleMLPAdaLN on one (x, t, c) row."""
    d = cfg.mar.diffloss
    w, c = d.width, d.token_dim
    per = 2 * (c * w + d.cond_dim * w + d.time_freq_dim * w + w * w)  # inputs, cond, time MLP
    per += d.depth * 2 * (w * 3 * w + 2 * w * w)  # adaLN modulation + 2-layer MLP per block
    per += 2 * (w * 2 * w + w * 2 * c)  # final adaLN + output
    return float(per)


def conv_stem_flops(cfg: HarmonConfig, tokens: int) -> float:
    """The optional conv stem (conv_stem.py) over the whole token grid (masked tokens included)."""
    m = cfg.mar
    if not m.conv_stem:
        return 0.0
    side, pools = m.conv_stem_patch, conv_stem_pools(m.conv_stem_patch)
    cin, flops = m.token_embed_dim // (side * side), 0.0
    for i, cout in enumerate(m.conv_stem):
        flops += 2.0 * 9 * cin * cout * side * side * tokens
        cin = cout
        if i < pools:
            side //= 2
    return flops


def vae_encode_flops(cfg: HarmonConfig, image_size: int) -> float:
    """The KL-16 VAE's encoder and quant_conv on one image (``AutoencoderKL.tokenize``); 0 for
    the parameter-free pixel tokenizer. Convolutions count their taps on real input (as XLA)."""
    v = cfg.vae
    if v is None:
        return 0.0
    side, ch = image_size, v.ch

    def conv(c_in: int, c_out: int, k: int, **kw) -> float:
        return conv2d_flops((side, side), k, c_in, c_out, **kw)

    def resnet(c_in: int, c_out: int) -> float:
        f = conv(c_in, c_out, 3, pad=(1, 1)) + conv(c_out, c_out, 3, pad=(1, 1))
        return f + (conv(c_in, c_out, 1) if c_in != c_out else 0.0)

    def attn(c: int) -> float:  # q, k, v, proj_out (1x1) and single-head scores and values
        return 4 * conv(c, c, 1) + 4.0 * (side * side) ** 2 * c

    flops = conv(v.in_channels, ch, 3, pad=(1, 1))
    block_in = ch
    for i, mult in enumerate(v.ch_mult):
        for _ in range(v.num_res_blocks):
            flops += resnet(block_in, ch * mult)
            block_in = ch * mult
            if i in v.encoder_attn_levels:
                flops += attn(block_in)
        if i != len(v.ch_mult) - 1:  # torch's (0, 1) pad, then a VALID stride-2 conv
            flops += conv(block_in, block_in, 3, stride=2, pad=(0, 1))
            side = (side + 1 - 3) // 2 + 1
    flops += 2 * resnet(block_in, block_in) + attn(block_in)  # mid
    z = 2 * v.z_channels if v.double_z else v.z_channels
    flops += conv(block_in, z, 3, pad=(1, 1))
    mult = 2 if v.use_variational else 1
    return flops + conv(2 * v.embed_dim, mult * v.embed_dim, 1)  # quant_conv


def _mar_encoder(cfg: HarmonConfig, rows: int) -> float:
    m = cfg.mar
    mlp = int(m.encoder_embed_dim * m.mlp_ratio)
    return (
        m.encoder_depth * vit_block_flops(rows, m.encoder_embed_dim, mlp)
        + 2.0 * rows * m.z_proj_in_dim * m.encoder_embed_dim
    )


def _mar_decoder(cfg: HarmonConfig, rows: int) -> float:
    m = cfg.mar
    mlp = int(m.decoder_embed_dim * m.mlp_ratio)
    return (
        m.decoder_depth * vit_block_flops(rows, m.decoder_embed_dim, mlp)
        + 2.0 * rows * m.encoder_embed_dim * m.decoder_embed_dim
    )


def _projectors(cfg: HarmonConfig, rows: int, *, out: bool) -> float:
    """proj_in (MAR -> LLM) and, where the LLM's image rows go back to the MAR, proj_out."""
    de, h = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
    hin, hout = cfg.proj_in_hidden or h, cfg.proj_out_hidden or h
    flops = 2.0 * rows * (de * hin + hin * h)
    if out:
        flops += 2.0 * rows * (h * hout + hout * de)
    return flops


def _llm(cfg: HarmonConfig, tokens: int) -> float:
    return cfg.llm.num_hidden_layers * qwen2_layer_flops(tokens, cfg.llm)


# Parameter groups (HarmonFamily.param_groups); the VAE never trains.
ALL_TRAINABLE: tuple[str, ...] = ("mar_encoder", "projectors", "llm", "mar_decoder", "diffloss")


def t2i_forward_parts(
    cfg: HarmonConfig, *, image_size: int, text_len: int
) -> list[tuple[str, float]]:
    """One text-to-image training example, forward only, as ``(group, FLOPs)`` in execution
    order (the order the gradient runs back through)."""
    h, w = cfg.latent_grid(image_size)
    seq = h * w
    nb = cfg.mar.buffer_size
    enc_rows = nb + cfg.mar.max_visible(seq)  # static padded visible set
    de, hidden = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
    hout = cfg.proj_out_hidden or hidden
    proj_out = 2.0 * enc_rows * (hidden * hout + hout * de)
    return [
        ("vae", vae_encode_flops(cfg, image_size)),
        ("mar_encoder", conv_stem_flops(cfg, seq) + _mar_encoder(cfg, enc_rows)),
        ("projectors", _projectors(cfg, enc_rows, out=True) - proj_out),
        ("llm", _llm(cfg, text_len + enc_rows)),
        ("projectors", proj_out),
        ("mar_decoder", _mar_decoder(cfg, nb + seq)),
        ("diffloss", cfg.mar.diffusion_batch_mul * seq * diffloss_row_flops(cfg)),
    ]


def i2t_forward_parts(
    cfg: HarmonConfig, *, image_size: int, und_len: int
) -> list[tuple[str, float]]:
    """One image-to-text training example (full image visible), forward only, as ``(group,
    FLOPs)`` in execution order. The image rows enter the LLM through proj_in only; logits (tied
    or not, LLM parameters) are taken only on the rows that can carry a label: every position
    but the last and the image span (``families.harmon.label_rows``)."""
    h, w = cfg.latent_grid(image_size)
    rows = cfg.mar.buffer_size + h * w
    logits = 2.0 * (und_len - 1 - rows) * cfg.llm.hidden_size * cfg.llm.vocab_size
    return [
        ("vae", vae_encode_flops(cfg, image_size)),
        ("mar_encoder", conv_stem_flops(cfg, h * w) + _mar_encoder(cfg, rows)),
        ("projectors", _projectors(cfg, rows, out=False)),
        ("llm", _llm(cfg, und_len) + logits),
    ]


def t2i_forward_flops(cfg: HarmonConfig, *, image_size: int, text_len: int) -> float:
    """One text-to-image training example, forward only."""
    return sum(f for _, f in t2i_forward_parts(cfg, image_size=image_size, text_len=text_len))


def i2t_forward_flops(cfg: HarmonConfig, *, image_size: int, und_len: int) -> float:
    """One image-to-text training example, forward only."""
    return sum(f for _, f in i2t_forward_parts(cfg, image_size=image_size, und_len=und_len))


def training_parts(parts: list[tuple[str, float]], trainable: tuple[str, ...]) -> list[Part]:
    """A forward chain's parts with their pass counts: a part trains if its group does; a frozen
    one carries the gradient back when any part before it trains (the module docstring's rule)."""
    out, upstream_trains = [], False
    for group, flops in parts:
        trains = group in trainable
        passes = TRAINED if trains else THROUGH if upstream_trains else FORWARD
        out.append(Part(group, flops, passes))
        upstream_trains = upstream_trains or trains
    return out


def training_flops_per_example(
    cfg: HarmonConfig,
    *,
    image_size: int,
    text_len: int,
    und_len: int,
    trainable: tuple[str, ...] = ALL_TRAINABLE,
) -> dict[str, float]:
    """``{task: training FLOPs per example}`` for a stage training the groups ``trainable``."""
    t2i = t2i_forward_parts(cfg, image_size=image_size, text_len=text_len)
    i2t = i2t_forward_parts(cfg, image_size=image_size, und_len=und_len)
    return {
        task: sum(p.training for p in training_parts(parts, trainable))
        for task, parts in (("t2i", t2i), ("i2t", i2t))
    }
