"""A small Harmon trained from scratch on the embedded shapes data, on CPU (the main job).

    python -m unified_mm.main --config configs/shapes_harmon.py --workdir runs/shapes_harmon
    python -m unified_mm.main --config configs/shapes_harmon.py:smoke --workdir /tmp/smoke

Same modules as the paper models at tiny sizes. No pretrained KL-16 VAE can be downloaded here, so
images are tokenised by a pixel-patch tokenizer (patch 8: a 32 px image is a 4x4 grid of 192-d
tokens); the LLM is a tiny Qwen2 from scratch with the shapes word-level tokenizer. The three
stages follow the paper's schedule: I aligns MAR with a frozen LLM at low resolution, II trains
everything but the tokenizer, III trains everything at a higher resolution (48 px, positional
embeddings interpolated from the learned 4x4 grid to 6x6).

Departures from the official settings, each measured on this CPU (numbers in README):
* The diffusion head uses the linear noise schedule. On 192-d pixel patches the cosine schedule's
  1/sqrt(alpha_bar) ~ 1e4 at t = T amplifies the young head's epsilon error: samples of a head
  trained 300 steps with an oracle condition reached values ~1e3 (cosine) against ~1 (linear),
  whose training loss was also half as large.
* The diffusion head predicts v, not epsilon (`diffusion_prediction="v"`, Salimans & Ho 2022).
  A 192-d patch token is readable from its own noisy copy at ~1/64 of the per-pixel SNR, and the
  epsilon loss weights x_0 errors by the SNR, so the noise levels where the prompt and the visible
  tokens decide a token carry almost no loss. The paired probe of eval/conditioning.py on the
  trained models (held-out pairs, EMA weights): epsilon, the loss moved by 0.0 % when captions
  were swapped between images and by 0.3 % when visible tokens were; v (with Stage II 1100 steps
  instead of 700), 0.4 % and 7.7 %.
* The sampler clips its predicted x_0 to the pixel range [-1, 1] (guided-diffusion's
  `clip_denoised`; MAR passes False because latents are unbounded). Overfitting four images for
  300 steps, the samples' pixel MSE fell from 0.99 to 0.30 with it (temperature 1.0): unclipped,
  single over-bright tokens were drawn as white squares.
* Understanding samples pack up to 6 question-answer turns about the same image into the
  static length (`data.qa_turns`; Harmon's layout is one turn), and the understanding gradient
  reaches the MAR encoder unscaled (`grad_scale` 1.0; the official 0.1 protects a pretrained
  encoder, and this one starts from scratch).
* EMA decay 0.99 (a run of ~1000 steps; the official 0.9999 would still be near initial weights).

Arguments (``:key=value,...``): ``smoke`` (a few steps, for tests).
"""

import ml_collections

from unified_mm.config.args import parse_arg
from unified_mm.config.base import base_config, stage
from unified_mm.data.config import default_data_config


def model_config(smoke: bool) -> ml_collections.ConfigDict:
    width = 64 if smoke else 128
    return ml_collections.ConfigDict(
        dict(
            tokenizer="pixel",
            pixel_patch=8,
            pixel_colour_cell=0,
            dtype="float32",
            remat=False,
            image_size=32,
            vae=dict(stride=8, scale=1.0),
            mar=dict(
                img_size=32,
                vae_stride=8,
                patch_size=1,
                seq_h=4,
                seq_w=4,
                vae_embed_dim=192,
                token_embed_dim=192,
                encoder_embed_dim=width,
                encoder_depth=2,
                encoder_num_heads=4,
                decoder_embed_dim=width,
                decoder_depth=2,
                decoder_num_heads=4,
                mlp_ratio=4.0,
                norm_eps=1e-6,
                buffer_size=4,
                class_num=1,
                label_drop_prob=0.1,
                mask_ratio_min=0.7,
                attn_dropout=0.0,
                proj_dropout=0.0,
                diffloss_d=2,
                diffloss_w=width * 2,
                diffloss_time_freq_dim=256,
                num_sampling_steps="20",
                train_diffusion_steps=1000,
                noise_schedule="linear",
                diffusion_prediction="v",
                clip_denoised=1.0,
                diffusion_batch_mul=4,
                learn_sigma=True,
                grad_checkpointing=False,
            ),
            llm=dict(
                model_type="qwen2",
                vocab_size=128,
                hidden_size=width,
                intermediate_size=width * 2,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=width // 4,
                rope_theta=1e6,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
            ),
            harmon=dict(vae_scale=1.0, grad_scale=1.0),
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, smoke=False)
    c = base_config()
    c.family = "harmon"
    c.seed = 0
    c.model = model_config(arg.smoke)
    c.data = default_data_config()
    c.data.max_text_len = 24
    c.data.max_und_len = 112

    lo, hi = 32, 48
    c.data.qa_turns = 6
    c.stage_order = ("align", "full", "hires")
    c.stages = ml_collections.ConfigDict(
        {
            # Stage I: MAR, diffusion head and projectors learn to talk to a frozen LLM.
            "align": stage(
                steps=2 if arg.smoke else 150,
                trainable=("mar_encoder", "mar_decoder", "diffloss", "projectors"),
                image_size=lo,
                task_batch={"i2t": 16, "t2i": 32},
                lr=1e-3,
                warmup_steps=1 if arg.smoke else 30,
                schedule="constant",
            ),
            # Stage II: everything but the (frozen) tokenizer.
            "full": stage(
                steps=2 if arg.smoke else 1100,
                trainable=("mar_encoder", "mar_decoder", "diffloss", "projectors", "llm"),
                image_size=lo,
                task_batch={"i2t": 32, "t2i": 32},
                lr=2e-3,
                warmup_steps=1 if arg.smoke else 30,
                schedule="cosine",
                min_lr_ratio=0.1,
            ),
            # Stage III: higher resolution (positional embeddings interpolated 4x4 -> 6x6).
            "hires": stage(
                steps=2 if arg.smoke else 150,
                trainable=("mar_encoder", "mar_decoder", "diffloss", "projectors", "llm"),
                image_size=hi,
                task_batch={"i2t": 16, "t2i": 16},
                lr=5e-4,
                warmup_steps=1 if arg.smoke else 20,
                schedule="cosine",
                min_lr_ratio=0.1,
            ),
        }
    )
    c.optimizer.weight_decay = 0.02
    c.optimizer.grad_clip = 1.0
    c.ema.decay = 0.0 if arg.smoke else 0.99
    c.checkpoint.every_steps = 2 if arg.smoke else 200
    c.checkpoint.keep_last = 2
    c.log_every_steps = 1 if arg.smoke else 50
    c.eval = ml_collections.ConfigDict(
        dict(
            preview_prompts=(
                "a red circle",
                "two blue squares",
                "a green triangle left of a yellow star",
            ),
            num_iter=4 if arg.smoke else 16,
            cfg=3.0,
            cfg_schedule="constant",
            temperature=1.0,
            geneval_prompts_per_category=2 if arg.smoke else 8,
            geneval_images_per_prompt=1 if arg.smoke else 2,
            vqa_questions=8 if arg.smoke else 300,
            image_size=0,  # 0: the stage's resolution
        )
    )
    return c
