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


def logical_names(variable: nnx.Variable) -> tuple | None:
    """The logical axis names a parameter was created with (``nnx.with_partitioning``)."""
    md = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if md.get(key) is not None:
            return tuple(md[key])
    return None


def logical_to_spec(names, shape, rules, mesh: Mesh) -> P:
    """Maps logical names to mesh axes through ``rules``.

    A mesh axis is used at most once per array (the first dimension that asks for it wins, as
    in Flax Linen's resolution), and an axis that does not divide its dimension is left out, so
    a tiny config on a large mesh replicates instead of failing.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        size = 1
        for axis in axes:
            if axis in used or axis not in mesh.shape:
                continue
            if dim % (size * mesh.shape[axis]):
                continue
            size *= mesh.shape[axis]
            keep.append(axis)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules) -> object:
    """NamedShardings for an abstract NNX state, from its logical axis metadata and ``rules``."""

    def one(v):
        names = logical_names(v)
        if names is None:
            return v.replace(NamedSharding(mesh, P()))
        return v.replace(NamedSharding(mesh, logical_to_spec(names, v.shape, rules, mesh)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
