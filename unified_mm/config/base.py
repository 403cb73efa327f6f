"""Trainer defaults shared by every experiment config (each config overrides what it needs)."""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes. FSDP shards the model width (ZeRO-3 style), tensor parallelism the
# feed-forward, heads and vocabulary; everything else is replicated.
DEFAULT_SHARDING_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("cond", "fsdp"),  # diffusion-head width (its other dim takes "mlp")
    ("codebook", None),
    ("latent", None),
    ("position", None),
    ("layers", None),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
)


def stage(**kwargs) -> ml_collections.ConfigDict:
    """One row of the stage table, with the trainer's defaults for omitted fields."""
    s = ml_collections.ConfigDict(
        dict(
            steps=100,
            trainable=(),
            image_size=256,
            task_batch=ml_collections.ConfigDict(),
            grad_accum=1,
            lr=1e-4,
            warmup_steps=0,
            warmup_init_fraction=0.0,
            schedule="constant",
            min_lr_ratio=0.0,
            loss_weights=ml_collections.ConfigDict(),
            options=ml_collections.ConfigDict(),
        )
    )
    for key, value in kwargs.items():
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        s[key] = value
    return s


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "harmon"
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_slices=1))
    c.sharding_rules = DEFAULT_SHARDING_RULES
    c.optimizer = ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.02, grad_clip=1.0, mu_dtype="float32")
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.0))
    c.stage_order = ()
    c.stages = ml_collections.ConfigDict()
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep_last=3, asynchronous=True))
    c.log_every_steps = 50
    c.preview_every_steps = 0  # 0: previews only at the end of each stage
    c.evaluate_after_each_stage = True
    c.eval = ml_collections.ConfigDict()
    c.max_consecutive_bad_steps = 5
    c.profile = ml_collections.ConfigDict(dict(first_step=0, num_steps=0))
    # Fault injection for the reliability tests (never set in real runs).
    c.faults = ml_collections.ConfigDict(
        dict(
            nan_loss_steps=(),
            nan_input_steps=(),
            inf_grad_steps=(),
            kill_at_step=-1,
            kill_during_save_at_step=-1,
            sigterm_at_step=-1,
        )
    )
    return c
