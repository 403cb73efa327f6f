"""Analytic FLOPs of VQRAE's training steps, for MFU (XLA's cost analysis counts a ``lax.scan``-ned
layer once, and every ViT and LLM stack here is scanned).

Forward: the MaxText convention of ``models/flops_common.py`` (2 FLOPs per multiply-add of every
matmul and convolution the step runs, attention scores and values included, causal attention
halved; norms, softmax, elementwise ops and gathers not counted). Convolutions count the taps
that land on real input, as XLA does. Per-step work that does not grow with the batch (the SimVQ
codebook product C.W) is spread over the examples of one loss call.

Training: a step runs a part's forward once and its backward only where gradients flow, so each
part is counted ``passes`` times its forward:

* ``TRAINED`` (3): its parameters are trained (forward, input gradient, weight gradient), even
  where no input gradient is needed (a first layer, C.W): the MaxText / PaLM model-FLOPs rule;
* ``THROUGH`` (2): frozen, but the gradient of a trained part passes through it (forward, input
  gradient): LPIPS and the generator side of the discriminator;
* ``FORWARD`` (1): frozen and off the gradient path (behind ``stop_gradient`` or ``argmin``): the
  stage-1 encoder, the teacher, the tokenizer in the unified stage, the SimVQ distance matmul,
  the DINO discriminator backbone on the discriminator side.

Which parts run and how follows ``VQRAE.tokenizer_loss`` / ``encoder_pretrain_loss`` and the
unified ``t2i_loss`` / ``i2t_loss``: LPIPS only with weights configured, the discriminator only
with ``gan_weight > 0``; outputs the loss never uses (the t2i quantizer's ``proj_out``) are left
out, as XLA removes them. The adaptive GAN weight (two gradients with respect to the decoder
head, re-running LPIPS and the discriminator) runs only from ``gan_start_step`` on (a
``lax.cond``); ``gan_on`` says whether to count it. Not counted either: the spectral norm's power
iterations and position-table resizes (per call, independent of the batch, negligible).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from unified_mm.models.flops_common import (
    FORWARD,
    THROUGH,
    TRAINED,
    Part,
    conv2d_flops,
    dense_flops,
    qwen2_layer_flops,
    vit_block_flops,
)
from unified_mm.models.vqrae.config import DiscConfig, EncoderConfig, VQRAEConfig
from unified_mm.models.vqrae.discriminator import dino_backbone_config
from unified_mm.models.vqrae.lpips import CONV_BLOCK, VGG16_CHANNELS


# ----------------------------------------------------------------------------- modules (forward)
def encoder_flops(enc: EncoderConfig, *, layers: int | None = None) -> float:
    """The vision encoder on one image at its resolution: patch embedding and the blocks it runs
    (``layers_to_run``; DINOv2 adds CLS and register rows). The final LayerNorm is not counted."""
    n = enc.grid * enc.grid
    rows = n + (1 + enc.num_register_tokens if enc.kind == "dinov2_reg" else 0)
    layers = enc.layers_to_run if layers is None else layers
    embed = dense_flops(n, enc.patch_size**2 * 3, enc.hidden_size)
    return embed + layers * vit_block_flops(rows, enc.hidden_size, enc.mlp_dim)


def decoder_flops(cfg: VQRAEConfig) -> float:
    """The ViT decoder on one image's tokens: embed, blocks over CLS + tokens, pixel head."""
    enc, dec = cfg.encoder, cfg.decoder.resolved(cfg.encoder)
    n = enc.grid * enc.grid
    return (
        dense_flops(n, enc.hidden_size, dec.hidden_size)
        + dec.num_layers * vit_block_flops(n + 1, dec.hidden_size, dec.mlp_dim)
        + pixel_head_flops(cfg)
    )


def pixel_head_flops(cfg: VQRAEConfig) -> float:
    """The decoder's last linear layer (tokens -> q*q*3 pixels), the adaptive GAN weight's W."""
    dec = cfg.decoder.resolved(cfg.encoder)
    return dense_flops(cfg.encoder.grid**2, dec.hidden_size, dec.patch_size**2 * 3)


def lpips_flops(size: int) -> float:
    """LPIPS-VGG16 features of one ``size`` x ``size`` image (3x3 convs, padding 1, 2x2 pools)."""
    flops, side, c_in = 0.0, size, 3
    for j, block in enumerate(CONV_BLOCK):
        if j and block != CONV_BLOCK[j - 1]:
            side //= 2
        c_out = VGG16_CHANNELS[block]
        flops += conv2d_flops((side, side), 3, c_in, c_out, pad=(1, 1))
        c_in = c_out
    return flops


def discriminator_flops(disc: DiscConfig, size: int) -> tuple[float, float]:
    """(frozen backbone, trained heads) FLOPs on one ``size`` x ``size`` image.

    "dino": the bilinear resize to the DINO input (two interpolation matmuls) and every block of
    the frozen ViT count as backbone; the SN-conv heads on the patch tokens as heads. "patch": all
    of the PatchGAN is trained (4x4 convs, padding 1)."""
    if disc.kind == "dino":
        s = disc.dino_input_size
        resize = 0.0 if s == size else 2.0 * 3 * (s * size * size + s * s * size)
        bb = dino_backbone_config(disc)
        tokens = (s // disc.dino_patch_size) ** 2
        backbone = resize + encoder_flops(bb, layers=bb.num_layers)
        c, k = disc.dino_hidden_size, disc.head_kernel_size
        heads = len([d for d in disc.key_depths if d < disc.dino_num_layers]) + 1
        per_head = (
            dense_flops(tokens, c, c) + dense_flops(tokens, k * c, c) + dense_flops(tokens, c, 1)
        )
        return backbone, heads * per_head
    flops, side, c = 0.0, size, 3
    channels = [disc.patch_channels] + [
        disc.patch_channels * min(2**i, 8) for i in range(1, disc.patch_layers + 1)
    ]
    strides = [2] * disc.patch_layers + [1]
    for c_out, stride in [*zip(channels, strides, strict=True), (1, 1)]:
        flops += conv2d_flops((side, side), 4, c, c_out, stride=stride, pad=(1, 1))
        side = (side + 2 - 4) // stride + 1
        c = c_out
    return 0.0, flops


# ----------------------------------------------------------------------------- stages
def _quantizer_parts(cfg: VQRAEConfig, examples_per_call: int, *, trained: bool) -> list[Part]:
    enc, q = cfg.encoder, cfg.quantizer
    n, d, k, e = enc.grid**2, enc.hidden_size, q.codebook_size, q.code_dim
    passes = TRAINED if trained else FORWARD
    parts = [
        Part("quantizer.proj_in", dense_flops(n, d, e), passes),
        # C.W once per loss call; W is trained in the tokenizer stages
        Part("quantizer.codebook_product", dense_flops(k, e, e) / examples_per_call, passes),
        # the nearest-code search: argmin passes no gradient back
        Part("quantizer.distances", dense_flops(n, e, k), FORWARD),
    ]
    if trained:  # the unified stage uses the ids only; XLA drops proj_out there
        parts.append(Part("quantizer.proj_out", dense_flops(n, e, d), TRAINED))
    return parts


def tokenizer_parts(
    cfg: VQRAEConfig, *, distill: bool, gan_on: bool, examples_per_call: int
) -> list[Part]:
    """Tokenizer stage 1 (``distill=False``: encoder frozen) or 2 (encoder trained against the
    frozen teacher), per image, as ``VQRAE.tokenizer_loss`` runs it."""
    size = cfg.encoder.resolution
    parts = [Part("encoder", encoder_flops(cfg.encoder), TRAINED if distill else FORWARD)]
    if distill:
        parts.append(Part("teacher", encoder_flops(cfg.encoder), FORWARD))
    parts += _quantizer_parts(cfg, examples_per_call, trained=True)
    parts.append(Part("decoder", decoder_flops(cfg), TRAINED))
    loss = cfg.loss
    lpips = lpips_flops(size) if loss.lpips_weight > 0 and loss.lpips_path else 0.0
    if lpips:  # reconstruction and target in one batch
        parts.append(Part("lpips", 2 * lpips, THROUGH))
    if loss.gan_weight > 0:
        backbone, heads = discriminator_flops(loss.disc, size)
        parts += [
            # generator side: D's parameters behind stop_gradient, the gradient reaches recon
            Part("discriminator.generator_side", backbone + heads, THROUGH),
            # discriminator side: real and fake images, no gradient into the generator
            Part("discriminator.backbone", 2 * backbone, FORWARD),
            Part("discriminator.heads", 2 * heads, TRAINED),
        ]
        if gan_on and loss.adaptive_weight:
            # d rec / d W and d gan / d W: each runs the pixel head and its weight gradient, and
            # LPIPS (2 images) or D (1 image) forward and back to the pixels
            head = pixel_head_flops(cfg)
            adaptive = 4 * head + 2 * (2 * lpips) + 2 * (backbone + heads)
            parts.append(Part("gan.adaptive_weight", adaptive, FORWARD))
    return parts


def encoder_pretrain_parts(cfg: VQRAEConfig) -> list[Part]:
    """Stage 0 of the from-scratch "vit" encoder: encoder and per-token pixel head, both trained."""
    enc = cfg.encoder
    head = dense_flops(enc.grid**2, enc.hidden_size, enc.patch_size**2 * 3)
    return [Part("encoder", encoder_flops(enc), TRAINED), Part("pretrain_head", head, TRAINED)]


def _llm_parts(llm, tokens: int, logit_rows: int) -> list[Part]:
    return [
        Part("llm", llm.num_hidden_layers * qwen2_layer_flops(tokens, llm), TRAINED),
        Part("llm.logits", dense_flops(logit_rows, llm.hidden_size, llm.vocab_size), TRAINED),
    ]


def t2i_parts(cfg, *, text_len: int, examples_per_call: int) -> list[Part]:
    """Unified next-code prediction (``VQRAEUnified.t2i_loss``) on one example: the frozen
    tokenizer's codes, then the LLM over [text, <boi>, codes[:-1]] with logits on the code rows.
    ``cfg``: a ``UnifiedConfig``."""
    tok = cfg.tokenizer
    n = tok.encoder.grid**2
    return [
        Part("encoder", encoder_flops(tok.encoder), FORWARD),
        *_quantizer_parts(tok, examples_per_call, trained=False),
        *_llm_parts(cfg.llm, text_len + n, n),
    ]


def i2t_parts(cfg, *, und_len: int) -> list[Part]:
    """Unified understanding (``VQRAEUnified.i2t_loss``) on one example: frozen encoder, trained
    projector, the LLM over the prompt with logits on every row but the last."""
    tok, h = cfg.tokenizer, cfg.llm.hidden_size
    n, d = tok.encoder.grid**2, tok.encoder.hidden_size
    projector = dense_flops(n, d, h) + dense_flops(n, h, h)
    return [
        Part("encoder", encoder_flops(tok.encoder), FORWARD),
        Part("projector", projector, TRAINED),
        *_llm_parts(cfg.llm, und_len, und_len - 1),
    ]


def stage_parts(
    cfg,
    task: str,
    *,
    objective: str,
    distill: bool = False,
    gan_on: bool = True,
    text_len: int = 0,
    und_len: int = 0,
    examples_per_call: int = 1,
) -> list[Part]:
    """The parts one example of ``task`` runs in a stage with ``objective`` (``cfg``: a
    ``UnifiedConfig``; ``examples_per_call``: the task's rows per loss call, i.e. per micro-batch)."""
    if objective == "encoder_pretrain":
        return encoder_pretrain_parts(cfg.tokenizer)
    if objective == "tokenizer":
        return tokenizer_parts(
            cfg.tokenizer, distill=distill, gan_on=gan_on, examples_per_call=examples_per_call
        )
    if objective == "unified" and task == "t2i":
        return t2i_parts(cfg, text_len=text_len, examples_per_call=examples_per_call)
    if objective == "unified" and task == "i2t":
        return i2t_parts(cfg, und_len=und_len)
    raise ValueError(f"no FLOP model for task {task!r} under objective {objective!r}")


def training_flops_per_example(
    cfg,
    tasks: Iterable[str],
    *,
    objective: str,
    distill: bool = False,
    gan_on: bool = True,
    text_len: int = 0,
    und_len: int = 0,
    examples_per_call: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """``{task: training FLOPs per example}`` (forward and backward, see the module docstring)."""
    per_call = examples_per_call or {}
    return {
        t: sum(
            p.training
            for p in stage_parts(
                cfg,
                t,
                objective=objective,
                distill=distill,
                gan_on=gan_on,
                text_len=text_len,
                und_len=und_len,
                examples_per_call=max(int(per_call.get(t, 1)), 1),
            )
        )
        for t in tasks
    }
