"""Orbax checkpoints: params, optimizer state, EMA, train counters, data-iterator state, metadata.

Layout: ``<workdir>/checkpoints/<step>/{params,opt_state,ema,train,data_iter,meta}``. Params are
saved as a pure dict of every parameter (independent of the stage's trainable/frozen split), so a
checkpoint restores into any stage, mesh or device count given sharded abstract targets.
Every process calls every save and restore (Orbax coordinates the writes).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger("unified_mm")

ITEMS = ("params", "opt_state", "ema", "train", "data_iter", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


def _is_remote(path: str) -> bool:
    return "://" in path


def make_manager(
    directory: str,
    *,
    save_every: int,
    keep_last: int,
    keep_steps: Sequence[int] = (),
    asynchronous: bool = True,
) -> ocp.CheckpointManager:
    if not _is_remote(directory):
        directory = os.path.abspath(directory)
    save_policy = cm.AnySavePolicy(
        [cm.FixedIntervalPolicy(max(int(save_every), 1)), cm.PreemptionCheckpointingPolicy()]
    )
    keep = [cm.LatestN(max(int(keep_last), 1))]
    if keep_steps:
        keep.append(cm.CustomSteps(sorted(set(int(s) for s in keep_steps))))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=asynchronous,
        save_decision_policy=save_policy,
        preservation_policy=cm.AnyPreservationPolicy(keep),
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params,
    opt_state,
    ema,
    train: dict,
    data_state: dict | None,
    meta: dict,
    force: bool = False,
) -> bool:
    """Saves one composite checkpoint (asynchronously when the manager is async)."""
    items: dict[str, Any] = dict(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta),
    )
    if ema is not None:
        items["ema"] = ocp.args.StandardSave(ema)
    if data_state is not None:
        items["data_iter"] = ocp.args.JsonSave(data_state)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def available_steps(manager: ocp.CheckpointManager) -> list[int]:
    return sorted(manager.all_steps(), reverse=True)


def _item_dir(manager: ocp.CheckpointManager, step: int, item: str) -> str:
    return os.path.join(str(manager.directory), str(step), item)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params_target,
    opt_state_target=None,
    ema_target=None,
    train_target=None,
    with_data: bool = False,
) -> dict:
    """Restores the requested items of ``step`` onto the shardings carried by the targets."""
    items: dict[str, Any] = dict(
        params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore()
    )
    if opt_state_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
    if ema_target is not None and os.path.isdir(_item_dir(manager, step, "ema")):
        items["ema"] = ocp.args.StandardRestore(ema_target)
    if train_target is not None:
        items["train"] = ocp.args.StandardRestore(train_target)
    if with_data and os.path.isdir(_item_dir(manager, step, "data_iter")):
        items["data_iter"] = ocp.args.JsonRestore()
    return dict(manager.restore(step, args=ocp.args.Composite(**items)))


def restore_newest_valid(manager: ocp.CheckpointManager, restore_fn) -> tuple[int, Any] | None:
    """Tries ``restore_fn(step)`` from the newest checkpoint down; logs each one it skips and why.

    Returns ``(step, result)`` of the first that restores, or None when there is no checkpoint.
    """
    skipped = []
    for step in available_steps(manager):
        try:
            return step, restore_fn(step)
        except Exception as e:  # a truncated file, a missing item, a crashed save's leftovers
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.warning("checkpoint %d skipped: %s", step, reason)
            skipped.append((step, reason))
    if skipped:
        raise CheckpointError(
            "no checkpoint could be restored; skipped "
            + "; ".join(f"step {s} ({r})" for s, r in skipped)
        )
    return None


def write_json(path: str, payload: dict) -> None:
    """Writes a small JSON file from process 0 (reports, model cards)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
