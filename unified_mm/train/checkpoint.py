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
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger("unified_mm")

ITEMS = ("params", "opt_state", "ema", "train", "data_iter", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit this config (another family or architecture).

    A configuration error, not damage: restore stops at once instead of trying older steps.
    """


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
    _remove_crashed_saves(directory)
    return ocp.CheckpointManager(directory, options=options)


def _remove_crashed_saves(directory: str) -> None:
    """Deletes the temporary directories a crashed save left behind (process 0, local paths).

    Orbax also cleans them up, but asynchronously; doing it here first makes a restart's view of
    the directory deterministic."""
    if _is_remote(directory) or jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if "orbax-checkpoint-tmp" in name:
            log.warning("removing %s left by an interrupted save", name)
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


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
    _require_items(manager, step, items)  # a clearer reason than Orbax's for a deleted item
    return dict(manager.restore(step, args=ocp.args.Composite(**items)))


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} of every leaf (arrays, ShapeDtypeStructs or Orbax array metadata)."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys): tuple(leaf.shape)
        for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def params_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``params`` item of ``step``, read from its metadata only."""
    _require_items(manager, step, ["params"])
    path = os.path.join(str(manager.directory), str(step), "params")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    if metadata is None:
        raise FileNotFoundError(f"checkpoint {step} has no readable 'params' metadata")
    return shapes_of(metadata.tree)


def _require_items(manager: ocp.CheckpointManager, step: int, items) -> None:
    missing = [i for i in items if not epath.Path(_item_dir(manager, step, i)).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {step} lacks item(s) {', '.join(missing)}")


def check_params_fit(
    manager: ocp.CheckpointManager, step: int, expected: dict[str, tuple[int, ...]]
) -> None:
    """Raises CheckpointMismatchError naming missing, unexpected and mis-shaped parameters."""
    found = params_shapes(manager, step)

    def some(names: list[str]) -> str:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return ", ".join(names[:5]) + more

    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {found[k]} (model {expected[k]})"
        for k in sorted(set(found) & set(expected))
        if found[k] != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {some(missing)}")
    if extra:
        problems.append(f"unexpected {some(extra)}")
    if shapes:
        problems.append(f"wrong shapes {some(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {manager.directory} does not fit this config's model "
            f"(written with another architecture?): {'; '.join(problems)}"
        )


def _everywhere(ok: bool) -> bool:
    """True when ``ok`` holds on every process (all must restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _quarantine(manager: ocp.CheckpointManager, steps: Sequence[int]) -> None:
    """Renames unusable step directories aside, so the run can save those steps again."""
    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src = epath.Path(str(manager.directory)) / str(step)
            dst = src.parent / f"{step}.unusable-{stamp}"
            try:
                src.rename(dst)
                log.warning("checkpoint %d moved aside to %s", step, dst)
            except Exception as e:  # e.g. object stores without directory renames
                log.error(
                    "could not move unusable checkpoint %s aside (%s); delete it by hand before "
                    "the run reaches step %d again",
                    src,
                    e,
                    step,
                )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unified_mm_checkpoint_quarantine")
    manager.reload()


def restore_newest_valid(manager: ocp.CheckpointManager, restore_fn) -> tuple[int, Any] | None:
    """Tries ``restore_fn(step)`` from the newest checkpoint down; logs each one it skips and why.

    Returns ``(step, result)`` of the first that restores (the newer, unusable ones are moved
    aside to ``<step>.unusable-<time>``), or None when there is no checkpoint. Raises
    CheckpointError when none restores, and CheckpointMismatchError at once for a checkpoint
    that does not fit the config.
    """
    skipped = []
    for step in available_steps(manager):
        try:
            result, reason = restore_fn(step), ""
        except CheckpointMismatchError:
            raise
        except Exception as e:  # a truncated file, a missing item, a crashed save's leftovers
            result = None
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if _everywhere(not reason):
            if skipped:
                _quarantine(manager, [s for s, _ in skipped])
            return step, result
        reason = reason or "unusable on another process"
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
