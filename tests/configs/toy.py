"""The trainer's toy regression family as a config file, for tools that take ``--config``
(local multi-process training, ahead-of-time compilation, benchmarks) in the tests.

    python -m unified_mm.main --config tests/configs/toy.py --workdir /tmp/toy
    python -m unified_mm.tools.aot_compile --config tests/configs/toy.py --topology v5e-8

Its family, ``toy_global``, draws each step's *global* batch from (seed, step) and hands every
process its contiguous slice, so runs with different process counts see identical data (the
multi-process test restores a 2-process checkpoint in 1 process and compares losses).

Arguments (``:key=value,...``): ``steps0``, ``steps1`` (steps of the two stages).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toy_family import ToyFamily, toy_config  # noqa: E402

from unified_mm import families  # noqa: E402
from unified_mm.config.args import parse_arg  # noqa: E402


class GlobalToyIterator:
    """Rows [pi * B/P, (pi + 1) * B/P) of a global batch that depends only on (seed, step)."""

    def __init__(self, batch: int, seed: int, process_index: int, process_count: int):
        if batch % process_count:
            raise ValueError(f"toy batch {batch} is not divisible by {process_count} processes")
        self.batch, self.seed, self.index = batch, seed, 0
        self.rows = slice(
            process_index * batch // process_count, (process_index + 1) * batch // process_count
        )
        self.w = np.random.default_rng(1234).normal(size=(8,)).astype(np.float32)

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        x = rng.normal(size=(self.batch, 8)).astype(np.float32)[self.rows]
        return {"t2i": {"x": x, "y": np.sin(x @ self.w).astype(np.float32)}}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class GlobalToyFamily(ToyFamily):
    def make_train_iterator(self, stage, *, seed, process_index, process_count):
        return GlobalToyIterator(stage.task_batch["t2i"], seed, process_index, process_count)

    def abstract_batch(self, stage, batch_per_task):
        n = batch_per_task["t2i"]
        sds = jax.ShapeDtypeStruct
        return {"t2i": {"x": sds((n, 8), jnp.float32), "y": sds((n,), jnp.float32)}}

    def flops_per_example(self, stage):
        # forward 2*(8*16 + 16*1) multiply-adds, training = 3 x forward
        return {"t2i": 3.0 * 2 * (8 * 16 + 16)}


families.FAMILIES["toy_global"] = lambda: GlobalToyFamily


def get_config(arg=None):
    arg = parse_arg(arg, steps0=2, steps1=4)
    c = toy_config(steps=(arg.steps0, arg.steps1))
    c.family = "toy_global"
    c.evaluate_after_each_stage = False
    return c
