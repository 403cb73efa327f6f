"""Trainer mechanics on a toy family: stages, freezing, checkpoints, resume, resharding, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from toy_family import toy_config

from unified_mm.train.jsonl_writer import read_metrics
from unified_mm.train.train import train_and_evaluate

HERE = os.path.dirname(__file__)


def _child(workdir, overrides, devices=8, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "trainer_subprocess.py"),
            str(workdir),
            json.dumps(overrides),
            str(devices),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    report = train_and_evaluate(toy_config(), str(workdir))
    return workdir, report, {r["step"]: r for r in read_metrics(str(workdir))}


def test_stage_table_runs_and_keeps_boundary_checkpoints(uninterrupted):
    workdir, report, rows = uninterrupted
    assert report["global_step"] == 12
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert 6 in steps and 12 in steps, steps  # the stage boundary is kept beyond keep_last
    meta = json.load(open(workdir / "checkpoints" / "12" / "meta" / "metadata"))
    assert meta["stage"] == "all" and meta["global_step"] == 12
    assert rows[6]["stage"] == 0 and rows[7]["stage"] == 1


def test_loss_decreases(uninterrupted):
    _, _, rows = uninterrupted
    assert rows[12]["loss"] < rows[1]["loss"], (rows[1]["loss"], rows[12]["loss"])


def test_frozen_group_unchanged_and_optimizer_only_for_trainable(tmp_path):
    from unified_mm import families
    from unified_mm.parallel.mesh import build_mesh
    from unified_mm.parallel.sharding import rules_from_config
    from unified_mm.train import checkpoint as ckpt
    from unified_mm.train.init import model_layout, stage_layout
    from unified_mm.train.optimizer import make_optimizer
    from unified_mm.train.stages import stages_from_config

    config = toy_config(steps=(4, 2))
    train_and_evaluate(config, str(tmp_path))
    mgr = ckpt.make_manager(str(tmp_path / "checkpoints"), save_every=1, keep_last=5)
    import orbax.checkpoint as ocp

    def params_at(step):
        out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
        return jax.tree.map(np.asarray, out["params"])

    p0, p4 = params_at(2), params_at(4)  # both inside stage "head_only"
    np.testing.assert_array_equal(p0["encoder"]["kernel"], p4["encoder"]["kernel"])
    assert not np.array_equal(p0["head"]["kernel"], p4["head"]["kernel"])
    # Optimizer state of stage 1 mirrors the trainable group only.
    family = families.build(config)
    mesh = build_mesh(config.mesh)
    layout = model_layout(family, mesh, rules_from_config(config.sharding_rules))
    stage = stages_from_config(config)[0]
    tx = make_optimizer(config.optimizer, stage, family.weight_decay_rule)
    sl = stage_layout(layout, stage, tx, mesh, use_ema=True)
    moment_paths = {
        tuple(str(k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(sl.abstract_state.opt_state)[0]
    }
    assert any("head" in "".join(p) for p in moment_paths)
    assert not any("encoder" in "".join(p) for p in moment_paths)
    mgr.close()


def test_kill_and_resume_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
    _, _, full = uninterrupted
    killed = _child(tmp_path, {"faults.kill_at_step": 9})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    resumed = _child(tmp_path, {})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from checkpoint 8" in resumed.stdout + resumed.stderr
    rows = {r["step"]: r for r in read_metrics(str(tmp_path))}
    for step in range(1, 13):
        assert rows[step]["loss"] == full[step]["loss"], (
            step,
            rows[step]["loss"],
            full[step]["loss"],
        )


def test_restore_onto_a_different_device_count(uninterrupted, tmp_path):
    _, _, full = uninterrupted
    first = _child(tmp_path, {"faults.kill_at_step": 5})
    assert first.returncode == -signal.SIGKILL
    # 4 devices with a different mesh shape: the step-4 checkpoint reshards on restore.
    resumed = _child(
        tmp_path, {"mesh": {"data": 1, "fsdp": 2, "tensor": 2, "num_slices": 1}}, devices=4
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = {r["step"]: r for r in read_metrics(str(tmp_path))}
    for step in range(5, 13):
        np.testing.assert_allclose(rows[step]["loss"], full[step]["loss"], rtol=1e-5, atol=1e-6)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "trainer_subprocess.py"),
            str(tmp_path),
            json.dumps({"stages.all.steps": 100000, "checkpoint.every_steps": 100000}),
            "8",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    deadline = time.time() + 180
    for line in proc.stdout:
        out.append(line)
        if "[all 3/" in line:
            break
        assert time.time() < deadline, "".join(out[-30:])
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    out.append(rest)
    assert proc.returncode == 0, "".join(out)[-3000:]
    print(f"SIGTERM to exit: {time.time() - t0:.2f} s")
    steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert max(steps) > 6, steps  # a checkpoint of the step reached in stage "all"
    assert "preempted: saved step" in "".join(out)
