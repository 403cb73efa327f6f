"""Timing harness of the benchmarks: compile counting, synchronised timed calls, this CPU's
fp32 matmul peak and achieved rates. Times are taken after the first (compiling) call; every call
is synchronised with ``block_until_ready``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class CompileCounter:
    """Counts XLA backend compilations (to prove that timed calls never recompile)."""

    _installed: CompileCounter | None = None

    def __init__(self):
        self.count = 0

    @classmethod
    def get(cls) -> CompileCounter:
        if cls._installed is None:
            import jax

            counter = cls()

            def listener(event: str, duration: float, **_):
                if event == "/jax/core/compile/backend_compile_duration":
                    counter.count += 1

            jax.monitoring.register_event_duration_secs_listener(listener)
            cls._installed = counter
        return cls._installed


def time_calls(fn: Callable[[], object], iters: int, counter: CompileCounter) -> dict:
    """Runs ``fn`` once (compile) and ``iters`` more times; seconds per call."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    before = counter.count
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "first_call_s": first,
        "iters": len(times),
        "recompiles": counter.count - before,
    }


def cpu_fp32_matmul_peak(sizes=(512, 1024, 2048)) -> dict:
    """Best fp32 GFLOP/s of a jitted square matmul (this CPU's practical peak, for reference)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    best, best_n = 0.0, 0
    rng = np.random.default_rng(0)
    for n in sizes:
        a = jnp.asarray(rng.standard_normal((n, n), np.float32))
        b = jnp.asarray(rng.standard_normal((n, n), np.float32))
        f = jax.jit(jnp.dot)
        f(a, b).block_until_ready()
        reps = max(2, int(2e9 / (2 * n**3)))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = f(a, b)
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / reps)
        g = 2 * n**3 / min(times) / 1e9
        if g > best:
            best, best_n = g, n
    return {"gflops": best, "n": best_n}


def with_rates(t: dict, gflop: float, **per_call: float) -> dict:
    out = dict(t)
    out["gflop_per_call"] = gflop
    out["gflops_achieved"] = gflop / t["median_s"]
    for name, count in per_call.items():
        out[name] = count / t["median_s"]
    return out
