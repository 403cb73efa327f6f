"""The small interface through which a model family plugs into the one trainer."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from unified_mm.train.stages import StageSpec

Metrics = dict[str, jax.Array]


class ModelFamily(abc.ABC):
    """What the trainer needs from Harmon, VQRAE or any other family.

    The trainer owns meshes, optimizers, stages, checkpoints and logging; the family owns the model,
    its parameter groups and its losses. Implementations are stateless apart from the config.
    """

    #: tasks this family can train, in the batch's key names (see unified_mm/data)
    tasks: Sequence[str] = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The full model with freshly initialised parameters (called under ``nnx.eval_shape`` too)."""

    @abc.abstractmethod
    def param_groups(self) -> Mapping[str, nnx.filterlib.Filter]:
        """Disjoint named parameter groups covering every ``nnx.Param`` (checked by the trainer)."""

    def validate(self, stages: Sequence[StageSpec]) -> None:
        """Family-specific config checks (raise ValueError with one clear line)."""

    def never_trainable(self) -> Sequence[str]:
        """Groups no stage may train (e.g. the frozen VAE)."""
        return ()

    @abc.abstractmethod
    def loss(
        self,
        model: nnx.Module,
        batch: Mapping[str, Mapping[str, jax.Array]],
        key: jax.Array,
        *,
        step: jax.Array,
        stage: StageSpec,
    ) -> tuple[jax.Array, Metrics]:
        """Weighted total loss of one (micro-)batch and per-term metrics (``loss/<task>``...)."""

    @abc.abstractmethod
    def make_train_iterator(
        self, stage: StageSpec, *, seed: int, process_index: int, process_count: int
    ) -> Iterator[dict]:
        """This process's local batches for ``stage`` (``task -> {field: array}``), with
        ``get_state``/``set_state``/``stats``/``close`` when the pipeline supports them."""

    @abc.abstractmethod
    def abstract_batch(self, stage: StageSpec, batch_per_task: Mapping[str, int]) -> dict:
        """``jax.ShapeDtypeStruct`` leaves of a batch with ``batch_per_task`` rows per task (the
        shapes the data pipeline produces), for ahead-of-time compilation and benchmarks."""

    def weight_decay_rule(self, path: tuple[str, ...], value: jax.Array) -> bool:
        from unified_mm.train.optimizer import mar_weight_decay_rule

        return mar_weight_decay_rule(path, value)

    def pretrained_params(self) -> Mapping[str, Any] | None:
        """Released weights to start from when no checkpoint exists: a (possibly partial) pure
        dict of host arrays in the model's layout, or None to keep the random initialisation."""
        return None

    def stage_start_params(
        self, params: nnx.State, stage: StageSpec, previous: StageSpec | None
    ) -> nnx.State:
        """Parameters a fresh stage starts from, given the previous stage's (e.g. VQRAE copies the
        encoder into its frozen teacher at the start of self-distillation). Identity by default."""
        return params

    def flops_per_example(self, stage: StageSpec) -> Mapping[str, float]:
        """Analytic training FLOPs per example for each task (forward + backward), for MFU."""
        return {}

    def flops_per_step(self, stage: StageSpec) -> float:
        """Analytic training FLOPs of one global step of ``stage`` (0 without a FLOP model)."""
        per_example = self.flops_per_example(stage)
        return float(sum(per_example.get(t, 0.0) * n for t, n in stage.task_batch.items()))

    def previews(self, model: nnx.Module, stage: StageSpec, key: jax.Array) -> dict[str, Any]:
        """Sample grids for the log: ``{"images": {name: uint8 NHWC}, "texts": {name: str}}``."""
        return {}

    def evaluate(self, model: nnx.Module, stage: StageSpec, *, workdir: str, step: int) -> dict:
        """The family's evaluation suite (report dict); empty when it has none."""
        return {}
