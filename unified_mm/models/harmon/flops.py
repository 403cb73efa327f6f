"""Analytic FLOPs of Harmon's training steps and sampler (for MFU; XLA's cost analysis counts a
scanned layer once, so it cannot be used with stacked layers).

Convention (MaxText's): 2 FLOPs per multiply-add of every matmul that is actually executed
(including the static padding of the sparse encoder), attention scores and values included
(causal attention halved), training = 3 x forward (no remat recompute: model FLOPs, not hardware
FLOPs), except the frozen KL-16 VAE encoder, which sits behind stop_gradient and runs forward
only (1 x). Embedding gathers and norms are not counted. The shared layer counts live in
models/flops_common.py; tests/test_flops.py checks these models against XLA at depth 1.
"""

from __future__ import annotations

from unified_mm.models.flops_common import conv2d_flops, qwen2_layer_flops, vit_block_flops
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


def t2i_forward_flops(cfg: HarmonConfig, *, image_size: int, text_len: int) -> float:
    """One text-to-image training example, forward only, as this implementation executes it."""
    h, w = cfg.latent_grid(image_size)
    seq = h * w
    nb = cfg.mar.buffer_size
    enc_rows = nb + cfg.mar.max_visible(seq)  # static padded visible set
    flops = vae_encode_flops(cfg, image_size) + conv_stem_flops(cfg, seq)
    flops += _mar_encoder(cfg, enc_rows) + _projectors(cfg, enc_rows, out=True)
    flops += _llm(cfg, text_len + enc_rows)
    flops += _mar_decoder(cfg, nb + seq)
    flops += cfg.mar.diffusion_batch_mul * seq * diffloss_row_flops(cfg)
    return flops


def i2t_forward_flops(cfg: HarmonConfig, *, image_size: int, und_len: int) -> float:
    """One image-to-text training example (full image visible), forward only. The image rows
    enter the LLM through proj_in only; logits are taken on every position but the last."""
    h, w = cfg.latent_grid(image_size)
    rows = cfg.mar.buffer_size + h * w
    flops = vae_encode_flops(cfg, image_size) + conv_stem_flops(cfg, h * w)
    flops += _mar_encoder(cfg, rows) + _projectors(cfg, rows, out=False) + _llm(cfg, und_len)
    flops += 2.0 * (und_len - 1) * cfg.llm.hidden_size * cfg.llm.vocab_size  # logits
    return flops


def training_flops_per_example(
    cfg: HarmonConfig, *, image_size: int, text_len: int, und_len: int
) -> dict[str, float]:
    """``{task: training FLOPs per example}``: 3 x forward, the frozen VAE encoder once."""
    vae = vae_encode_flops(cfg, image_size)
    t2i = t2i_forward_flops(cfg, image_size=image_size, text_len=text_len)
    i2t = i2t_forward_flops(cfg, image_size=image_size, und_len=und_len)
    return {"t2i": 3.0 * (t2i - vae) + vae, "i2t": 3.0 * (i2t - vae) + vae}
