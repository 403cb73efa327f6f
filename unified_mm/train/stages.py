"""The progressive multi-stage schedule: a typed view of the config's stage table.

A config declares ``stage_order`` and ``stages.<name>``; every stage names its trainable parameter
groups, resolution, per-task batch, learning-rate schedule, steps and loss weights. The trainer
walks this table; nothing about a particular family's stages is coded in the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import ml_collections

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    index: int
    steps: int
    trainable: tuple[str, ...]  # parameter-group names from the family; everything else is frozen
    image_size: int
    task_batch: Mapping[str, int]  # global examples per step for each task
    grad_accum: int
    lr: float
    warmup_steps: int
    warmup_init_fraction: float
    schedule: str
    min_lr_ratio: float
    loss_weights: Mapping[str, float]
    options: Mapping[str, object]  # family-specific switches (e.g. VQRAE self-distillation)
    data: ml_collections.ConfigDict | None  # per-stage data overrides (source mixtures)

    @property
    def global_batch(self) -> int:
        return sum(self.task_batch.values())


def _stage_from_config(name: str, index: int, cfg: ml_collections.ConfigDict) -> StageSpec:
    task_batch = {k: int(v) for k, v in dict(cfg.task_batch).items() if int(v) > 0}
    return StageSpec(
        name=name,
        index=index,
        steps=int(cfg.steps),
        trainable=tuple(cfg.trainable),
        image_size=int(cfg.image_size),
        task_batch=task_batch,
        grad_accum=int(cfg.get("grad_accum", 1)),
        lr=float(cfg.lr),
        warmup_steps=int(cfg.get("warmup_steps", 0)),
        warmup_init_fraction=float(cfg.get("warmup_init_fraction", 0.0)),
        schedule=str(cfg.get("schedule", "constant")),
        min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)),
        loss_weights={k: float(v) for k, v in dict(cfg.get("loss_weights", {})).items()},
        options=dict(cfg.get("options", {})),
        data=cfg.get("data", None),
    )


def stages_from_config(config: ml_collections.ConfigDict) -> list[StageSpec]:
    order = list(config.stage_order)
    if not order:
        raise ValueError("config.stage_order is empty: declare at least one stage")
    unknown = [n for n in order if n not in config.stages]
    if unknown:
        raise ValueError(
            f"config.stage_order names unknown stage(s) {unknown}; defined: {sorted(config.stages)}"
        )
    if len(set(order)) != len(order):
        raise ValueError(f"config.stage_order repeats a stage: {order}")
    return [_stage_from_config(n, i, config.stages[n]) for i, n in enumerate(order)]


def stage_boundaries(stages: Sequence[StageSpec]) -> list[int]:
    """Global step at which each stage starts, plus the final step."""
    starts = [0]
    for s in stages:
        starts.append(starts[-1] + s.steps)
    return starts


def locate(stages: Sequence[StageSpec], global_step: int) -> tuple[int, int]:
    """(stage index, step inside the stage) for the next step to run after ``global_step`` steps.

    A step exactly on a boundary belongs to the next stage (the previous one has finished).
    Returns ``(len(stages), 0)`` when training is complete.
    """
    bounds = stage_boundaries(stages)
    for i in range(len(stages)):
        if global_step < bounds[i + 1]:
            return i, global_step - bounds[i]
    return len(stages), 0


def validate_stages(
    stages: Sequence[StageSpec],
    *,
    groups: Sequence[str],
    never_trainable: Sequence[str],
    tasks: Sequence[str],
    data_parallel: int,
) -> None:
    """One clear line per impossible value, raised before anything compiles."""
    for s in stages:
        where = f"stage {s.name!r}"
        if s.steps <= 0:
            raise ValueError(f"{where}: steps must be positive, got {s.steps}")
        bad = [g for g in s.trainable if g not in groups]
        if bad:
            raise ValueError(f"{where}: unknown parameter group(s) {bad}; known: {sorted(groups)}")
        frozen_forever = [g for g in s.trainable if g in never_trainable]
        if frozen_forever:
            raise ValueError(
                f"{where}: group(s) {frozen_forever} are always frozen for this family"
            )
        if not s.trainable:
            raise ValueError(f"{where}: no trainable parameter group")
        if not s.task_batch:
            raise ValueError(f"{where}: task_batch has no task with a positive batch")
        bad_tasks = [t for t in s.task_batch if t not in tasks]
        if bad_tasks:
            raise ValueError(f"{where}: unknown task(s) {bad_tasks}; this family has {list(tasks)}")
        for task, n in s.task_batch.items():
            if n % (data_parallel * s.grad_accum):
                raise ValueError(
                    f"{where}: batch {n} of task {task!r} is not divisible by the data-parallel "
                    f"size {data_parallel} x grad_accum {s.grad_accum}"
                )
        if s.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule {s.schedule!r} is not one of {SCHEDULES}")
        if s.warmup_steps > s.steps:
            raise ValueError(f"{where}: warmup_steps {s.warmup_steps} exceed steps {s.steps}")
        if not 32 <= s.image_size <= 4096:
            raise ValueError(f"{where}: image_size {s.image_size} out of range")
        bad_w = [t for t in s.loss_weights if t not in tasks]
        if bad_w:
            raise ValueError(f"{where}: loss_weights name unknown task(s) {bad_w}")
