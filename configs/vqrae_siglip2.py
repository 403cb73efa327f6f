"""VQRAE with SigLIP2-so400m/16 (arXiv 2511.23386): 16384 x 1536 SimVQ codebook, symmetric ViT
decoder, two tokenizer stages and the unified AR stage, at the paper's sizes.

    python -m unified_mm.main --config configs/vqrae_siglip2.py --workdir gs://BUCKET/vqrae \
        --distributed \
        --config.model.tokenizer.encoder.pretrained_path=/path/to/siglip2-so400m-patch16-256/model.safetensors \
        --config.model.tokenizer.loss.lpips_path=/path/to/lpips_vgg.npz \
        --config.model.tokenizer.loss.disc.dino_path=/path/to/dino_vits8.safetensors \
        --config.data.tokenizer.path=/path/to/Qwen3-0.6B/tokenizer.json

    python -m unified_mm.main --config configs/vqrae_siglip2.py:smoke --workdir /tmp/vqrae_smoke

ASSUMPTIONS (vqrae_rae.md marks these open; RAE's recipe is the default): encoder layer = last
block after an affine-free final LayerNorm; beta on the commitment term; decoder mirrors the encoder
(27 x 1152); pixel L2 + LPIPS(1.0) + adaptive GAN(0.75) with RAE's frozen DINO-S/8 discriminator
starting at RAE's step counts; distillation weight 1.0; stage lengths, batch sizes and learning rates
are placeholders to be set per run (not recovered from the paper). The generation LLM follows the
paper's Qwen3-0.6B size with Qwen2 blocks (Qwen3's q/k norms are not implemented: ASSUMPTION).
"""

import ml_collections

from unified_mm.config.args import parse_arg
from unified_mm.config.base import base_config, stage
from unified_mm.data.config import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, smoke=False)
    smoke = arg.smoke
    c = base_config()
    c.family = "vqrae"
    if smoke:
        encoder = dict(
            kind="siglip2",
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            mlp_dim=64,
            hidden_act="gelu_tanh",
        )
        quant = dict(codebook_size=64, code_dim=48, beta=0.25)
        llm = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
        disc = dict(kind="patch")
    else:
        encoder = dict(
            kind="siglip2",
            image_size=256,
            patch_size=16,
            hidden_size=1152,
            num_layers=27,
            num_heads=16,
            mlp_dim=4304,
            hidden_act="gelu_tanh",
        )
        quant = dict(codebook_size=16384, code_dim=1536, beta=0.25)
        llm = dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        )
        disc = dict(kind="dino")
    encoder.update(
        layer_index=-1,
        final_ln=True,
        final_ln_affine=False,
        dtype="float32" if smoke else "bfloat16",
    )
    c.model = ml_collections.ConfigDict(
        dict(
            dtype="float32" if smoke else "bfloat16",
            tokenizer=dict(
                encoder=encoder,
                quantizer=quant,
                decoder=dict(),
                loss=dict(
                    pixel_loss="l2",
                    lpips_weight=1.0,
                    lpips_path=None,
                    gan_weight=0.75,
                    disc_start_step=4 if smoke else 15000,
                    gan_start_step=5 if smoke else 20000,
                    disc=disc,
                ),
                with_teacher=True,
            ),
            llm=dict(llm, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
            # Used only when no tokenizer.json is given (AOT compilation, benchmarks): the
            # Qwen text vocabulary with `<image>` appended.
            text_vocab_size=151670,
            image_token_id=151669,
        )
    )
    c.data = default_data_config()
    if not smoke:
        c.data.tokenizer.kind = "hf"
        c.data.max_text_len = 128
        c.data.max_und_len = 256 + 128
    else:
        c.data.max_text_len = 24
        c.data.max_und_len = 64
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
    res = 32 if smoke else 256
    steps = (2, 2, 2) if smoke else (150_000, 50_000, 200_000)  # ASSUMPTION
    batch = 8 if smoke else 512  # ASSUMPTION (RAE trains its decoder at 512)
    tok = ("quantizer", "decoder", "discriminator")
    c.stage_order = ("tokenizer", "distill", "unified")
    c.stages = ml_collections.ConfigDict(
        {
            "tokenizer": stage(
                steps=steps[0],
                trainable=tok,
                image_size=res,
                task_batch={"image": batch},
                lr=2e-4,
                warmup_steps=1 if smoke else 5000,
                schedule="cosine",
                options={"objective": "tokenizer", "distill": False},
            ),
            "distill": stage(
                steps=steps[1],
                trainable=("encoder",) + tok,
                image_size=res,
                task_batch={"image": batch},
                lr=2e-5,
                schedule="constant",
                options={"objective": "tokenizer", "distill": True},
            ),
            "unified": stage(
                steps=steps[2],
                trainable=("projector", "llm"),
                image_size=res,
                task_batch={"i2t": 8 if smoke else 256, "t2i": 8 if smoke else 768},
                lr=3e-4,
                warmup_steps=1 if smoke else 2000,
                schedule="cosine",
                options={"objective": "unified"},
            ),
        }
    )
    c.optimizer.update(dict(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0))
    c.ema.decay = 0.0 if smoke else 0.9999
    c.checkpoint.every_steps = 2 if smoke else 2000
    c.log_every_steps = 1 if smoke else 100
    c.evaluate_after_each_stage = smoke
    c.eval = ml_collections.ConfigDict(
        dict(
            recon_images=16,
            geneval_prompts_per_category=1,
            geneval_images_per_prompt=1,
            vqa_questions=4,
            temperature=1.0,
            top_k=0,
            cfg=2.0,
            image_size=0,
        )
    )
    return c
