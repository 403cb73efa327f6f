"""Ahead-of-time compilation of the real training step for a Cloud TPU topology, on a CPU host.

    python -m unified_mm.tools.aot_compile --config configs/harmon_1p5b.py --topology v5p-64
    python -m unified_mm.tools.aot_compile --config configs/harmon_0p5b.py --topology v6e-64 \
        --stage hires --per_chip_batch 10
    python -m unified_mm.tools.aot_compile --config configs/harmon_1p5b.py --topology v5e-256 \
        --num_slices 2 --find_max_batch

Needs the pip libtpu wheel (``pip install -e '.[tpu]'``), not TPU hardware. For each stage it
builds abstract TPU devices (``jax.experimental.topologies``), the training mesh with the
trainer's ``build_mesh``, the stage's abstract ``TrainState`` and batch with the trainer's own
layout, optimizer and step (``train/init.py``, ``train/step.py``), then ``jit(...).lower().compile()``
and reports per chip: memory (arguments, temporaries, total against HBM), the analytic FLOPs per
step (the family's ``flops_per_example``; XLA's cost analysis counts a scanned layer once), and a
roofline estimate of the step time and MFU.

``--per_chip_batch N`` sets the examples per chip (in the stage's task ratio, so N must be a
multiple of the ratio's sum, e.g. 5 for 1:4); ``--find_max_batch`` searches the largest N that
compiles (doubling, then bisection on compile-time out-of-memory). Exit status: 0 when every
compiled stage fits, 1 when one does not (with the compiler's message), 2 for bad arguments.
Compile-time XLA/libtpu flags (``LIBTPU_INIT_ARGS``) must match the run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

GIB = 1 << 30


def compile_only_environment() -> None:
    """AOT never executes anything: keep JAX off any accelerator (and libtpu off a real TPU), and
    let several compiles (or a compile beside a training run) load libtpu at once, since only its
    compiler is used, never the device its lockfile protects. Call before JAX starts a backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):.2f} MiB"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-4 else f"{s * 1e6:.2f} us"


class DoesNotFit(Exception):
    """The step needs more memory than the chip has (compile-time RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class Report:
    """One compiled (or failed) stage; every number is per chip unless named global."""

    config: str
    stage: str
    topology: str
    num_slices: int
    chips: int
    mesh: dict
    task_batch: dict  # global examples per task
    per_chip_batch: float
    fits: bool
    error: str | None = None
    compile_seconds: float = 0.0  # lowering included
    lower_seconds: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)  # bytes
    hbm_bytes: float = 0.0
    params: int = 0
    trainable_params: int = 0
    flops_per_step: float = 0.0  # global, analytic, model FLOPs
    flops_per_chip: float = 0.0
    roofline: dict = dataclasses.field(default_factory=dict)
    search: list = dataclasses.field(default_factory=list)  # (per_chip, fits) tried
    search_exact: bool = True  # False: the next size up was not compiled (--max_compiles)
    check_only: bool = False  # memory from XLA's buffer assignment; code generation skipped

    def summary(self) -> str:
        tb = " + ".join(f"{t} {n // max(self.chips, 1)}" for t, n in self.task_batch.items())
        head = (
            f"[{self.stage}] {self.topology} x{self.num_slices} mesh {self.mesh}: per-chip batch "
            f"{self.per_chip_batch:g} ({tb}), global {sum(self.task_batch.values())}"
        )
        if not self.fits:
            return f"{head}\n  DOES NOT FIT: {self.error}"
        m = self.memory
        r = self.roofline
        if self.check_only:
            return "\n".join(
                [
                    head,
                    f"  fits (check only, {self.compile_seconds:.0f} s): buffer assignment needs "
                    f"{fmt_bytes(m['temp'])} of temporaries; arguments {fmt_bytes(m['argument'])} "
                    f"-> {fmt_bytes(m['total'])} of {self.hbm_bytes / GIB:.0f} GiB HBM "
                    "(code size and the backend's final temporaries not included)",
                    f"  analytic FLOPs: {self.flops_per_step / 1e12:.4g} TFLOP per step, "
                    f"{self.flops_per_chip / 1e12:.4g} TFLOP per chip",
                ]
            )
        return "\n".join(
            [
                head,
                f"  params {self.params / 1e9:.3f}B ({self.trainable_params / 1e9:.3f}B trainable); "
                f"lowered in {self.lower_seconds:.1f} s, compiled in {self.compile_seconds:.1f} s",
                f"  memory per chip: arguments {fmt_bytes(m['argument'])}, temporaries "
                f"{fmt_bytes(m['temp'])}, outputs {fmt_bytes(m['output'])} (aliased "
                f"{fmt_bytes(m['alias'])}), code {fmt_bytes(m['generated_code'])} -> total "
                f"{fmt_bytes(m['total'])} of {self.hbm_bytes / GIB:.0f} GiB HBM "
                f"({100 * m['total'] / self.hbm_bytes:.1f}%)",
                f"  analytic FLOPs: {self.flops_per_step / 1e12:.4g} TFLOP per step, "
                f"{self.flops_per_chip / 1e12:.4g} TFLOP per chip",
                f"  roofline (perfect overlap): compute {fmt_seconds(r['compute_s'])}, HBM "
                f"{fmt_seconds(r['hbm_s'])}, ICI {fmt_seconds(r['ici_s'])}, DCN "
                f"{fmt_seconds(r['dcn_s'])} -> step >= {fmt_seconds(r['step_s'])}, "
                f"MFU <= {100 * r['mfu']:.0f}%",
            ]
        )

    def markdown_row(self) -> str:
        tb = "+".join(str(n // max(self.chips, 1)) for n in self.task_batch.values())
        if not self.fits:
            return f"| {self.config} | {self.stage} | {self.topology} | {tb} | - | does not fit | | | | |"
        m, r = self.memory, self.roofline
        return (
            f"| {self.config} | {self.stage} | {self.topology}"
            f"{f' x{self.num_slices}' if self.num_slices > 1 else ''} | "
            f"{self.per_chip_batch:g} ({tb}) | {sum(self.task_batch.values())} | "
            f"{m['argument'] / GIB:.1f} | {m['temp'] / GIB:.1f} | "
            f"{m['total'] / GIB:.1f} / {self.hbm_bytes / GIB:.0f} | "
            f"{self.flops_per_chip / 1e12:.1f} | {r['step_s']:.2f} | {100 * r['mfu']:.0f}% |"
        )


MARKDOWN_HEADER = (
    "| config | stage | topology | per-chip batch (task split) | global batch | args GiB | "
    "temps GiB | total / HBM GiB | TFLOP/chip/step | roofline step s | roofline MFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


# ----------------------------------------------------------------------------- batch sizes
def task_ratio(task_batch: Mapping[str, int]) -> dict[str, int]:
    """The smallest integer batch in the stage's task proportions, e.g. {i2t: 1, t2i: 4}."""
    g = math.gcd(*task_batch.values())
    return {t: n // g for t, n in task_batch.items()}


def scaled_task_batch(task_batch: Mapping[str, int], per_chip: int, chips: int) -> dict[str, int]:
    """Global per-task batch with ``per_chip`` examples per chip in the stage's task ratio."""
    unit = task_ratio(task_batch)
    total = sum(unit.values())
    if per_chip <= 0 or per_chip % total:
        raise ValueError(
            f"per-chip batch {per_chip} must be a positive multiple of {total}: the stage's task "
            f"ratio is {unit}"
        )
    k = per_chip // total
    return {t: k * u * chips for t, u in unit.items()}


# ----------------------------------------------------------------------------- roofline
def roofline(
    *,
    flops_per_chip: float,
    memory: Mapping[str, float],
    param_bytes: float,
    trainable_bytes: float,
    mesh_shape: Mapping[str, int],
    num_slices: int,
    chip,
    remat: bool,
) -> dict[str, float]:
    """Lower bounds on the step time from compute, HBM traffic and FSDP/DP collectives.

    compute: analytic model FLOPs (x4/3 with full remat: the forward runs twice) at peak bf16;
    HBM: arguments read + outputs written + temporaries written and read once;
    ICI: FSDP all-gathers every parameter twice (forward, backward) and reduce-scatters the
    trainable gradients over the fsdp axis, plus a gradient all-reduce over ICI data replicas;
    DCN: the gradient-shard all-reduce across slices. The step is the largest (perfect overlap),
    so the MFU is an upper bound.
    """
    peak = chip.peak_tflops * 1e12
    f, t = mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1)
    d_ici = max(mesh_shape.get("data", 1) // num_slices, 1)
    model_s = flops_per_chip / peak
    compute_s = model_s * (4.0 / 3.0 if remat else 1.0)
    hbm_s = (memory["argument"] + memory["output"] + 2 * memory["temp"]) / (
        chip.hbm_bandwidth_gbps * 1e9
    )
    shard = (f - 1) / f if f > 1 else 0.0
    ici_bytes = (2 * param_bytes * shard + trainable_bytes * shard) / t
    ici_bytes += 2 * trainable_bytes / (f * t) * (d_ici - 1) / d_ici
    ici_s = ici_bytes / (chip.ici_bandwidth_gbps * 1e9)
    dcn_bytes = 2 * trainable_bytes / (f * t) * (num_slices - 1) / num_slices
    dcn_s = dcn_bytes / (chip.dcn_bandwidth_gbps * 1e9)
    step_s = max(compute_s, hbm_s, ici_s, dcn_s, 1e-12)
    return dict(
        compute_s=compute_s,
        hbm_s=hbm_s,
        ici_s=ici_s,
        dcn_s=dcn_s,
        step_s=step_s,
        mfu=model_s / step_s,
    )


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "exceeds available HBM" in s


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    oom = [ln for ln in lines if "memory" in ln.lower() or "RESOURCE_EXHAUSTED" in ln]
    return (oom or lines or [type(e).__name__])[0][:400]


# ----------------------------------------------------------------------------- compile
def remat_anywhere(node) -> bool:
    """Whether a model config turns remat on at any level: Harmon's ``model.remat``, VQRAE's
    ``tokenizer.encoder.remat`` / ``tokenizer.decoder.remat``. The roofline then takes the whole
    forward as recomputed (x4/3), an overestimate where only some stacks are."""
    if not hasattr(node, "keys"):
        return False
    return any(
        (key == "remat" and bool(value)) or remat_anywhere(value) for key, value in node.items()
    )


def portable_config(config):
    """An unlocked copy; a tokenizer file that is absent here is dropped.

    Token ids do not change any shape of the compiled step, and the families keep the official
    special ids when no tokenizer file is given (the paper configs name Qwen2.5's).
    """
    config = config.copy_and_resolve_references()
    tok = config.get("data", {}).get("tokenizer", None) if "data" in config else None
    path = tok.get("path", "") if tok is not None else ""
    if path and not os.path.exists(path):
        print(f"note: tokenizer file {path!r} is absent here; compiling without it", flush=True)
        tok.path = ""
    return config


_RUN_VALUE_FLAGS = {"stage", "per_chip_batch", "max_per_chip_batch", "max_compiles", "json_out"}
_RUN_BOOL_FLAGS = {"find_max_batch", "markdown", "check_only"}


def child_argv(argv: Sequence[str]) -> list[str]:
    """This tool's arguments (program name excluded) without the flags that choose what one run
    compiles, reports or writes: a check-only child gets its own ``--stage``/``--per_chip_batch``."""
    out, it = [], iter(argv)
    for a in it:
        if a.startswith("-"):
            name = a.lstrip("-").partition("=")[0]
            if name in _RUN_VALUE_FLAGS:
                if "=" not in a:  # "--flag value"
                    next(it, None)
                continue
            if name in _RUN_BOOL_FLAGS or name.removeprefix("no") in _RUN_BOOL_FLAGS:
                continue
        out.append(a)
    return out


def buffer_assignment_check(
    argv: Sequence[str], stage: str, per_chip: int, timeout: float = 7200.0
) -> tuple[bool, float, str | None]:
    """(fits, temporaries in bytes, error) of one compile, stopped after buffer assignment.

    XLA:TPU decides whether a program fits right after buffer assignment (an out-of-memory
    compile fails there); for a large model the TPU code generation that follows takes 10-30
    minutes on a small host. This compiles in a child process with XLA's dump of the train step
    on, reads the buffer assignment's memory report and stops the child as soon as the dump shows
    that buffer assignment passed (or failed). The temporaries are the buffer assignment's; the
    finished program's can be somewhat larger (measured +29% on the Harmon smoke config).
    """
    import glob
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aot_check_") as d:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "")
            + f" --xla_dump_to={d} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE"
            + " --xla_dump_hlo_module_re=.*step_fn.*"
        ).strip()
        cmd = [sys.executable, "-m", "unified_mm.tools.aot_compile", *argv]
        cmd += [f"--stage={stage}", f"--per_chip_batch={per_chip}"]
        log_path = os.path.join(d, "child.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            passed = failed = False
            while proc.poll() is None and time.monotonic() < deadline:
                passed = bool(
                    glob.glob(f"{d}/*step_fn*after_optimizations_after_buffer_assignment*")
                )
                failed = bool(glob.glob(f"{d}/*step_fn*oom_intermediate_module*"))
                if passed or failed:
                    break
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        reports = glob.glob(f"{d}/*step_fn*after_optimizations-memory-usage-report.txt")
        out = open(log_path).read()
        if not reports:
            tail = "\n".join(out.strip().splitlines()[-15:])
            raise RuntimeError(f"check-only compile stopped before buffer assignment:\n{tail}")
        with open(reports[0]) as f:
            m = re.search(r"Total bytes: (\d+)", f.read())
        temp = float(m.group(1)) if m else 0.0
        if passed or proc.returncode == 0:
            return True, temp, None
        lines = [
            ln[ln.index("RESOURCE_EXHAUSTED") :]
            for ln in out.splitlines()
            if "RESOURCE_EXHAUSTED" in ln
        ]
        return False, temp, (lines[0][:400] if lines else "out of memory at buffer assignment")


class StageCompiler:
    """Everything of one config on one topology that does not depend on the batch size."""

    def __init__(self, config, topo, devices, config_name: str = "", check_argv=None):
        """check_argv: this tool's arguments for check-only compiles in a child process (see
        ``buffer_assignment_check``); None compiles fully in this process."""
        import jax
        import numpy as np

        from unified_mm import families
        from unified_mm.parallel.mesh import build_mesh
        from unified_mm.parallel.sharding import rules_from_config
        from unified_mm.train.init import model_layout
        from unified_mm.train.stages import stages_from_config

        self.config = config
        self.config_name = config_name
        self.check_argv = check_argv
        self.topo = topo
        self.family = families.build(config)
        self.stages = stages_from_config(config)
        self.mesh = build_mesh(config.mesh, devices)
        self.rules = rules_from_config(config.sharding_rules)
        self.layout = model_layout(self.family, self.mesh, self.rules)
        self.use_ema = float(config.ema.decay) > 0
        leaves = jax.tree.leaves(self.layout.abstract_params)
        self.params = sum(int(np.prod(x.shape)) for x in leaves)
        self.param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)

    def stage(self, name: str):
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage {name!r}; the config has {[s.name for s in self.stages]}")

    def compile(self, stage, task_batch: Mapping[str, int]) -> Report:
        """Compiles ``stage`` with the global ``task_batch``; OOM gives a Report with fits=False."""
        import jax
        import numpy as np
        from flax import nnx

        from unified_mm.config.validation import validate_config
        from unified_mm.parallel.sharding import batch_sharding
        from unified_mm.train.init import stage_layout
        from unified_mm.train.optimizer import make_optimizer
        from unified_mm.train.step import StepOptions, make_train_step

        stage = dataclasses.replace(stage, task_batch=dict(task_batch))
        validate_config(self.config, self.family, [stage], self.mesh)
        chips = self.mesh.size
        report = Report(
            config=self.config_name,
            stage=stage.name,
            topology=self.topo.name,
            num_slices=self.topo.num_slices,
            chips=chips,
            mesh=dict(self.mesh.shape),
            task_batch=dict(stage.task_batch),
            per_chip_batch=stage.global_batch / chips,
            fits=False,
            hbm_bytes=self.topo.chip.hbm_gib * GIB,
            params=self.params,
        )
        # The trainer's own pieces, exactly as train.py assembles them.
        tx = make_optimizer(self.config.optimizer, stage, self.family.weight_decay_rule)
        sl = stage_layout(self.layout, stage, tx, self.mesh, use_ema=self.use_ema)
        trainable = jax.tree.leaves(sl.abstract_state.trainable)
        report.trainable_params = sum(int(np.prod(x.shape)) for x in trainable)
        trainable_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in trainable)
        abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            sl.abstract_state,
            sl.shardings,
        )
        bsh = batch_sharding(self.mesh)
        abstract_batch = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bsh),
            self.family.abstract_batch(stage, stage.task_batch),
        )
        if self.check_argv is not None:
            return self._check(report, stage, abstract_state, abstract_batch, trainable_bytes)
        step = make_train_step(
            self.family,
            sl.graphdef,
            stage,
            tx,
            StepOptions(float(self.config.ema.decay), ()),
            microbatch_sharding=None,
        )
        jitted = jax.jit(
            step,
            in_shardings=(sl.shardings, bsh),
            out_shardings=(sl.shardings, None),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        try:
            # The logical-axis rules must be active while the step is traced: the models' activation
            # constraints (nn.with_logical_constraint) are no-ops without them, and the partitioner
            # then replicates activations over the batch axes (measured: 26.4 -> 2.7 GiB of
            # temporaries per chip, Harmon-0.5B align on v5p-64 at 5 examples per chip).
            with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
                lowered = jitted.lower(abstract_state, abstract_batch)
                report.lower_seconds = time.perf_counter() - t0
                compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - only compile-time OOM is an expected outcome
            if not is_oom(e):
                raise
            report.compile_seconds = time.perf_counter() - t0
            report.error = _first_line(e)
            return report
        report.compile_seconds = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        mem = dict(
            argument=float(ma.argument_size_in_bytes),
            output=float(ma.output_size_in_bytes),
            alias=float(ma.alias_size_in_bytes),
            temp=float(ma.temp_size_in_bytes),
            generated_code=float(ma.generated_code_size_in_bytes),
        )
        mem["total"] = (
            mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
        )
        report.memory = mem
        report.flops_per_step = self.family.flops_per_step(stage)
        report.flops_per_chip = report.flops_per_step / chips
        report.roofline = self._roofline(report.flops_per_chip, mem, trainable_bytes)
        report.fits = mem["total"] <= report.hbm_bytes
        if not report.fits:
            report.error = (
                f"needs {mem['total'] / GIB:.2f} GiB per chip, the chip has "
                f"{report.hbm_bytes / GIB:.0f} GiB"
            )
        return report

    def _roofline(
        self, flops_per_chip: float, memory: Mapping, trainable_bytes: int
    ) -> dict[str, float]:
        return roofline(
            flops_per_chip=flops_per_chip,
            memory=memory,
            param_bytes=self.param_bytes,
            trainable_bytes=trainable_bytes,
            mesh_shape=dict(self.mesh.shape),
            num_slices=self.topo.num_slices,
            chip=self.topo.chip,
            remat=remat_anywhere(self.config.get("model", {})),
        )

    def _check(self, report, stage, abstract_state, abstract_batch, trainable_bytes) -> Report:
        """Check-only compile: memory from XLA's buffer assignment, code generation skipped."""
        import jax

        per_chip = stage.global_batch // self.mesh.size
        t0 = time.perf_counter()
        fits, temp, error = buffer_assignment_check(self.check_argv, stage.name, per_chip)
        report.compile_seconds = time.perf_counter() - t0
        report.check_only = True
        args = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves((abstract_state, abstract_batch))
        )
        state_bytes = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(abstract_state)
        )
        # the donated state comes back as the (aliased) output
        report.memory = dict(
            argument=float(args),
            output=float(state_bytes),
            alias=float(state_bytes),
            temp=temp,
            generated_code=0.0,
        )
        report.memory["total"] = args + temp
        report.flops_per_step = self.family.flops_per_step(stage)
        report.flops_per_chip = report.flops_per_step / self.mesh.size
        report.fits = fits and report.memory["total"] <= report.hbm_bytes
        report.error = error
        report.roofline = self._roofline(report.flops_per_chip, report.memory, trainable_bytes)
        if fits and not report.fits:
            report.error = (
                f"needs {report.memory['total'] / GIB:.2f} GiB per chip, the chip has "
                f"{report.hbm_bytes / GIB:.0f} GiB"
            )
        return report

    def find_max_batch(self, stage, limit: int, max_compiles: int = 0) -> Report:
        """Largest per-chip batch (in task-ratio units) that compiles within HBM.

        Memory grows about linearly with the batch, so after two sizes the next guess is the
        linear prediction of the largest fitting one (then one unit more to confirm), falling
        back to bisection; a search usually takes four compiles. ``max_compiles`` (0: no limit)
        stops early: the report's ``search_exact`` then says the next size up was not tried.
        """
        unit = sum(task_ratio(stage.task_batch).values())
        chips = self.mesh.size
        kmax = max(limit // unit, 1)
        fitted: dict[int, Report] = {}
        tried: list[tuple[int, bool]] = []

        def attempt(k: int) -> Report:
            r = self.compile(stage, scaled_task_batch(stage.task_batch, k * unit, chips))
            tried.append((k * unit, r.fits))
            if r.fits:
                fitted[k] = r
            print(
                f"  [{stage.name}] per-chip {k * unit}: "
                + (f"fits, {r.memory['total'] / GIB:.2f} GiB" if r.fits else "does not fit")
                + f" ({r.compile_seconds:.0f} s)",
                flush=True,
            )
            return r

        def predicted(lo: int) -> int:
            (k1, r1), (k2, r2) = sorted(fitted.items())[-2:]
            slope = (r2.memory["total"] - r1.memory["total"]) / (k2 - k1)
            if slope <= 0:
                return 2 * lo
            room = 0.98 * r2.hbm_bytes - r2.memory["total"]
            return k2 + int(room // slope)

        first = attempt(1)
        if not first.fits:
            first.search, first.search_exact = tried, True
            return first
        lo, hi = 1, None
        while (hi is None and lo < kmax) or (hi is not None and hi - lo > 1):
            if max_compiles and len(tried) >= max_compiles:
                break
            if hi is None:
                guess = 2 * lo if len(fitted) < 2 else max(lo + 1, predicted(lo))
                guess = min(guess, kmax)
            else:
                guess = (lo + hi) // 2
            if attempt(guess).fits:
                lo = guess
            else:
                hi = guess
        best = fitted[lo]
        best.search = tried
        best.search_exact = (hi == lo + 1) or lo == kmax
        return best


def run(
    config,
    topology: str,
    *,
    num_slices: int | None = None,
    stages: Sequence[str] = (),
    per_chip_batch: int = 0,
    find_max: bool = False,
    max_per_chip: int = 1024,
    max_compiles: int = 0,
    config_name: str = "",
    check_argv: Sequence[str] | None = None,
) -> list[Report]:
    """Compiles the requested stages; returns one Report per stage.

    check_argv: check-only compiles (``buffer_assignment_check``), each in a child process run
    with these arguments of this tool; None compiles fully here.
    """
    compile_only_environment()
    from unified_mm.parallel.topologies import parse_topology, topology_devices

    topo = parse_topology(topology, num_slices)
    devices = topology_devices(topo)
    config = portable_config(config)
    if int(config.mesh.get("num_slices", 1)) != topo.num_slices:
        print(f"note: mesh.num_slices set to {topo.num_slices} for this topology", flush=True)
        config.mesh.num_slices = topo.num_slices
    compiler = StageCompiler(config, topo, devices, config_name, check_argv)
    print(
        f"{topo.describe()}: {topo.chip.hbm_gib:g} GiB HBM and {topo.chip.peak_tflops:g} bf16 "
        f"TFLOP/s per chip; mesh {dict(compiler.mesh.shape)}; "
        f"{compiler.params / 1e9:.3f}B parameters",
        flush=True,
    )
    names = list(stages) or [s.name for s in compiler.stages]
    reports = []
    for name in names:
        stage = compiler.stage(name)
        if find_max:
            r = compiler.find_max_batch(stage, max_per_chip, max_compiles)
        elif per_chip_batch:
            r = compiler.compile(
                stage, scaled_task_batch(stage.task_batch, per_chip_batch, compiler.mesh.size)
            )
        else:
            r = compiler.compile(stage, stage.task_batch)
        print(r.summary(), flush=True)
        reports.append(r)
    return reports


def define_flags() -> dict:
    """The command-line flags; defined only when run as a program, so importing this module (tests,
    other tools) never clashes with another tool's ``--config``."""
    f = dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "Experiment config file (configs/<exp>.py[:arg]).", lock_config=True
        ),
        topology=flags.DEFINE_string("topology", None, "v4-32, v5p-64, v5e-256, 2xv5e-256..."),
        num_slices=flags.DEFINE_integer(
            "num_slices", None, "Slices over DCN (overrides the name)."
        ),
        stage=flags.DEFINE_list("stage", [], "Stage name(s); default: every stage of the config."),
        per_chip_batch=flags.DEFINE_integer(
            "per_chip_batch", 0, "Examples per chip per step (0: the config's batch)."
        ),
        find_max_batch=flags.DEFINE_bool("find_max_batch", False, "Search the largest batch."),
        max_per_chip_batch=flags.DEFINE_integer("max_per_chip_batch", 1024, "Search bound."),
        max_compiles=flags.DEFINE_integer(
            "max_compiles", 0, "Stop the batch search after this many compiles (0: until exact)."
        ),
        json_out=flags.DEFINE_string("json_out", None, "Write the reports (a JSON list) here."),
        markdown=flags.DEFINE_bool("markdown", False, "Also print markdown table rows."),
        check_only=flags.DEFINE_bool(
            "check_only",
            False,
            "Stop each compile once XLA's buffer assignment has decided whether it fits (a "
            "child process per compile; minutes instead of the full TPU code generation).",
        ),
    )
    flags.mark_flags_as_required(["config", "topology"])
    return f


def main(argv, f: dict) -> int:
    del argv
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        reports = run(
            f["config"].value,
            f["topology"].value,
            num_slices=f["num_slices"].value,
            stages=f["stage"].value,
            per_chip_batch=f["per_chip_batch"].value,
            find_max=f["find_max_batch"].value,
            max_per_chip=f["max_per_chip_batch"].value,
            max_compiles=f["max_compiles"].value,
            config_name=name,
            check_argv=child_argv(sys.argv[1:]) if f["check_only"].value else None,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if f["markdown"].value:
        print(MARKDOWN_HEADER)
        for r in reports:
            print(r.markdown_row())
    if f["json_out"].value:
        with open(f["json_out"].value, "w") as fh:
            json.dump([dataclasses.asdict(r) for r in reports], fh, indent=1)
    bad = [r for r in reports if not r.fits]
    for r in bad:
        print(
            f"error: stage {r.stage!r} does not fit on {r.topology} at per-chip batch "
            f"{r.per_chip_batch:g}: {r.error}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    compile_only_environment()
    _FLAGS = define_flags()
    app.run(lambda argv: sys.exit(main(argv, _FLAGS)))
