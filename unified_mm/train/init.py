"""Sharded initialisation: abstract shapes first, then every array born on its shard."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unified_mm.parallel.sharding import state_shardings
from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec
from unified_mm.train.step import TrainState


@dataclasses.dataclass
class ModelLayout:
    """The model's graph and abstract parameters, with their shardings on the mesh."""

    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    param_shardings: nnx.State
    groups: Mapping[str, nnx.filterlib.Filter]


def model_layout(family: ModelFamily, mesh: Mesh, rules) -> ModelLayout:
    # eval_shape outside jax.set_mesh (jax_scaling.md 2.4 pitfall); nothing is allocated.
    with nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0)))
    # All variables travel together: trainable Params are chosen per stage, everything else
    # (frozen Params and non-Param constants such as a frozen random codebook) is carried as-is.
    graphdef, abstract_params = nnx.split(abstract_model)
    if jax.tree.leaves(nnx.filter_state(abstract_params, nnx.RngState)):
        raise ValueError("the model holds RNG state; unified_mm models take explicit keys")
    shardings = state_shardings(abstract_params, mesh, rules)
    groups = family.param_groups()
    check_groups_cover(nnx.filter_state(abstract_params, nnx.Param), groups)
    return ModelLayout(graphdef, abstract_params, shardings, groups)


def _param_paths(state: nnx.State) -> list[tuple]:
    return [path for path, _ in nnx.to_flat_state(state)]


def check_groups_cover(abstract_params: nnx.State, groups: Mapping[str, nnx.filterlib.Filter]):
    """Every parameter belongs to exactly one named group: no silent untrained leftovers."""
    counts: dict[tuple, list[str]] = {p: [] for p in _param_paths(abstract_params)}
    for name, filt in groups.items():
        for path in _param_paths(nnx.filter_state(abstract_params, nnx.All(nnx.Param, filt))):
            counts[path].append(name)
    orphans = ["/".join(map(str, p)) for p, g in counts.items() if not g]
    doubles = ["/".join(map(str, p)) + f" in {g}" for p, g in counts.items() if len(g) > 1]
    if orphans or doubles:
        raise ValueError(
            f"parameter groups must partition the model: {len(orphans)} in no group "
            f"{orphans[:5]}, {len(doubles)} in several {doubles[:5]}"
        )


def trainable_filter(layout: ModelLayout, stage: StageSpec) -> nnx.filterlib.Filter:
    return nnx.All(nnx.Param, nnx.Any(*[layout.groups[g] for g in stage.trainable]))


def init_params(
    family: ModelFamily, layout: ModelLayout, mesh: Mesh, rules, seed: int
) -> nnx.State:
    """Initialises every parameter directly on its shard (threefry is partitionable)."""

    def create(key):
        return nnx.state(family.build_model(nnx.Rngs(key)))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return jax.jit(create, out_shardings=layout.param_shardings)(jax.random.key(seed))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx, abstract_trainable, trainable_shardings, mesh: Mesh):
    """Optimizer moments follow their parameter's sharding; counters are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        trainable_shardings,
        transform_non_params=lambda _: _replicated(mesh),
    )


@dataclasses.dataclass
class StageLayout:
    graphdef: nnx.GraphDef
    abstract_state: TrainState
    shardings: TrainState


def stage_layout(
    layout: ModelLayout, stage: StageSpec, tx, mesh: Mesh, *, use_ema: bool
) -> StageLayout:
    """Abstract TrainState and its shardings for one stage's trainable/frozen split."""
    model = nnx.merge(layout.graphdef, layout.abstract_params)
    graphdef, abs_train, abs_frozen = nnx.split(model, trainable_filter(layout, stage), ...)
    model_sh = nnx.merge(layout.graphdef, layout.param_shardings)
    _, train_sh, frozen_sh = nnx.split(model_sh, trainable_filter(layout, stage), ...)
    abs_opt = jax.eval_shape(tx.init, abs_train)
    opt_sh = opt_state_shardings(tx, abs_train, train_sh, mesh)
    rep = _replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(
        step=scalar,
        trainable=abs_train,
        frozen=abs_frozen,
        opt_state=abs_opt,
        ema=layout.abstract_params if use_ema else None,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        bad_steps=scalar,
        skipped_steps=scalar,
    )
    shardings = TrainState(
        step=rep,
        trainable=train_sh,
        frozen=frozen_sh,
        opt_state=opt_sh,
        ema=layout.param_shardings if use_ema else None,
        rng=rep,
        bad_steps=rep,
        skipped_steps=rep,
    )
    return StageLayout(graphdef, abstract, shardings)


def assemble_state(
    layout: ModelLayout,
    stage_layout_: StageLayout,
    stage: StageSpec,
    tx,
    mesh: Mesh,
    *,
    params: nnx.State,
    ema: nnx.State | None,
    step: int,
    rng: jax.Array,
    skipped_steps: int = 0,
    opt_state=None,
) -> TrainState:
    """A stage's TrainState from full params: split by the stage filter, fresh optimizer if none."""
    filt = trainable_filter(layout, stage)
    sh = stage_layout_.shardings

    def build(params, ema, rng):
        model = nnx.merge(layout.graphdef, params)
        _, trainable, frozen = nnx.split(model, filt, ...)
        return TrainState(
            step=jnp.asarray(step, jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=tx.init(trainable),
            ema=ema,
            rng=rng,
            bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.asarray(skipped_steps, jnp.int32),
        )

    with jax.set_mesh(mesh):
        state = jax.jit(build, out_shardings=sh)(params, ema, rng)
    if opt_state is not None:
        state = state.replace(opt_state=opt_state)
    return state


def overlay_params(params: nnx.State, pretrained, shardings: nnx.State) -> nnx.State:
    """Replaces the leaves named in the (partial) pure dict ``pretrained`` and places each on its
    parameter's sharding; shapes must match exactly."""
    flat_new = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(nnx.State(pretrained))}
    flat_sh = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(shardings)}
    out = []
    bad = []
    for path, var in nnx.to_flat_state(params):
        key = tuple(map(str, path))
        if key in flat_new:
            value = flat_new.pop(key)
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            if tuple(value.shape) != tuple(var.shape):
                bad.append(f"{'/'.join(key)} {tuple(value.shape)} != {tuple(var.shape)}")
                continue
            sharding = flat_sh[key]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            var = var.replace(jax.device_put(jnp.asarray(value, var.dtype), sharding))
        out.append((path, var))
    if bad or flat_new:
        raise ValueError(
            f"pretrained weights do not fit the model: wrong shapes {bad[:5]}, "
            f"unknown {['/'.join(k) for k in list(flat_new)[:5]]}"
        )
    return nnx.from_flat_state(out)
