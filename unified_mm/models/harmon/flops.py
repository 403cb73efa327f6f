"""Analytic FLOPs of Harmon's training steps and sampler (for MFU; XLA's cost analysis counts a
scanned layer once, so it cannot be used with stacked layers).

Convention (MaxText's): 2 FLOPs per multiply-add of every matmul that is actually executed
(including the static padding of the sparse encoder), attention scores and values included
(causal attention halved), training = 3 x forward (no remat recompute: model FLOPs, not hardware
FLOPs). Embedding gathers and norms are not counted.
"""

from __future__ import annotations

from unified_mm.models.harmon.conv_stem import conv_stem_pools
from unified_mm.models.harmon.harmon import HarmonConfig


def vit_block_flops(tokens: int, width: int, mlp: int) -> float:
    """One pre-LN ViT block over ``tokens`` rows (bidirectional attention)."""
    dense = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 4 * tokens * tokens * width
    return float(dense + attention)


def qwen2_layer_flops(tokens: int, cfg) -> float:
    """One Qwen2 decoder layer over ``tokens`` rows (causal attention: half the score matrix)."""
    h, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    )
    dense = 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
    attention = 4 * tokens * tokens * q / 2
    return float(dense + attention)


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


def _projectors(cfg: HarmonConfig, rows: int) -> float:
    de, h = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
    hin, hout = cfg.proj_in_hidden or h, cfg.proj_out_hidden or h
    return 2.0 * rows * (de * hin + hin * h + h * hout + hout * de)


def _llm(cfg: HarmonConfig, tokens: int) -> float:
    return cfg.llm.num_hidden_layers * qwen2_layer_flops(tokens, cfg.llm)


def t2i_forward_flops(cfg: HarmonConfig, *, image_size: int, text_len: int) -> float:
    """One text-to-image training example, forward only, as this implementation executes it."""
    h, w = cfg.latent_grid(image_size)
    seq = h * w
    nb = cfg.mar.buffer_size
    enc_rows = nb + cfg.mar.max_visible(seq)  # static padded visible set
    flops = _mar_encoder(cfg, enc_rows) + _projectors(cfg, enc_rows) + conv_stem_flops(cfg, seq)
    flops += _llm(cfg, text_len + enc_rows)
    flops += _mar_decoder(cfg, nb + seq)
    flops += cfg.mar.diffusion_batch_mul * seq * diffloss_row_flops(cfg)
    return flops


def i2t_forward_flops(cfg: HarmonConfig, *, image_size: int, und_len: int) -> float:
    """One image-to-text training example (full image visible), forward only."""
    h, w = cfg.latent_grid(image_size)
    rows = cfg.mar.buffer_size + h * w
    flops = _mar_encoder(cfg, rows) + _projectors(cfg, rows) + _llm(cfg, und_len)
    flops += conv_stem_flops(cfg, h * w)
    flops += 2.0 * und_len * cfg.llm.hidden_size * cfg.llm.vocab_size  # logits
    return flops


def training_flops_per_example(
    cfg: HarmonConfig, *, image_size: int, text_len: int, und_len: int
) -> dict[str, float]:
    return {
        "t2i": 3.0 * t2i_forward_flops(cfg, image_size=image_size, text_len=text_len),
        "i2t": 3.0 * i2t_forward_flops(cfg, image_size=image_size, und_len=und_len),
    }
