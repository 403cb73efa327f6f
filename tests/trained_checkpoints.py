"""Tiny checkpoints trained by the real trainer, for the CLI smoke tests.

`trained_harmon(root)` and `trained_vqrae(root)` run `unified_mm.train.train.train_and_evaluate`
on the smoke config of ``configs/shapes_harmon.py`` / ``configs/shapes_vqrae.py`` cut to one stage
of `TRAIN_STEPS` steps (one example per task per fake device, cheap end-of-stage evaluation, no
previews), with checkpoints at `MID_STEP` and `TRAIN_STEPS`. Nearly all of a run's time on two
CPU cores (Harmon 57-85 s, VQRAE 24-46 s, depending on load) is compilation (parameter init, the
train step, the evaluation samplers); the steps themselves take well under a second each.

The result is cached on disk: a finished run writes `MARKER` into its work directory, and a later
call with the same `root` (pytest's session base temp, shared by every module) reuses it. So
module-scoped fixtures of several test files train each family once per session without a
conftest.py fixture. A partial run (no marker) is deleted and retrained.

`check_trained(run)` asserts the checkpoint really holds trained weights (so the fixtures cannot
silently fall back to random ones): checkpoint metadata at step `TRAIN_STEPS` > 0, finite losses
in metrics.jsonl with the chosen loss falling, the family's analytic FLOPs logged on every timed
step, and weights that changed between the two checkpoints (and an EMA that differs from the raw
params when the run keeps one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = 6
MID_STEP = 3  # checkpoint.every_steps: the earlier checkpoint the final weights are compared with
MARKER = "trained_run.json"


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    workdir: str
    family: str
    stage: str
    steps: int
    loss_key: str  # the metrics.jsonl loss that must fall over the run
    min_loss_drop: float
    has_ema: bool
    train_seconds: float  # wall time of the run that produced the workdir (cached or not)


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"{name}_cfg", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def harmon_config() -> ml_collections.ConfigDict:
    """The Harmon smoke config as one `full` stage (LLM, MAR, diffusion head, projectors)."""
    c = load_config("shapes_harmon", "smoke")
    with c.unlocked():
        c.stage_order = ("full",)
        c.stages.full.steps = TRAIN_STEPS
        c.stages.full.task_batch = {"i2t": 8, "t2i": 8}  # one example per task per fake device
        c.ema.decay = 0.5  # an EMA that differs from the params: the CLIs' EMA path is exercised
        c.checkpoint.every_steps = MID_STEP
        c.checkpoint.keep_last = 2
        c.checkpoint.asynchronous = False
        c.evaluate_after_each_stage = False
        # The final stage is always evaluated; keep it to a handful of samples.
        c.eval.preview_prompts = ()
        c.eval.num_iter = 2
        c.eval.geneval_prompts_per_category = 1
        c.eval.geneval_images_per_prompt = 1
        c.eval.vqa_questions = 1
        c.eval.detector_images = 6
    return c


def vqrae_config() -> ml_collections.ConfigDict:
    """The VQRAE smoke config as one `tokenizer` stage (SimVQ, decoder; encoder frozen)."""
    c = load_config("shapes_vqrae", "smoke")
    with c.unlocked():
        c.stage_order = ("tokenizer",)
        c.stages.tokenizer.steps = TRAIN_STEPS
        c.stages.tokenizer.task_batch = {"image": 8}
        # The patch discriminator's backward is very slow on XLA:CPU (see the config); the
        # reconstruction CLI does not need it.
        c.model.tokenizer.loss.gan_weight = 0.0
        c.checkpoint.every_steps = MID_STEP
        c.checkpoint.keep_last = 2
        c.checkpoint.asynchronous = False
        c.evaluate_after_each_stage = False
        c.eval.recon_images = 32  # one evaluation batch
    return c


@contextlib.contextmanager
def _fast_cpu_saves() -> Iterator[None]:
    """Orbax's replica-parallel save slices each replicated array once per device with its own
    compiled program: ~20 s for the first save of these tiny models on 8 fake CPU devices (the
    written files are the same either way). Turned off for the run through the handler's public
    constructor argument, and the previous handler restored afterwards."""
    from orbax.checkpoint import type_handlers

    previous = type_handlers.get_type_handler(jax.Array)
    handler = type_handlers.ArrayHandler(use_replica_parallel=False)
    type_handlers.register_type_handler(jax.Array, handler, override=True)
    try:
        yield
    finally:
        type_handlers.register_type_handler(jax.Array, previous, override=True)


def _train(root: pathlib.Path, name: str, config, **run_fields) -> TrainedRun:
    workdir = pathlib.Path(root) / name
    marker = workdir / MARKER
    if marker.is_file():
        return TrainedRun(**json.loads(marker.read_text()))
    from unified_mm.train.train import train_and_evaluate

    shutil.rmtree(workdir, ignore_errors=True)  # a run cut short earlier in the session
    t0 = time.perf_counter()
    with _fast_cpu_saves():
        report = train_and_evaluate(config, str(workdir))
    seconds = time.perf_counter() - t0
    if report.get("global_step") != TRAIN_STEPS:
        raise RuntimeError(f"the {name} training run stopped early: {report}")
    run = TrainedRun(
        workdir=str(workdir),
        family=config.family,
        steps=TRAIN_STEPS,
        has_ema=float(config.ema.decay) > 0,
        train_seconds=round(seconds, 1),
        **run_fields,
    )
    marker.write_text(json.dumps(dataclasses.asdict(run)))
    return run


def trained_harmon(root: pathlib.Path) -> TrainedRun:
    """A Harmon work directory trained `TRAIN_STEPS` steps under `root` (trained once per root)."""
    return _train(
        root,
        "trained_harmon",
        harmon_config(),
        stage="full",
        loss_key="loss/i2t",  # the diffusion loss is too noisy over a few steps
        min_loss_drop=0.1,  # measured: 4.89 -> 4.49 (mean of the first and last two steps)
    )


def trained_vqrae(root: pathlib.Path) -> TrainedRun:
    """A VQRAE work directory trained `TRAIN_STEPS` steps under `root` (trained once per root)."""
    return _train(
        root,
        "trained_vqrae",
        vqrae_config(),
        stage="tokenizer",
        loss_key="loss/image",
        min_loss_drop=0.1,  # measured: 1.40 -> 1.04
    )


def _weights(workdir: str, step: int, *, ema: bool) -> list[np.ndarray]:
    from flax import nnx

    from unified_mm.train.load import load_model

    loaded = load_model(workdir, step=step, prefer_ema=ema)
    assert loaded.used_ema == ema, (workdir, step, ema)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded.model)))]


def _max_change(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b) and a
    return max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(a, b, strict=True))


def _model_tflops_per_step(run: TrainedRun) -> float:
    """The analytic TFLOP per step of the run's stage, from the same config's family."""
    from unified_mm import families
    from unified_mm.train.stages import stages_from_config

    config = {"harmon": harmon_config, "vqrae": vqrae_config}[run.family]()
    (stage,) = [s for s in stages_from_config(config) if s.name == run.stage]
    return families.build(config).flops_per_step(stage) / 1e12


def check_trained(run: TrainedRun) -> dict:
    """Asserts `run.workdir` holds a checkpoint the trainer trained; returns what it measured."""
    import orbax.checkpoint as ocp

    from unified_mm.train.jsonl_writer import read_metrics

    manager = ocp.CheckpointManager(os.path.join(run.workdir, "checkpoints"))
    try:
        steps = sorted(manager.all_steps())
        meta = dict(
            manager.restore(max(steps), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )
    finally:
        manager.close()
    assert steps == [MID_STEP, run.steps], steps
    assert meta["global_step"] == run.steps > 0 and meta["stage_step"] == run.steps
    assert meta["stage"] == run.stage and meta["family"] == run.family

    rows = read_metrics(run.workdir)
    assert [r["step"] for r in rows] == list(range(1, run.steps + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r[run.loss_key]) for r in rows)
    losses = [r[run.loss_key] for r in rows]
    first, last = float(np.mean(losses[:2])), float(np.mean(losses[-2:]))
    assert first - last > run.min_loss_drop, (run.loss_key, losses)
    # Every timed step (all but the compiling first) logs the family's analytic FLOPs for MFU.
    timed = [r for r in rows if "perf/step_seconds" in r]
    assert len(timed) == run.steps - 1, [sorted(r) for r in rows[:2]]
    expected = _model_tflops_per_step(run)
    assert expected > 0
    for r in timed:
        assert r["perf/model_tflops_per_step"] == pytest.approx(expected, rel=1e-6)

    final = _weights(run.workdir, run.steps, ema=False)
    moved = _max_change(_weights(run.workdir, MID_STEP, ema=False), final)
    assert moved > 1e-6, f"weights did not change between steps {MID_STEP} and {run.steps}"
    out = {"loss_first": first, "loss_last": last, "max_weight_change": moved}
    if run.has_ema:
        out["ema_vs_params"] = _max_change(_weights(run.workdir, run.steps, ema=True), final)
        assert out["ema_vs_params"] > 1e-6, "the EMA equals the raw params"
    return out
