"""The trainer: one recipe for every family and every stage, on one CPU or a TPU pod.

Reads top to bottom: set up, build the mesh, lay out the model, resume, then walk the stage table:
for each stage build its optimizer and data, run the jitted step, log, preview, checkpoint,
evaluate. Families plug in through ``unified_mm.train.family.ModelFamily``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unified_mm import families
from unified_mm.config.validation import validate_config
from unified_mm.parallel.mesh import build_mesh
from unified_mm.parallel.sharding import batch_sharding, host_batch_to_global, rules_from_config
from unified_mm.train import checkpoint as ckpt
from unified_mm.train import metrics as mt
from unified_mm.train.data_feed import DataFeed
from unified_mm.train.init import (
    assemble_state,
    init_params,
    model_layout,
    overlay_params,
    stage_layout,
)
from unified_mm.train.optimizer import learning_rate_schedule, make_optimizer
from unified_mm.train.preemption import PreemptionFlag
from unified_mm.train.samples import write_previews
from unified_mm.train.stages import StageSpec, locate, stage_boundaries, stages_from_config
from unified_mm.train.step import StepOptions, make_train_step, merged_params

log = logging.getLogger("unified_mm")


class TrainingStopped(RuntimeError):
    """Raised when the run must stop (too many consecutive non-finite steps)."""


def _checkpoint_meta(config, stage: StageSpec, stage_step: int, global_step: int) -> dict:
    return {
        "stage": stage.name,
        "stage_index": stage.index,
        "stage_step": stage_step,
        "global_step": global_step,
        "family": config.family,
        "config": config.to_json(),
    }


def _step_options(config) -> StepOptions:
    faults = config.faults
    return StepOptions(
        ema_decay=float(config.ema.decay),
        nan_loss_steps=tuple(faults.nan_loss_steps),
        nan_input_steps=tuple(faults.get("nan_input_steps", ())),
        inf_grad_steps=tuple(faults.get("inf_grad_steps", ())),
    )


def _bad_step_message(m: dict, step: int, max_bad: int) -> str:
    terms = [k for k, v in m.items() if k.startswith("loss") and not np.isfinite(v)]
    culprit = ", ".join(terms) or f"none (non-finite gradients, grad_norm={m.get('grad_norm')})"
    return (
        f"stopping at step {step}: {int(m['bad_steps'])} consecutive non-finite steps "
        f"(limit {max_bad}), each skipped; offending loss term(s): {culprit}"
    )


def _check_bad_steps(metrics, step: int, max_bad: int) -> None:
    """Stops the run once ``max_bad`` consecutive steps were non-finite (and skipped)."""
    if int(jax.device_get(metrics["bad_steps"])) >= max_bad:
        m = mt.to_scalars(jax.device_get(metrics))
        raise TrainingStopped(_bad_step_message(m, step, max_bad))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains through every stage of ``config`` in ``workdir``; returns the final report."""
    # ------------------------------------------------------------------ set up
    os.makedirs(workdir, exist_ok=True)
    family = families.build(config)
    stages = stages_from_config(config)
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    validate_config(config, family, stages, mesh)
    bounds = stage_boundaries(stages)
    writer = mt.create_writer(workdir)
    if jax.process_index() == 0:
        writer.write_hparams({k: str(v) for k, v in config.items() if not hasattr(v, "items")})
    preempt = PreemptionFlag().install()
    log.info(
        "mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count()
    )

    # ------------------------------------------------------------------ model layout
    layout = model_layout(family, mesh, rules)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract_params))
    log.info("model %s: %.2fM parameters", config.family, n_params / 1e6)
    use_ema = float(config.ema.decay) > 0

    # ------------------------------------------------------------------ resume
    manager = ckpt.make_manager(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint.every_steps,
        keep_last=config.checkpoint.keep_last,
        keep_steps=bounds[1:],
        asynchronous=config.checkpoint.asynchronous,
    )
    resume = _resume(manager, config, family, layout, stages, mesh, use_ema)
    global_step = resume["global_step"]
    params, ema = resume["params"], resume["ema"]
    if params is None:
        params = init_params(family, layout, mesh, rules, config.seed)
        pretrained = family.pretrained_params()
        if pretrained:
            params = overlay_params(params, pretrained, layout.param_shardings)
        ema = jax.tree.map(jnp.copy, params) if use_ema else None
    rng = jax.random.key_data(jax.random.key(config.seed + 1))
    report: dict = {"stages": {}}
    previous: StageSpec | None = (
        stages[resume["stage_index"] - 1] if resume["stage_index"] else None
    )

    # ------------------------------------------------------------------ stages
    try:
        if resume["params"] is not None:
            _evaluate_missed(config, family, stages, layout, params, ema, workdir, resume, report)
        for stage in stages[resume["stage_index"] :]:
            stage_start = bounds[stage.index]
            stage_step = global_step - stage_start
            fresh_stage = stage_step == 0
            tx = make_optimizer(config.optimizer, stage, family.weight_decay_rule)
            lr_at = learning_rate_schedule(stage)
            layout_s = stage_layout(layout, stage, tx, mesh, use_ema=use_ema)
            if fresh_stage:
                params = family.stage_start_params(params, stage, previous)
            state = assemble_state(
                layout,
                layout_s,
                stage,
                tx,
                mesh,
                params=params,
                ema=ema,
                step=global_step,
                rng=rng,
                skipped_steps=resume["skipped_steps"],
                opt_state=None if fresh_stage else resume["opt_state"],
            )
            if resume.get("bad_steps"):  # a run of bad steps does not end at a stage boundary
                state = state.replace(
                    bad_steps=jax.device_put(
                        jnp.asarray(resume["bad_steps"], jnp.int32), layout_s.shardings.bad_steps
                    )
                )
            log.info(
                "stage %s (%d/%d): steps %d-%d, trainable %s, image %dpx, batch %s",
                stage.name,
                stage.index + 1,
                len(stages),
                stage_start,
                bounds[stage.index + 1],
                list(stage.trainable),
                stage.image_size,
                dict(stage.task_batch),
            )
            train_step = jax.jit(
                make_train_step(
                    family,
                    layout_s.graphdef,
                    stage,
                    tx,
                    _step_options(config),
                    microbatch_sharding=None,
                ),
                in_shardings=(layout_s.shardings, batch_sharding(mesh)),
                out_shardings=(layout_s.shardings, None),
                donate_argnums=0,
            )
            feed = DataFeed(config, family, stage, mesh)
            if not fresh_stage and resume["data_state"] is not None:
                feed.set_state(resume["data_state"])
            flops = family.flops_per_step(stage)
            peak = mt.peak_tflops()
            timer = mt.StepTimer()
            stage_t0 = time.perf_counter()
            session_first_step = stage_step
            first_step_done = False
            previous_step = None  # (metrics, global step) of the step dispatched before
            # The rules make the models' activation constraints (nn.with_logical_constraint)
            # real while the step is traced: without them XLA replicates activations over the
            # batch axes (Harmon-1.5B align, v5p-64, 5 per chip: 26.9 -> 4.4 GiB temporaries).
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                while stage_step < stage.steps:
                    if preempt.requested or manager.reached_preemption(global_step):
                        _save(
                            manager, config, state, feed, stage, stage_step, global_step, force=True
                        )
                        manager.wait_until_finished()
                        feed.close()
                        log.warning("preempted: saved step %d, exiting", global_step)
                        report["preempted_at"] = global_step
                        return report
                    t_data = time.perf_counter()
                    host_batch = feed.next()
                    timer.add_data_wait(time.perf_counter() - t_data)
                    batch = host_batch_to_global(host_batch, mesh)
                    state, metrics = train_step(state, batch)
                    global_step += 1
                    stage_step += 1
                    if global_step == config.faults.kill_at_step:  # fault injection (tests)
                        jax.block_until_ready(state)
                        os.kill(os.getpid(), signal.SIGKILL)
                    if global_step == config.faults.get("sigterm_at_step", -1):  # (tests)
                        os.kill(os.getpid(), signal.SIGTERM)
                    # Every step, one step behind (that one is done or nearly, so the device
                    # keeps its queue): the stop must not wait for the next logging step.
                    if previous_step is not None:
                        _check_bad_steps(*previous_step, config.max_consecutive_bad_steps)
                    previous_step = (metrics, global_step)
                    if not first_step_done:  # exclude compilation from timings and ETA
                        jax.block_until_ready(metrics)
                        first_step_done = True
                        timer.reset()
                        stage_t0 = time.perf_counter()
                        session_first_step = stage_step
                    else:
                        timer.tick()
                    last = stage_step == stage.steps
                    if stage_step % config.log_every_steps == 0 or last:
                        _check_bad_steps(metrics, global_step, config.max_consecutive_bad_steps)
                        m = mt.to_scalars(jax.device_get(metrics))
                        m.update(timer.summary())
                        m["lr"] = float(lr_at(stage_step - 1))
                        m["stage"] = stage.index
                        if "perf/step_seconds" in m:
                            m["perf/examples_per_second"] = (
                                stage.global_batch / m["perf/step_seconds"]
                            )
                            if flops:
                                m["perf/model_tflops_per_step"] = flops / 1e12
                                u = mt.mfu(flops, m["perf/step_seconds"], mesh.size, peak)
                                if u is not None:
                                    m["perf/mfu"] = u
                        for source, count in feed.skipped_counts().items():
                            m[f"data/skipped/{source}"] = count
                        writer.write_scalars(global_step, m)
                        elapsed = time.perf_counter() - stage_t0
                        done = max(stage_step - session_first_step, 1)
                        eta = elapsed / done * (stage.steps - stage_step)
                        log.info(
                            "[%s %d/%d] step %d loss %.4f %s| eta %s",
                            stage.name,
                            stage_step,
                            stage.steps,
                            global_step,
                            m["loss"],
                            " ".join(f"{k}={v:.4g}" for k, v in m.items() if k.startswith("loss/")),
                            mt.format_eta(eta),
                        )
                    if last or (
                        config.preview_every_steps and stage_step % config.preview_every_steps == 0
                    ):
                        write_previews(
                            family,
                            _eval_model(layout_s, state, layout, use_ema),
                            stage,
                            writer,
                            workdir,
                            global_step,
                        )
                    _save(manager, config, state, feed, stage, stage_step, global_step, force=last)
                manager.wait_until_finished()
                skipped = {k: v for k, v in feed.skipped_counts().items() if v}
                if skipped:  # also in metrics as data/skipped/<source>[/<reason>]
                    log.warning("stage %s skipped bad records: %s", stage.name, skipped)
                feed.close()
                params, ema = merged_params(state), state.ema
                rng = state.rng
                resume["skipped_steps"] = int(jax.device_get(state.skipped_steps))
                resume["bad_steps"] = int(jax.device_get(state.bad_steps))
                if preempt.requested:  # the stage's last step is saved; it is evaluated on restart
                    log.warning(
                        "preempted after stage %s: saved step %d, exiting", stage.name, global_step
                    )
                    report["preempted_at"] = global_step
                    return report
                if config.evaluate_after_each_stage or stage.index == len(stages) - 1:
                    _evaluate_stage(
                        family,
                        _eval_model(layout_s, state, layout, use_ema),
                        stage,
                        workdir,
                        global_step,
                        report,
                    )
            previous = stage
        report["final"] = report["stages"].get(stages[-1].name, {})
        report["global_step"] = global_step
        ckpt.write_json(os.path.join(workdir, "report.json"), report)
        return report
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        preempt.uninstall()


def _eval_model(layout_s, state, layout, use_ema: bool) -> nnx.Module:
    """The model for previews and evaluation: EMA weights when kept."""
    if use_ema and state.ema is not None:
        return nnx.merge(layout.graphdef, state.ema)
    return nnx.merge(layout_s.graphdef, state.trainable, state.frozen)


def _eval_path(workdir: str, stage: StageSpec, step: int) -> str:
    return os.path.join(workdir, "eval", f"{stage.name}_step{step}.json")


def _evaluate_stage(family, model, stage, workdir: str, step: int, report: dict) -> None:
    result = family.evaluate(model, stage, workdir=workdir, step=step)
    if result:
        report["stages"][stage.name] = result
        ckpt.write_json(_eval_path(workdir, stage, step), result)


def _evaluate_missed(config, family, stages, layout, params, ema, workdir, resume, report) -> None:
    """Evaluates the stage that ended at the resumed checkpoint when its evaluation is missing.

    A run killed or preempted between a stage's last checkpoint and the end of its evaluation
    restarts exactly at that boundary; without this the evaluation (the final one included)
    would be lost.
    """
    i = resume["stage_index"]
    if i == 0 or resume["global_step"] != stage_boundaries(stages)[i]:
        return
    stage = stages[i - 1]
    if not (config.evaluate_after_each_stage or i == len(stages)):
        return
    path = _eval_path(workdir, stage, resume["global_step"])
    done = os.path.exists(path)
    if jax.process_count() > 1:  # process 0 wrote it: all must take the same branch
        from jax.experimental import multihost_utils

        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    if done:
        if os.path.exists(path):
            with open(path) as f:
                report["stages"][stage.name] = json.load(f)
        return
    log.info(
        "evaluating stage %s at step %d (missed before the restart)",
        stage.name,
        resume["global_step"],
    )
    model = nnx.merge(layout.graphdef, ema if ema is not None else params)
    _evaluate_stage(family, model, stage, workdir, resume["global_step"], report)


def _save(manager, config, state, feed, stage, stage_step, global_step, *, force: bool) -> None:
    if not force and not manager.should_save(global_step):
        return
    if force and global_step in manager.all_steps():
        # Already saved (a periodic save just before a preemption, or the step resumed from):
        # saving it again would raise StepAlreadyExistsError.
        return
    started = ckpt.save(
        manager,
        global_step,
        params=nnx.to_pure_dict(merged_params(state)),
        opt_state=state.opt_state,
        ema=nnx.to_pure_dict(state.ema) if state.ema is not None else None,
        train={
            "rng": state.rng,
            "skipped_steps": state.skipped_steps,
        },
        data_state=feed.get_state(),
        meta=_checkpoint_meta(config, stage, stage_step, global_step),
        force=force,
    )
    if started and global_step == config.faults.get("kill_during_save_at_step", -1):
        # Fault injection (tests): die while the asynchronous save is still being written.
        os.kill(os.getpid(), signal.SIGKILL)


def _resume(manager, config, family, layout, stages, mesh, use_ema) -> dict:
    """Restores the newest valid checkpoint: params (+EMA), and optimizer/data state mid-stage."""
    empty = {
        "global_step": 0,
        "stage_index": 0,
        "params": None,
        "ema": None,
        "opt_state": None,
        "data_state": None,
        "skipped_steps": 0,
    }
    if not ckpt.available_steps(manager):
        return empty

    def attempt(step: int) -> dict:
        meta = ckpt.read_meta(manager, step)
        if meta.get("family") != config.family:
            raise ckpt.CheckpointMismatchError(
                f"checkpoint {step} in {manager.directory} is of family {meta.get('family')!r}, "
                f"the config's is {config.family!r}: use another --workdir"
            )
        stage_index, stage_step = locate(stages, step)
        params_target = nnx.to_pure_dict(
            jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                layout.abstract_params,
                layout.param_shardings,
            )
        )
        ckpt.check_params_fit(manager, step, ckpt.shapes_of(params_target))
        opt_target = None
        if stage_step > 0 and stage_index < len(stages):
            stage = stages[stage_index]
            tx = make_optimizer(config.optimizer, stage, family.weight_decay_rule)
            sl = stage_layout(layout, stage, tx, mesh, use_ema=use_ema)
            opt_target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                sl.abstract_state.opt_state,
                sl.shardings.opt_state,
            )
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        train_target = {
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
            "skipped_steps": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        }
        restored = ckpt.restore(
            manager,
            step,
            params_target=params_target,
            opt_state_target=opt_target,
            ema_target=params_target if use_ema else None,
            train_target=train_target,
            with_data=stage_step > 0,
        )
        params = _pure_to_state(layout, restored["params"])
        ema = _pure_to_state(layout, restored["ema"]) if "ema" in restored else None
        if use_ema and ema is None:
            ema = jax.tree.map(jnp.copy, params)
        return {
            "global_step": step,
            "stage_index": stage_index,
            "params": params,
            "ema": ema,
            "opt_state": restored.get("opt_state"),
            "data_state": restored.get("data_iter"),
            "skipped_steps": int(jax.device_get(restored["train"]["skipped_steps"])),
        }

    found = ckpt.restore_newest_valid(manager, attempt)
    if found is None:
        return empty
    step, result = found
    log.info("resumed from checkpoint %d (stage index %d)", step, result["stage_index"])
    return result


def _pure_to_state(layout, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, layout.abstract_params)
    nnx.replace_by_pure_dict(state, pure)
    return state


def main_entry(config, workdir) -> int:
    try:
        train_and_evaluate(config, workdir)
    except TrainingStopped as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
