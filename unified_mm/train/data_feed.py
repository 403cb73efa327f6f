"""The trainer's view of the input pipeline: local batches, resumable state, skip counts."""

from __future__ import annotations

import jax
import ml_collections

from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec


class DataFeed:
    """Wraps the family's training iterator for one stage.

    The state saved with checkpoints is ``{"stage": name, "batches": n, "iterator": ...}``. Every
    process consumes batches in lockstep, so ``batches`` is identical on all processes and the
    iterator state (saved from process 0 only by Orbax's JSON item) is only trusted on a
    single-process run; otherwise each process fast-forwards its own deterministic iterator.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, family: ModelFamily, stage: StageSpec, mesh
    ):
        self.stage = stage
        self.batches = 0
        # Each stage draws a different, reproducible stream.
        seed = int(config.seed) * 1000 + stage.index
        self._it = family.make_train_iterator(
            stage,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def next(self):
        batch = next(self._it)
        self.batches += 1
        return batch

    def get_state(self) -> dict:
        state = {"stage": self.stage.name, "batches": self.batches}
        if jax.process_count() == 1 and hasattr(self._it, "get_state"):
            state["iterator"] = self._it.get_state()
        return state

    def set_state(self, state: dict) -> None:
        if state.get("stage") != self.stage.name:
            raise ValueError(
                f"data state belongs to stage {state.get('stage')!r}, not {self.stage.name!r}"
            )
        if "iterator" in state and jax.process_count() == 1 and hasattr(self._it, "set_state"):
            self._it.set_state(state["iterator"])
        else:
            for _ in range(int(state["batches"])):
                next(self._it)
        self.batches = int(state["batches"])

    def skipped_counts(self) -> dict[str, int]:
        """Records skipped so far: ``{source: n, "source/reason": n}`` (reasons with n > 0)."""
        stats = getattr(self._it, "stats", None)
        if stats is None:
            return {}
        counts = {}
        for source, entry in stats().items():
            if not isinstance(entry, dict):
                counts[source] = int(entry)
                continue
            # TrainIterator.stats(): {"used": n, "skipped": n, <reason>: n, ...}
            reasons = {k: int(v) for k, v in entry.items() if k not in ("used", "skipped")}
            counts[source] = int(entry.get("skipped", sum(reasons.values())))
            counts.update({f"{source}/{r}": n for r, n in reasons.items() if n})
        return counts

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
