"""Reliability 2: SIGTERM (preemption) writes a checkpoint of the current step and exits 0 quickly.

Cases: mid-stage (between periodic saves), right after a periodic save of the same step, and at
the last step of a stage (before its evaluation). After each, a restart finishes the run with
losses bit-identical to an uninterrupted run and nothing replayed (no step was lost).
"""

import os
import signal
import time

import pytest
from reliability_helpers import (
    ForkServer,
    checkpoint_listing,
    raw_metric_rows,
    read_log,
    run_reference,
)

BASE = {
    "stages.head_only.steps": 6,
    "stages.all.steps": 30,
    "checkpoint.asynchronous": True,
    "checkpoint.every_steps": 4,
}
EXIT_LIMIT_S = 30.0  # generous for a loaded 2-core CI machine; measured figures are printed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fs = ForkServer(devices=8, cache_dir=str(tmp_path_factory.mktemp("xla_cache")))
    yield fs
    fs.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    run_reference(server, workdir, BASE)
    return {r["step"]: r for r in raw_metric_rows(str(workdir))}


def _finish_and_compare(server, workdir, reference, preempted_at: int) -> None:
    """Restarts the preempted run to the end; the restart resumes exactly at the preempted step."""
    log = os.path.join(workdir, "restart.log")
    assert server.run(log, workdir=str(workdir), overrides=BASE) == 0, read_log(log)[-3000:]
    assert f"resumed from checkpoint {preempted_at} " in read_log(log)
    rows = raw_metric_rows(str(workdir))
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(reference) + 1)), steps  # nothing replayed, nothing lost
    for r in rows:
        assert r["loss"] == reference[r["step"]]["loss"], r["step"]


def test_sigterm_mid_stage(server, reference, tmp_path):
    log = str(tmp_path / "life.log")
    pid = server.start(log, workdir=str(tmp_path), overrides=BASE)
    deadline = time.monotonic() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") or len(raw_metric_rows(str(tmp_path))) < 9:
        assert server.poll(pid) is None and time.monotonic() < deadline, read_log(log)[-3000:]
        time.sleep(0.005)
    t0 = time.monotonic()
    server.kill(pid, signal.SIGTERM)
    rc = server.wait(pid, timeout=120)
    seconds = time.monotonic() - t0
    assert rc == 0, read_log(log)[-3000:]
    last = raw_metric_rows(str(tmp_path))[-1]["step"]
    assert f"preempted: saved step {last}, exiting" in read_log(log)
    assert max(checkpoint_listing(str(tmp_path))[0]) == last and last < 36
    assert seconds < EXIT_LIMIT_S
    _finish_and_compare(server, tmp_path, reference, last)
    print(
        f"\nSIGTERM mid-stage at step {last}: checkpoint {last} written, exit 0 in {seconds:.2f} s"
    )


@pytest.mark.parametrize(
    "step, where",
    [(12, "right after a periodic save of the same step"), (6, "at the last step of a stage")],
)
def test_sigterm_at_awkward_moments(server, reference, tmp_path, step, where):
    log = str(tmp_path / "life.log")
    t0 = time.monotonic()
    rc = server.run(
        log, workdir=str(tmp_path), overrides=dict(BASE, **{"faults.sigterm_at_step": step})
    )
    text = read_log(log)
    assert rc == 0, text[-3000:]
    assert "preempted" in text and f"saved step {step}" in text, text[-2000:]
    assert max(checkpoint_listing(str(tmp_path))[0]) == step
    assert raw_metric_rows(str(tmp_path))[-1]["step"] == step
    _finish_and_compare(server, tmp_path, reference, step)
    print(f"\nSIGTERM {where} (step {step}): exit 0, run {time.monotonic() - t0:.1f} s")
