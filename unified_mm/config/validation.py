"""Whole-config validation, run before anything compiles: one clear line per impossible value."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections

from unified_mm.parallel.mesh import data_parallel_size
from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec, validate_stages


class ConfigError(ValueError):
    """A configuration value that cannot work."""


def validate_config(
    config: ml_collections.ConfigDict,
    family: ModelFamily,
    stages: Sequence[StageSpec],
    mesh: jax.sharding.Mesh,
) -> None:
    try:
        validate_stages(
            stages,
            groups=list(family.param_groups()),
            never_trainable=list(family.never_trainable()),
            tasks=list(family.tasks),
            data_parallel=data_parallel_size(mesh),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for s in stages:
        for task, n in s.task_batch.items():
            if n % jax.process_count():
                raise ConfigError(
                    f"stage {s.name!r}: batch {n} of task {task!r} is not divisible by the "
                    f"process count {jax.process_count()}"
                )
    if int(config.checkpoint.every_steps) <= 0:
        raise ConfigError("checkpoint.every_steps must be positive")
    if int(config.checkpoint.keep_last) <= 0:
        raise ConfigError("checkpoint.keep_last must be positive")
    if int(config.log_every_steps) <= 0:
        raise ConfigError("log_every_steps must be positive")
    if not 0.0 <= float(config.ema.decay) < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {config.ema.decay}")
    if int(config.max_consecutive_bad_steps) <= 0:
        raise ConfigError("max_consecutive_bad_steps must be positive")
    family.validate(stages)
