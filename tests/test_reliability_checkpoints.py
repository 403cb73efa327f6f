"""Reliability 3 and 6 (checkpoints): damaged checkpoint directories and checkpoints of another model.

Damaged: restore picks the newest valid checkpoint, logs which ones it skipped and why, moves the
unusable ones aside (so the run can save those steps again) and the resumed run finishes with
the same parameters as an undamaged one. Another family or architecture: one clear error at once,
naming the mismatching parameters, from the library and from ``python -m unified_mm.main``.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from reliability_helpers import (
    HERE,
    REPO,
    checkpoint_listing,
    child_env,
    flat,
    restore_items,
)
from toy_family import ToyFamily, ToyModel, toy_config

from unified_mm import families
from unified_mm.parallel.mesh import build_mesh
from unified_mm.parallel.sharding import rules_from_config
from unified_mm.train import checkpoint as ckpt
from unified_mm.train.init import model_layout
from unified_mm.train.stages import stages_from_config
from unified_mm.train.train import _resume, train_and_evaluate

STEPS = (4, 4)


def _config():
    c = toy_config(steps=STEPS)
    c.checkpoint.every_steps = 1
    c.checkpoint.keep_last = 20
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with a checkpoint at every step 1..8."""
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(_config(), str(workdir))
    assert checkpoint_listing(str(workdir))[0] == list(range(1, 9))
    return workdir


def _copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", dst / "checkpoints")
    return dst


def _resume_in(workdir, family_cls=ToyFamily, config=None):
    """Runs the trainer's resume logic on workdir; returns the resumed global step."""
    config = config or _config()
    family = family_cls(config)
    mesh = build_mesh(config.mesh)
    layout = model_layout(family, mesh, rules_from_config(config.sharding_rules))
    manager = ckpt.make_manager(
        str(workdir / "checkpoints"), save_every=1, keep_last=20, asynchronous=False
    )
    try:
        out = _resume(manager, config, family, layout, stages_from_config(config), mesh, True)
        return out["global_step"]
    finally:
        manager.wait_until_finished()
        manager.close()


def _biggest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(path, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _damage_truncated_params(ck):
    # The merged OCDBT data file (the per-process ocdbt.process_0/ files are not read once
    # merged: truncating them changes nothing, checked by hand).
    _truncate(_biggest_file(ck / "8" / "params" / "d"))


def _damage_truncated_meta(ck):
    _truncate(ck / "8" / "meta" / "metadata", 0.3)


def _damage_missing_item(ck):
    shutil.rmtree(ck / "8" / "params")


def _damage_partially_deleted(ck):
    shutil.rmtree(ck / "8")
    shutil.rmtree(ck / "7" / "opt_state")  # step 7 is mid-stage: it needs its optimizer state


def _damage_empty_step_dir(ck):
    os.mkdir(ck / "9")


def _damage_crashed_save(ck):
    shutil.copytree(ck / "8", ck / "9.orbax-checkpoint-tmp")
    _truncate(_biggest_file(ck / "9.orbax-checkpoint-tmp" / "params"))


CASES = {
    # name: (damage, expected resume step, skipped steps, text expected in the skip reason)
    "truncated_params_file": (_damage_truncated_params, 7, [8], ""),
    "truncated_meta_file": (_damage_truncated_meta, 7, [8], ""),
    "missing_item": (_damage_missing_item, 7, [8], "lacks item(s) params"),
    "partially_deleted": (_damage_partially_deleted, 6, [7], "lacks item(s) opt_state"),
    "empty_step_directory": (_damage_empty_step_dir, 8, [9], ""),
    "crashed_save_tmp_dir": (_damage_crashed_save, 8, [], ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoints_are_skipped_with_a_reason(finished, tmp_path, caplog, case):
    damage, want, skipped, hint = CASES[case]
    run = _copy(finished, tmp_path)
    ck = run / "checkpoints"
    damage(ck)
    with caplog.at_level(logging.WARNING, logger="unified_mm"):
        step = _resume_in(run)
    assert step == want, (case, step, caplog.text)
    messages = [r.getMessage() for r in caplog.records if r.name == "unified_mm"]
    skips = [m for m in messages if " skipped: " in m]
    assert [int(m.split()[1]) for m in skips] == skipped, messages
    for m in skips:
        reason = m.split(" skipped: ", 1)[1]
        assert len(reason) > 10 and hint in reason, m  # an exception type and its message
    done, tmp = checkpoint_listing(str(run))
    assert max(done) == want and not tmp, (done, tmp)  # tmp dirs cleaned, unusable moved aside
    moved = sorted(n for n in os.listdir(ck) if ".unusable-" in n)
    assert [int(n.split(".")[0]) for n in moved] == skipped, moved
    print(f"\n{case}: resumed from {step}; " + ("; ".join(skips) or "nothing skipped"))


def test_resumed_run_saves_over_the_skipped_steps_and_matches(finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    _damage_truncated_params(run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / "7" / "opt_state")
    with caplog.at_level(logging.WARNING, logger="unified_mm"):
        report = train_and_evaluate(_config(), str(run))
    assert report["global_step"] == 8
    assert "checkpoint 8 skipped" in caplog.text and "checkpoint 7 skipped" in caplog.text
    assert checkpoint_listing(str(run))[0] == list(range(1, 9))  # 7 and 8 written again
    a = restore_items(str(finished), 8, ("params", "ema"))
    b = restore_items(str(run), 8, ("params", "ema"))
    for item in a:
        for (k, x), y in zip(flat(a[item]).items(), flat(b[item]).values()):
            np.testing.assert_array_equal(x, y, err_msg=item + k)


def test_all_checkpoints_damaged_is_one_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    for step in range(1, 9):
        _truncate(run / "checkpoints" / str(step) / "meta" / "metadata", 0.3)
    with pytest.raises(ckpt.CheckpointError) as err:
        _resume_in(run)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no checkpoint could be restored; skipped step 8 (")
    assert all(f"step {s} (" in msg for s in range(1, 9)), msg
    assert checkpoint_listing(str(run))[0] == list(range(1, 9))  # nothing moved when none works


# ------------------------------------------------------------------------------ another model


class WideToyFamily(ToyFamily):
    """Same family name, other architecture: wider hidden layer plus an extra module."""

    def build_model(self, rngs):
        model = ToyModel(rngs, width=24)
        model.extra = ToyModel(rngs, width=4).head
        return model

    def param_groups(self):
        groups = super().param_groups()
        groups["head"] = lambda path, x: {"head", "extra"} & set(map(str, path))
        return groups


def test_checkpoint_of_another_architecture_is_one_clear_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        _resume_in(run, WideToyFamily)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("checkpoint 8 in ")
    assert "another architecture" in msg
    assert "missing extra/bias, extra/kernel" in msg
    assert "wrong shapes encoder/bias (16,) (model (24,))" in msg
    assert "encoder/kernel (8, 16) (model (8, 24))" in msg
    # It stops at once: nothing was skipped or moved aside.
    assert not [n for n in os.listdir(run / "checkpoints") if "unusable" in n]
    print(f"\nanother architecture: {msg}")


def test_checkpoint_of_another_family_is_one_clear_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    meta_path = run / "checkpoints" / "8" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["family"] = "harmon"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointMismatchError, match="is of family 'harmon', the config's"):
        _resume_in(run)


def test_cli_one_line_errors(finished, tmp_path):
    """Through ``python -m unified_mm.main``: a mesh the devices cannot hold, and a work directory
    holding another family's checkpoints; both CLI processes run at the same time."""
    config = os.path.join(HERE, "configs", "toy.py")
    procs = {
        "mesh": ["--config", config, "--workdir", tmp_path / "m", "--config.mesh.data=16"],
        "family": ["--config", config, "--workdir", _copy(finished, tmp_path)],
    }
    env = child_env(8)
    running = {
        k: subprocess.Popen(
            [sys.executable, "-m", "unified_mm.main", *map(str, a)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, a in procs.items()
    }
    out = {k: p.communicate(timeout=240) for k, p in running.items()}
    for k, p in running.items():
        errors = [line for line in out[k][1].splitlines() if line.startswith("error: ")]
        assert p.returncode == 2 and len(errors) == 1, (k, out[k][1][-3000:])
        assert "Traceback" not in out[k][1], out[k][1][-3000:]
        print(f"\n{k}: exit {p.returncode}: {errors[0]}")
        out[k] = errors[0]
    assert "axis sizes [16, 2, 2] use 64 devices but 8 are available" in out["mesh"]
    assert "is of family 'toy', the config's is 'toy_global'" in out["family"]


# ------------------------------------------------------------------ evaluation after a restart


class EvalToyFamily(ToyFamily):
    calls: list = []

    def evaluate(self, model, stage, *, workdir, step):
        EvalToyFamily.calls.append((stage.name, step))
        return {"step": step}


families.FAMILIES["toy_eval"] = lambda: EvalToyFamily


def test_evaluation_cut_short_by_a_kill_runs_on_restart(finished, tmp_path):
    """A kill (or preemption) between a stage's last checkpoint and the end of its evaluation."""
    run = _copy(finished, tmp_path)
    ck = run / "checkpoints"
    for step in (5, 6, 7, 8):  # as if killed while evaluating stage 1 at step 4
        shutil.rmtree(ck / str(step))
    meta_path = ck / "4" / "meta" / "metadata"
    meta_path.write_text(meta_path.read_text().replace('"family": "toy"', '"family": "toy_eval"'))
    config = _config()
    config.family = "toy_eval"
    EvalToyFamily.calls.clear()
    report = train_and_evaluate(config, str(run))
    assert EvalToyFamily.calls == [("head_only", 4), ("all", 8)]
    assert report["stages"] == {"head_only": {"step": 4}, "all": {"step": 8}}
    # Killed after the final checkpoint, before the final evaluation: the restart evaluates.
    os.remove(run / "report.json")
    shutil.rmtree(run / "eval")
    EvalToyFamily.calls.clear()
    report = train_and_evaluate(config, str(run))
    assert EvalToyFamily.calls == [("all", 8)] and report["final"] == {"step": 8}
    # A finished evaluation is read back, not repeated.
    EvalToyFamily.calls.clear()
    assert train_and_evaluate(config, str(run))["final"] == {"step": 8}
    assert EvalToyFamily.calls == []
