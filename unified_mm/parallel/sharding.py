"""Logical-axis rules to shardings, and host batches to global arrays."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Batch dimension of every input: all data-like axes (DCN data first, then fsdp).
BATCH_AXES = ("data", "fsdp")


def rules_from_config(rules_cfg: Sequence) -> tuple[tuple[str, object], ...]:
    """Turns the config's ``sharding_rules`` (pairs of logical name -> mesh axes) into Flax rules."""
    rules = []
    for entry in rules_cfg:
        if len(entry) != 2:
            raise ValueError(
                f"sharding_rules: each entry is (logical_name, mesh_axes), got {entry!r}"
            )
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        rules.append((str(name), axes))
    return tuple(rules)


def state_shardings(abstract_state, mesh: Mesh, rules) -> object:
    """NamedShardings for an abstract NNX state, from its logical axis metadata and ``rules``."""
    with nnx.logical_axis_rules(rules):
        return nnx.get_named_sharding(abstract_state, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch, mesh: Mesh):
    """Assembles each process's local rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
