"""AdamW with the MAR/Harmon weight-decay mask, warm-up plus cosine or constant schedules."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from unified_mm.train.stages import StageSpec

# Paths are tuples of strings (module attribute names and parameter names).
DecayRule = Callable[[tuple[str, ...], jax.Array], bool]


def mar_weight_decay_rule(path: tuple[str, ...], value: jax.Array) -> bool:
    """MAR/Harmon ``add_weight_decay``: no decay for 1-D params, biases, or anything under diffloss.

    Everything else decays, including positional embeddings, mask_token, fake_latent and the
    LLM embeddings (harmon_mar.md 1.5 and pitfall 10). Stacked (scanned) layers carry a leading
    layer axis, so a per-layer 1-D parameter is 2-D here: the rule looks at the parameter name
    for biases and norm scales as well as at the rank.
    """
    name = path[-1] if path else ""
    if any("diffloss" in part for part in path):
        return False
    if name in ("bias", "scale") or name.endswith("_bias"):
        return False
    return jnp.ndim(value) > 1


def learning_rate_schedule(stage: StageSpec) -> optax.Schedule:
    """Linear warm-up from ``warmup_init_fraction * lr`` then constant or cosine to ``min_lr_ratio``."""
    lr = float(stage.lr)
    warmup = int(stage.warmup_steps)
    total = max(int(stage.steps), 1)
    if stage.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif stage.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            lr, decay_steps=max(total - warmup, 1), alpha=float(stage.min_lr_ratio)
        )
    else:  # validated earlier; kept as a guard for programmatic StageSpecs
        raise ValueError(f"stage {stage.name}: unknown schedule {stage.schedule!r}")
    if warmup <= 0:
        return after
    warm = optax.linear_schedule(lr * float(stage.warmup_init_fraction), lr, warmup)
    return optax.join_schedules([warm, after], [warmup])


def path_names(path) -> tuple[str, ...]:
    """A jax key path as plain strings, dropping NNX's ``value`` leaf wrapper."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(n for n in names if n != "value")


def make_optimizer(
    opt_cfg, stage: StageSpec, decay_rule: DecayRule
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW whose weight decay follows ``decay_rule``."""

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: bool(decay_rule(path_names(path), x)), params
        )

    chain = []
    if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
    chain.append(
        optax.adamw(
            learning_rate_schedule(stage),
            b1=float(opt_cfg.b1),
            b2=float(opt_cfg.b2),
            eps=float(opt_cfg.eps),
            weight_decay=float(opt_cfg.weight_decay),
            mask=decay_mask,
            mu_dtype=jnp.dtype(opt_cfg.mu_dtype),
        )
    )
    return optax.chain(*chain)
