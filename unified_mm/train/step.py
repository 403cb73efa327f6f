"""The functional train step: NNX split/merge around ``jax.jit``, grads only for trainable params.

State is a plain pytree (``TrainState``) so the same step serves jit with in/out shardings and
donation, AOT compilation for a TPU topology, and Orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec


class TrainState(struct.PyTreeNode):
    step: jax.Array  # global step (int32, replicated)
    trainable: nnx.State  # params the current stage trains
    frozen: nnx.State  # every other param (no gradient, no optimizer state)
    opt_state: optax.OptState
    ema: nnx.State | None  # EMA of all params, or None when disabled
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)
    bad_steps: jax.Array  # consecutive skipped (non-finite) steps
    skipped_steps: jax.Array  # all skipped steps so far


@dataclasses.dataclass(frozen=True)
class StepOptions:
    ema_decay: float = 0.0
    # Fault injection for the reliability tests (0-based step indices): a NaN total loss, NaN
    # inputs (every floating batch leaf, so the family's own loss terms turn NaN), or infinite
    # gradients with a finite loss.
    nan_loss_steps: Sequence[int] = ()
    nan_input_steps: Sequence[int] = ()
    inf_grad_steps: Sequence[int] = ()


def merged_params(state: TrainState) -> nnx.State:
    return nnx.merge_state(state.trainable, state.frozen)


def _microbatches(batch, k: int, batch_spec):
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each micro-batch spans all shards."""

    def split(x):
        b = x.shape[0]
        y = x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1)
        if batch_spec is not None:
            y = jax.lax.with_sharding_constraint(y, batch_spec)
        return y

    return jax.tree.map(split, batch)


def _at(steps: Sequence[int], step: jax.Array) -> jax.Array:
    return jnp.isin(step, jnp.asarray(tuple(steps), jnp.int32))


def make_train_step(
    family: ModelFamily,
    graphdef: nnx.GraphDef,
    stage: StageSpec,
    tx: optax.GradientTransformation,
    options: StepOptions,
    microbatch_sharding=None,
) -> Callable[[TrainState, Mapping], tuple[TrainState, dict]]:
    """Builds ``step(state, batch) -> (state, metrics)``; jit it with shardings and donation."""
    k = stage.grad_accum

    def loss_fn(trainable, frozen, batch, key, step):
        model = nnx.merge(graphdef, trainable, frozen)
        loss, metrics = family.loss(model, batch, key, step=step, stage=stage)
        if options.nan_loss_steps:
            loss = jnp.where(_at(options.nan_loss_steps, step), jnp.nan, loss)
        metrics = dict(metrics, loss=loss)
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if options.nan_input_steps:
            poisoned = _at(options.nan_input_steps, state.step)
            batch = jax.tree.map(
                lambda x: (
                    jnp.where(poisoned, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating) else x
                ),
                batch,
            )
        if k == 1:
            (_, metrics), grads = grad_fn(state.trainable, state.frozen, batch, key, state.step)
        else:
            micro = _microbatches(batch, k, microbatch_sharding)

            def body(carry, xs):
                acc, i = carry
                mb = xs
                (_, m), g = grad_fn(
                    state.trainable, state.frozen, mb, jax.random.fold_in(key, i), state.step
                )
                acc = jax.tree.map(jnp.add, acc, g)
                return (acc, i + 1), m

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (grads, _), ms = jax.lax.scan(body, (zeros, 0), micro)
            grads = jax.tree.map(lambda g: g / k, grads)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), ms)

        if options.inf_grad_steps:
            poisoned = _at(options.inf_grad_steps, state.step)
            grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.inf, g), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
            trainable = optax.apply_updates(state.trainable, updates)
            return trainable, opt_state

        def skip(_):
            return state.trainable, state.opt_state

        trainable, opt_state = jax.lax.cond(finite, apply, skip, None)
        ema = state.ema
        if ema is not None and options.ema_decay > 0:
            params = nnx.merge_state(trainable, state.frozen)
            d = options.ema_decay
            ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e), ema, params)
        bad = jnp.where(finite, 0, state.bad_steps + 1)
        new_state = state.replace(
            step=state.step + 1,
            trainable=trainable,
            opt_state=opt_state,
            ema=ema,
            bad_steps=bad,
            skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)),
        )
        metrics = dict(metrics)
        metrics.update(
            grad_norm=grad_norm,
            finite=finite.astype(jnp.float32),
            bad_steps=bad,
            skipped_steps=new_state.skipped_steps,
        )
        return new_state, metrics

    return step_fn
