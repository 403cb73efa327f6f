"""Reliability 7: two local JAX processes (4 CPU devices each, one 8-device mesh, gloo).

* One process is killed (SIGKILL): the other must not hang. JAX's coordination service notices
  the missing heartbeats (``--heartbeat_timeout``) or the lost coordinator and stops the
  survivor with an error naming the dead task; the test measures how long that takes.
* One process gets SIGTERM (preemption notice on one host): both must stop at the same step,
  both write the checkpoint of that step, both exit 0 (JAX's preemption service agrees on the
  step; a per-process Python flag used to make one process save while the other trained on,
  which hung both).

Started as ``python -m unified_mm.main --distributed --coordinator localhost:PORT ...`` the way
launch/local_multiprocess.py starts them, but without its sibling clean-up, which would hide a
hang. About 30-60 s each on a loaded 2-core machine: marked slow.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from reliability_helpers import HERE, REPO, child_env, read_log

HEARTBEAT_S = 10
EXIT_LIMIT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pair(workdir, *extra) -> tuple[list[subprocess.Popen], list[str]]:
    port = _free_port()
    env = child_env(4)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    args = [
        "--config",
        os.path.join(HERE, "configs", "toy.py"),
        "--workdir",
        str(workdir),
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.mesh.tensor=1",
        "--config.stages.all.steps=100000",
        "--config.checkpoint.every_steps=1000",
        "--config.log_every_steps=1",
        "--distributed",
        f"--coordinator=localhost:{port}",
        "--num_processes=2",
        f"--heartbeat_timeout={HEARTBEAT_S}",
        *extra,
    ]
    procs, logs = [], []
    for i in range(2):
        logs.append(str(workdir) + f".p{i}.log")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "unified_mm.main", *args, f"--process_id={i}"],
                cwd=REPO,
                env=env,
                stdout=open(logs[-1], "w"),
                stderr=subprocess.STDOUT,
            )
        )
    return procs, logs


def _wait_training(procs, logs, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while not all("[all 3/" in read_log(p) for p in logs):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for q in procs:
                q.kill()
            pytest.fail("the pair did not start training:\n" + read_log(logs[0])[-3000:])
        time.sleep(0.1)


def _wait_all(procs, limit: float) -> float:
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs) and time.monotonic() - t0 < limit:
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return seconds


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_survivor_stops_with_an_error_when_its_peer_dies(tmp_path, victim):
    procs, logs = _start_pair(tmp_path / "run")
    _wait_training(procs, logs)
    survivor = 1 - victim
    procs[victim].kill()
    seconds = _wait_all([procs[survivor]], EXIT_LIMIT_S + 60)
    text = read_log(logs[survivor])
    rc = procs[survivor].returncode
    assert rc not in (None, 0) and seconds < EXIT_LIMIT_S, (rc, seconds, text[-3000:])
    if victim == 1:  # the coordinator saw the worker's heartbeats stop
        needle = "The following tasks are unhealthy (stopped sending heartbeats)"
    else:  # the worker lost the coordination service
        needle = "Polled an error from coordination service"
    assert needle in text, text[-3000:]
    line = next(x for x in text.splitlines() if needle in x)
    print(
        f"\nprocess {victim} killed: process {survivor} stopped after {seconds:.1f} s "
        f"(exit {rc}, --heartbeat_timeout={HEARTBEAT_S}) with: {line.strip()[:200]}"
    )


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    procs, logs = _start_pair(tmp_path / "run")
    _wait_training(procs, logs)
    procs[1].send_signal(signal.SIGTERM)
    seconds = _wait_all(procs, EXIT_LIMIT_S + 60)
    texts = [read_log(p) for p in logs]
    assert [p.returncode for p in procs] == [0, 0], (seconds, texts[0][-2000:], texts[1][-2000:])
    steps = []
    for text in texts:
        line = next(x for x in text.splitlines() if "preempted: saved step" in x)
        steps.append(int(line.split("saved step ")[1].split(",")[0]))
    assert steps[0] == steps[1], steps
    ckpts = [int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]
    assert max(ckpts) == steps[0], ckpts
    assert seconds < EXIT_LIMIT_S
    print(f"\nSIGTERM to process 1: both saved step {steps[0]} and exited 0 in {seconds:.1f} s")
