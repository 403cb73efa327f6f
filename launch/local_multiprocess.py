"""Runs N JAX processes of the trainer on this machine, as a TPU pod runs one per host.

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \
        --config tests/configs/toy.py --workdir /tmp/mp --config.mesh.data=2 --config.mesh.fsdp=4

Every process runs ``python -m unified_mm.main <args> --distributed --coordinator localhost:PORT
--num_processes N --process_id i`` on CPU with ``devices_per_process`` fake devices; collectives
go over gloo (jax_scaling.md 3.2). Output lines are streamed with a ``[pI]`` prefix. If one
process fails the others are stopped, and the exit status is the first non-zero one.
``launch_local`` is the importable form (the multi-process tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int
    output: str  # everything the process printed (stdout and stderr interleaved)


def free_port() -> int:
    """An unused localhost TCP port for the coordinator (portpicker when installed)."""
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]


def process_command(
    args: Sequence[str], *, process_id: int, num_processes: int, port: int, module: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        module,
        *args,
        "--distributed",
        f"--coordinator=localhost:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
    ]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    # gloo is the CPU default in jax 0.10-0.12; explicit so a changed default cannot break runs.
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_local(
    args: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    module: str = "unified_mm.main",
    timeout: float = 600.0,
    env: dict | None = None,
    stream: bool = True,
) -> list[ProcessResult]:
    """Starts ``num_processes`` copies of ``python -m module args`` and waits for all of them.

    Returns one ProcessResult per process (in process order). A process that has not finished
    after ``timeout`` seconds, or that outlives a failed sibling by 30 s, is killed (status -9).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"num_processes and devices_per_process must be >= 1, got {num_processes}, "
            f"{devices_per_process}"
        )
    port = free_port()
    child_env = process_env(devices_per_process, env)
    procs = []
    outputs: list[list[str]] = [[] for _ in range(num_processes)]
    lock = threading.Lock()

    def pump(i: int, pipe) -> None:
        for line in iter(pipe.readline, ""):
            outputs[i].append(line)
            if stream:
                with lock:
                    sys.stdout.write(f"[p{i}] {line}")
                    sys.stdout.flush()
        pipe.close()

    threads = []
    for i in range(num_processes):
        cmd = process_command(
            args, process_id=i, num_processes=num_processes, port=port, module=module
        )
        p = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(p)
        t = threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
        t.start()
        threads.append(t)

    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now  # a sibling failed: the rest would block in a collective
        if now > deadline or (failed_at is not None and now - failed_at > 30):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    for t in threads:
        t.join(timeout=5)
    return [ProcessResult(i, p.returncode, "".join(outputs[i])) for i, p in enumerate(procs)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--num_processes N] [--devices_per_process D] -- <unified_mm.main args>",
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--module", default="unified_mm.main", help="python -m target")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before killing")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments after --")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    try:
        results = launch_local(
            args,
            num_processes=ns.num_processes,
            devices_per_process=ns.devices_per_process,
            module=ns.module,
            timeout=ns.timeout,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    codes = [r.returncode for r in results]
    print(f"[local_multiprocess] exit codes {codes}", flush=True)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
