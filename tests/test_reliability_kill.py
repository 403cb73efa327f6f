"""Reliability 1: hard kills (SIGKILL) at random moments of a two-stage run with asynchronous saves.

Every restart must resume from the newest finalized checkpoint (never from a save the kill cut
short), and the finished run must equal an uninterrupted run with the same seed bit for bit: every
logged row (replays after a resume included) and the final parameters, EMA and optimizer state.
Kill moments: inside an asynchronous save (fault hook, and when a save's temporary directory
appears), at the stage boundary before and during its checkpoint, right after it, a random delay
after a life logs its first step, and a random delay after the process starts (restore, compile).
"""

import json
import os
import random
import re
import signal
import time

import numpy as np
import pytest
from reliability_helpers import (
    ForkServer,
    checkpoint_listing,
    flat,
    raw_metric_rows,
    read_log,
    restore_items,
    run_reference,
)

STEPS = (6, 14)  # stage boundary at step 6
TOTAL = sum(STEPS)
BASE = {
    "stages.head_only.steps": STEPS[0],
    "stages.all.steps": STEPS[1],
    "checkpoint.asynchronous": True,
    "checkpoint.every_steps": 2,
}
HOOKS = [  # deterministic kill points: (fault option, step)
    ("faults.kill_during_save_at_step", 4),  # while the step-4 save is being written
    ("faults.kill_at_step", 6),  # stage boundary, before its checkpoint
    ("faults.kill_during_save_at_step", 6),  # stage boundary, during its checkpoint
    ("faults.kill_at_step", 7),  # first step of the next stage
]
COMPARED = ("loss", "loss/t2i", "grad_norm", "lr", "stage", "skipped_steps", "bad_steps", "finite")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fs = ForkServer(devices=8, cache_dir=str(tmp_path_factory.mktemp("xla_cache")))
    yield fs
    fs.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The uninterrupted run (also fills the compilation cache the kill lives reuse)."""
    workdir = tmp_path_factory.mktemp("reference")
    run_reference(server, workdir, BASE)
    return workdir


def _wait_for(predicate, server, pid, timeout=120.0, poll=0.002) -> bool:
    """Waits until predicate() holds (True) or the child exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if server.poll(pid) is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the trainer made no progress")


def _rows(workdir) -> list[int]:
    """Steps of the rows in metrics.jsonl, in write order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _kill_campaign(server, workdir, *, random_kills: int, seed: int) -> dict:
    """Runs the schedule of kills, then a final life to the end; returns the figures.

    Random kills are aimed so that a life never reaches the end: the last logged step of a life
    before its kill is at most TOTAL - 1, and a kill while a save is in flight loses that save.
    """
    rng = random.Random(seed)
    anchors = ["save", "row", "start"]
    schedule = [("hook", h) for h in HOOKS] + [
        ("random", anchors[i % len(anchors)]) for i in range(random_kills)
    ]
    lives, kills, mid_save, t0 = [], 0, 0, time.monotonic()
    for kind, what in schedule + [("final", None)]:
        log = os.path.join(workdir, f"life{len(lives)}.log")
        overrides = dict(BASE)
        if kind == "hook":
            overrides[what[0]] = what[1]
        before = len(_rows(workdir))
        newest = max(checkpoint_listing(workdir)[0], default=0)
        if what == "start" and newest >= TOTAL - 8:
            what = "row"  # near the end a timed kill could miss the whole life
        t_start = time.monotonic()
        pid = server.start(log, workdir=str(workdir), overrides=overrides)
        if kind == "random":
            if what == "start":  # anywhere in start-up, restore, compile and the first steps
                time.sleep(rng.uniform(0.2, 2.0))
                alive = True
            elif what == "save":  # right after a save's temporary directory appears
                alive = _wait_for(lambda b=before: len(_rows(workdir)) > b, server, pid)
                alive = alive and _wait_for(lambda: checkpoint_listing(workdir)[1], server, pid)
                time.sleep(rng.uniform(0.0, 0.03))
            else:  # a random number of steps into the life
                target = min(newest + rng.randint(2, 8), TOTAL - 1)
                alive = _wait_for(
                    lambda b=before, t=target: max(_rows(workdir)[b:], default=0) >= t, server, pid
                )
                time.sleep(rng.uniform(0.0, 0.3 if target < TOTAL - 4 else 0.05))
            if alive:
                server.kill(pid)
        rc = server.wait(pid)
        done, tmp = checkpoint_listing(workdir)
        new_rows = _rows(workdir)[before:]
        lives.append(
            dict(
                first_step=new_rows[0] if new_rows else None,
                kind=kind,
                what=what,
                rc=rc,
                seconds=time.monotonic() - t_start,
                newest=max(done) if done else None,
                tmp=tmp,
                log=log,
            )
        )
        if rc == -signal.SIGKILL:
            kills += 1
            mid_save += bool(tmp)
        else:
            assert rc == 0, read_log(log)[-3000:]
            break
    return dict(lives=lives, kills=kills, mid_save=mid_save, seconds=time.monotonic() - t0)


def _check_campaign(reference, workdir, result) -> None:
    lives = result["lives"]
    assert lives[-1]["rc"] == 0 and lives[-1]["kind"] in ("final", "random"), lives[-1]
    # Hook kills happened where they were aimed: the save of step 4 was cut short.
    assert lives[0]["rc"] == -signal.SIGKILL and any(t.startswith("4.") for t in lives[0]["tmp"])
    assert lives[0]["newest"] == 2, lives[0]
    # Every restart resumed from the newest finalized checkpoint left by the previous life.
    resumed_from = []
    for prev, life in zip(lives, lives[1:]):
        text = read_log(life["log"])
        resumed = re.findall(r"resumed from checkpoint (\d+) ", text)
        if life["first_step"] is not None:  # it trained, so it restored first
            assert life["first_step"] == (prev["newest"] or 0) + 1, (prev, life)
        if prev["newest"] is None:
            assert not resumed, life
        elif resumed or life["first_step"] is not None:  # (else killed before restoring)
            assert resumed == [str(prev["newest"])], (prev, text[-2000:])
            resumed_from.append(prev["newest"])
        assert "skipped:" not in text, text[-2000:]  # no finalized checkpoint was unusable
    assert not checkpoint_listing(workdir)[1], "a temporary directory was left behind"
    # Every logged row, replays included, equals the uninterrupted run's row of that step.
    ref = {r["step"]: r for r in raw_metric_rows(str(reference))}
    rows = raw_metric_rows(str(workdir))
    assert {r["step"] for r in rows} == set(ref) == set(range(1, TOTAL + 1))
    for r in rows:
        for key in COMPARED:
            assert r[key] == ref[r["step"]][key], (r["step"], key, r[key], ref[r["step"]][key])
    # The final checkpoints are identical, optimizer moments and EMA included.
    last = TOTAL
    items = ("params", "ema", "opt_state")
    a, b = restore_items(str(reference), last, items), restore_items(str(workdir), last, items)
    for item in items:
        fa, fb = flat(a[item]), flat(b[item])
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{item}{k}")
    result.update(rows=len(rows), replayed=len(rows) - len(ref), resumed_from=resumed_from)


def _report(result) -> None:
    lives = result["lives"]
    print(
        f"\nhard kills: {result['kills']} SIGKILLs over {len(lives)} lives "
        f"({result['mid_save']} with a save in flight), {len(result['resumed_from'])} resumes "
        f"from steps {result['resumed_from']}; {result['rows']} logged rows "
        f"({result['replayed']} replayed) all bit-identical to the uninterrupted run; "
        f"final params/EMA/optimizer state bit-identical; {result['seconds']:.1f} s "
        f"(mean life {np.mean([x['seconds'] for x in lives]):.1f} s)"
    )
    for i, life in enumerate(lives):
        what = life["what"] if life["kind"] != "hook" else f"{life['what'][0]}={life['what'][1]}"
        print(
            f"  life {i:2d} {life['kind']:6s} {what!s:36s} rc={life['rc']:3d} "
            f"newest={life['newest']} tmp={life['tmp']} {life['seconds']:.1f}s"
        )


def test_hard_kills_resume_bit_identical(server, reference, tmp_path):
    result = _kill_campaign(server, tmp_path, random_kills=8, seed=0)
    assert result["kills"] >= 10, result
    _check_campaign(reference, tmp_path, result)
    _report(result)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_hard_kills_many_seeds(server, reference, tmp_path, seed):
    result = _kill_campaign(server, tmp_path, random_kills=20, seed=seed)
    assert result["kills"] >= 16, result
    _check_campaign(reference, tmp_path, result)
    _report(result)
