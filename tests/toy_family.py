"""A tiny regression family for testing the trainer's mechanics independently of real models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unified_mm import families
from unified_mm.config.base import base_config, stage
from unified_mm.train.family import ModelFamily


class ToyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        init = nnx.initializers.lecun_normal()
        self.encoder = nnx.Linear(
            8,
            width,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
        )
        self.head = nnx.Linear(
            width,
            1,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("mlp", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
        )

    def __call__(self, x):
        return self.head(jnp.tanh(self.encoder(x)))[..., 0]


class ToyIterator:
    """Deterministic synthetic regression batches with a resumable counter."""

    def __init__(self, batch: int, seed: int, process_index: int, process_count: int):
        self.batch, self.seed = batch // process_count, seed
        self.process_index, self.index = process_index, 0
        rng = np.random.default_rng(1234)
        self.w = rng.normal(size=(8,)).astype(np.float32)

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index, self.process_index])
        self.index += 1
        x = rng.normal(size=(self.batch, 8)).astype(np.float32)
        return {"t2i": {"x": x, "y": np.sin(x @ self.w).astype(np.float32)}}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])

    def stats(self):
        return {"toy": {"corrupt": 0}}


class ToyFamily(ModelFamily):
    tasks = ("t2i",)

    def build_model(self, rngs):
        return ToyModel(rngs)

    def param_groups(self):
        return {
            "encoder": lambda path, x: "encoder" in map(str, path),
            "head": lambda path, x: "head" in map(str, path),
        }

    def make_train_iterator(self, stage, *, seed, process_index, process_count):
        return ToyIterator(stage.task_batch["t2i"], seed, process_index, process_count)

    def abstract_batch(self, stage, batch_per_task):
        n = batch_per_task["t2i"]
        return {
            "t2i": {
                "x": jax.ShapeDtypeStruct((n, 8), jnp.float32),
                "y": jax.ShapeDtypeStruct((n,), jnp.float32),
            }
        }

    def loss(self, model, batch, key, *, step, stage):
        pred = model(batch["t2i"]["x"])
        loss = jnp.mean((pred - batch["t2i"]["y"]) ** 2)
        return loss, {"loss/t2i": loss}


families.FAMILIES["toy"] = lambda: ToyFamily


def toy_config(steps=(6, 6), **overrides) -> ml_collections.ConfigDict:
    c = base_config()
    c.family = "toy"
    c.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, num_slices=1))
    c.stage_order = ("head_only", "all")
    c.stages = ml_collections.ConfigDict(
        {
            "head_only": stage(
                steps=steps[0], trainable=("head",), image_size=32, task_batch={"t2i": 16}, lr=3e-2
            ),
            "all": stage(
                steps=steps[1],
                trainable=("encoder", "head"),
                image_size=64,
                task_batch={"t2i": 16},
                lr=1e-2,
                warmup_steps=2,
                schedule="cosine",
            ),
        }
    )
    c.checkpoint.every_steps = 2
    c.checkpoint.asynchronous = False
    c.log_every_steps = 1
    c.ema.decay = 0.9
    for k, v in overrides.items():
        c[k] = v
    return c
