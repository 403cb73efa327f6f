"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo collectives) train the
toy config with FSDP across both processes and checkpoint; a 1-process run restores the mid-stage
checkpoint and reproduces the 2-process losses of the following steps."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import sys

import pytest

from unified_mm.train.jsonl_writer import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess

if importlib.util.find_spec("portpicker") is None:
    print("test_multiprocess: portpicker is missing, using a socket-bound port instead")


def _launcher():
    spec = importlib.util.spec_from_file_location(
        "local_multiprocess", ROOT / "launch" / "local_multiprocess.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    """Logged loss per global step (process 0's metrics.jsonl)."""
    return {int(r["step"]): r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


# fsdp=8 spans both processes, so parameters are sharded across them and every step all-gathers
# over gloo; the checkpoint is written by both processes.
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]


def _check(results, expect_processes: int) -> None:
    for r in results:
        assert r.returncode == 0, f"process {r.process_id} failed:\n{r.output[-3000:]}"
    assert f"over 8 devices, {expect_processes} process(es)" in results[0].output


def test_two_processes_train_save_and_one_process_resumes(tmp_path):
    mp = _launcher()
    two = tmp_path / "two"
    config = ["--config", "tests/configs/toy.py:steps0=2,steps1=4"]
    results = mp.launch_local(
        [*config, "--workdir", str(two), *MESH],
        num_processes=2,
        devices_per_process=4,
        timeout=240,
        stream=False,
    )
    _check(results, 2)
    assert "[Gloo]" in results[0].output  # collectives really crossed processes
    ckpts = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [2, 4, 6]
    reference = _losses(two)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # Resume in ONE process (8 local devices, same mesh) from the mid-stage checkpoint at step 4:
    # parameters, optimizer state and data position come from the 2-process run.
    one = tmp_path / "one"
    shutil.copytree(two / "checkpoints", one / "checkpoints")
    shutil.rmtree(one / "checkpoints" / "6")
    results = mp.launch_local(
        [*config, "--workdir", str(one), *MESH],
        num_processes=1,
        devices_per_process=8,
        timeout=240,
        stream=False,
    )
    _check(results, 1)
    assert "resumed from checkpoint 4" in results[0].output
    resumed = _losses(one)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        # the same math with a different reduction layout: equal up to float32 rounding
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    # training continued (the restored state is not a fresh initialisation)
    assert reference[6] < reference[1]


def test_launcher_reports_failure_and_stops_siblings(tmp_path):
    mp = _launcher()
    results = mp.launch_local(
        [
            "--config",
            "tests/configs/toy.py",
            "--workdir",
            str(tmp_path / "w"),
            "--config.mesh.fsdp=3",
        ],  # 8 devices cannot form a 3-way fsdp axis with data=2 tensor=2
        num_processes=2,
        devices_per_process=4,
        timeout=120,
        stream=False,
    )
    assert all(r.returncode != 0 for r in results)
    assert "mesh" in results[0].output.lower()
