"""Metric writers (clu: TensorBoard event files plus a readable log line), MFU, step timing."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger("unified_mm")

# Peak dense bf16 TFLOP/s per chip (vendor figures; MaxText docs for v5p/v6e). CPU is excluded:
# MFU is reported only where a peak is known.
CHIP_PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "TPU7x": 2307.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}

# HBM per chip in GiB, for the AOT memory report.
CHIP_HBM_GIB: dict[str, float] = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,
    "TPU v5e": 16.0,
    "TPU v5": 95.0,
    "TPU v5p": 95.0,
    "TPU v6 lite": 32.0,
    "TPU v6e": 32.0,
    "TPU7x": 192.0,
}


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 TFLOP/s of ``device`` (the first local device by default), or None if unknown."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    if kind in CHIP_PEAK_TFLOPS:
        return CHIP_PEAK_TFLOPS[kind]
    for name, peak in CHIP_PEAK_TFLOPS.items():
        if kind.startswith(name):
            return peak
    return None


def mfu(
    flops_per_step: float, step_seconds: float, num_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation: analytic FLOPs / (time x devices x peak); None without a peak."""
    if not peak or step_seconds <= 0 or flops_per_step <= 0:
        return None
    return flops_per_step / (step_seconds * num_devices * peak * 1e12)


def create_writer(workdir: str, *, asynchronous: bool = True):
    """clu's default writer (TensorBoard summaries on process 0, log lines everywhere) plus a
    ``metrics.jsonl`` of every scalar row on process 0, for scripts and tests."""
    from clu import metric_writers

    from unified_mm.train.jsonl_writer import JsonlWriter

    default = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=asynchronous
    )
    if jax.process_index() > 0:
        return default
    return metric_writers.MultiWriter(
        [default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    )


def to_scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size == 1:
            out[k] = float(a.reshape(()))
    return out


class StepTimer:
    """Wall time per step and time spent waiting for data, excluding the compile step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps = 0
        self.data_seconds = 0.0
        self.start = time.perf_counter()

    def add_data_wait(self, seconds: float):
        self.data_seconds += seconds

    def tick(self):
        self.steps += 1

    def summary(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        if self.steps == 0:
            return {}
        return {
            "perf/step_seconds": elapsed / self.steps,
            "perf/data_wait_fraction": self.data_seconds / max(elapsed, 1e-9),
        }


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
