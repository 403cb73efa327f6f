"""The paper Harmon configs (0.5B: Qwen2.5-0.5B + MAR-B; 1.5B: Qwen2.5-1.5B + MAR-H).

Architecture numbers are the official ones (harmon_mar.md 2.1, 1.1-1.3). Stage contents follow the
paper (I: LLM frozen at 256 px; II: everything but the VAE at 256 px; III: everything at 512 px on
curated data). Per-stage learning rates and batch sizes are not in the material we could read:
the values below are ASSUMPTIONS (marked), taken from the official fine-tuning example where it
exists (lr 1e-5, AdamW (0.9, 0.95), wd 0.02, clip 1.0, 1:4 understanding:generation).
``smoke`` shrinks widths and depths and swaps in the shapes data so the same stage table runs on CPU.
"""

from __future__ import annotations

import ml_collections

from unified_mm.config.base import base_config, stage
from unified_mm.data.config import default_data_config

KL16 = dict(
    ch=128,
    ch_mult=[1, 1, 2, 2, 4],
    num_res_blocks=2,
    z_channels=16,
    embed_dim=16,
    double_z=True,
    norm_num_groups=32,
    norm_eps=1e-6,
    in_channels=3,
    out_ch=3,
    dropout=0.0,
    encoder_attn_levels=[4],
    decoder_attn_levels=[],
    stride=16,
    scale=0.2325,
)

ARCH = {
    "0p5b": dict(
        mar=dict(
            encoder_embed_dim=768,
            encoder_depth=12,
            encoder_num_heads=12,
            decoder_embed_dim=768,
            decoder_depth=12,
            decoder_num_heads=12,
            diffloss_d=6,
            diffloss_w=1024,
        ),
        llm=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
        ),
    ),
    "1p5b": dict(
        mar=dict(
            encoder_embed_dim=1280,
            encoder_depth=20,
            encoder_num_heads=16,
            decoder_embed_dim=1280,
            decoder_depth=20,
            decoder_num_heads=16,
            diffloss_d=12,
            diffloss_w=1536,
        ),
        llm=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
        ),
    ),
}

SMOKE_ARCH = dict(
    mar=dict(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        diffloss_d=2,
        diffloss_w=64,
    ),
    llm=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
)


def model_config(size: str, smoke: bool) -> ml_collections.ConfigDict:
    arch = SMOKE_ARCH if smoke else ARCH[size]
    vae = dict(KL16)
    if smoke:
        vae.update(ch=8, norm_num_groups=4)
    mar = dict(
        img_size=256,
        vae_stride=16,
        patch_size=1,
        seq_h=16,
        seq_w=16,
        vae_embed_dim=16,
        token_embed_dim=16,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        buffer_size=4 if smoke else 64,
        class_num=1000,
        label_drop_prob=0.1,
        mask_ratio_min=0.7,
        attn_dropout=0.1,
        proj_dropout=0.1,
        diffloss_time_freq_dim=256,
        num_sampling_steps="100",
        train_diffusion_steps=1000,
        noise_schedule="cosine",
        diffusion_batch_mul=4,
        learn_sigma=True,
        grad_checkpointing=not smoke,
    )
    mar.update(arch["mar"])
    llm = dict(
        model_type="qwen2",
        vocab_size=512 if smoke else 151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    llm.update(arch["llm"])
    return ml_collections.ConfigDict(
        dict(
            tokenizer="kl16",
            pixel_patch=None,
            dtype="float32" if smoke else "bfloat16",  # bf16 compute, fp32 params and optimizer
            remat=not smoke,
            image_size=256,
            vae=vae,
            mar=mar,
            llm=llm,
            harmon=dict(vae_scale=0.2325),
            # Qwen2.5 ids (harmon_mar.md 2.7); replaced by the tokenizer's when one is loaded.
            fixture=dict(image_token_id=151665, pad_token_id=151645, eos_token_id=151645),
        )
    )


def harmon_paper_config(size: str, smoke: bool) -> ml_collections.ConfigDict:
    c = base_config()
    c.family = "harmon"
    c.model = model_config(size, smoke)
    c.data = default_data_config()
    if not smoke:
        # Real data: point these at TFDS / ArrayRecord sources and the Qwen2.5 tokenizer.json.
        c.data.tokenizer.kind = "hf"
        c.data.max_text_len = 128  # official generation prompt length
        c.data.max_und_len = 1024 + 64 + 256  # 512 px image span + prompt and answer
    else:
        c.data.max_text_len = 24
        c.data.max_und_len = 112
    c.init = ml_collections.ConfigDict(
        dict(
            # Official files to start from (harmon_mar.md 2.8); all optional.
            harmon_checkpoint="",  # harmon_0.5b.pth / harmon_1.5b.pth (full model)
            vae_checkpoint="",  # kl16.ckpt (ckpt["model"])
            llm_safetensors="",  # Qwen2.5-*-Instruct safetensors (file or directory)
        )
    )
    # FSDP over the fsdp axis; DCN (multi-slice) goes on data.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
    c.optimizer.update(dict(b1=0.9, b2=0.95, weight_decay=0.02, grad_clip=1.0))
    lo, hi = (64, 64) if smoke else (256, 512)
    steps = (2, 2, 2) if smoke else (100_000, 200_000, 50_000)  # ASSUMPTION: not in the material
    und, gen = (8, 8) if smoke else (256, 1024)  # ASSUMPTION: 1:4 as the fine-tuning example
    und_hi, gen_hi = (8, 8) if smoke else (128, 512)
    everything = ("mar_encoder", "mar_decoder", "diffloss", "projectors", "llm")
    c.stage_order = ("align", "full", "hires")
    c.stages = ml_collections.ConfigDict(
        {
            "align": stage(
                steps=steps[0],
                trainable=everything[:-1],
                image_size=lo,
                task_batch={"i2t": und, "t2i": gen},
                lr=1e-4,  # ASSUMPTION
                warmup_steps=1 if smoke else 2000,
                schedule="constant",
            ),
            "full": stage(
                steps=steps[1],
                trainable=everything,
                image_size=lo,
                task_batch={"i2t": und, "t2i": gen},
                lr=1e-4,  # ASSUMPTION
                warmup_steps=1 if smoke else 2000,
                schedule="cosine",
                min_lr_ratio=0.1,
            ),
            "hires": stage(
                steps=steps[2],
                trainable=everything,
                image_size=hi,
                task_batch={"i2t": und_hi, "t2i": gen_hi},
                lr=1e-5,
                warmup_steps=1 if smoke else 500,
                schedule="cosine",
            ),
        }
    )
    c.ema.decay = 0.0  # the official fine-tuning uses none
    c.checkpoint.every_steps = 2 if smoke else 1000
    c.log_every_steps = 1 if smoke else 50
    c.evaluate_after_each_stage = smoke
    c.eval = ml_collections.ConfigDict(
        dict(
            preview_prompts=() if smoke else ("a photo of a red apple on a wooden table",),
            num_iter=2 if smoke else 64,
            cfg=3.0,
            cfg_schedule="constant",
            temperature=1.0,
            geneval_prompts_per_category=1,
            geneval_images_per_prompt=1,
            vqa_questions=4,
            image_size=0,
        )
    )
    return c
