"""Train on Cloud TPU: create (or reuse) a TPU VM slice, install unified_mm on every worker, start
the same ``python -m unified_mm.main --distributed`` on all workers, stream logs, stop, delete.

    # everything at once: create or reuse, install, start, follow worker 0's log
    python launch/tpu.py run --name harmon --zone us-east5-a --topology v5p-64 \
        --config configs/harmon_1p5b.py --workdir gs://BUCKET/harmon_1p5b -- --config.seed=1
    # multi-slice (queued resources, DCN data parallelism): 2 x v5e-256
    python launch/tpu.py run --name h2 --zone us-west4-a --topology v5e-256 --num_slices 2 ...
    # the steps one by one
    python launch/tpu.py up|install|train|logs|stop|down --name harmon --zone ... --topology ...

``--dry-run`` prints every command (one per line, prefixed by ``+``) without running any.
``stop`` sends SIGTERM: the trainer saves a checkpoint at the next step boundary and exits, and
``train`` with the same work directory resumes from it. The work directory must be a ``gs://``
bucket that every worker can write (Orbax writes one checkpoint from all hosts).
Needs the Google Cloud CLI (``gcloud``) authenticated for the project.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_topologies():
    # Loaded by path so the launcher runs where unified_mm (and JAX) are not installed.
    import importlib.util

    path = os.path.join(REPO_ROOT, "unified_mm", "parallel", "topologies.py")
    spec = importlib.util.spec_from_file_location("_unified_mm_topologies", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


_topologies = _load_topologies()
Topology, parse_topology = _topologies.Topology, _topologies.parse_topology

REMOTE_DIR = "~/unified_mm"
REMOTE_VENV = "~/unified_mm_venv"
REMOTE_LOG = "~/unified_mm_train.log"
REMOTE_PID = "~/unified_mm_train.pid"
SOURCE_TARBALL = "/tmp/unified_mm_src.tgz"


class Runner:
    """Prints each command; runs it unless dry_run. ``check`` turns a failure into an exit."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: Sequence[str], *, check: bool = True, quiet: bool = False) -> int:
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0
        result = subprocess.run(list(cmd), stdout=subprocess.DEVNULL if quiet else None)
        if check and result.returncode != 0:
            raise SystemExit(f"error: command failed with status {result.returncode}: {cmd[0]} ...")
        return result.returncode

    def output(self, cmd: Sequence[str]) -> tuple[int, str]:
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0, ""
        r = subprocess.run(list(cmd), capture_output=True, text=True)
        return r.returncode, r.stdout.strip()


def _gcloud(args, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def node_names(args, topo: Topology) -> list[str]:
    """TPU VM names: the slice itself, or <name>-<i> for the slices of a queued resource."""
    if topo.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(topo.num_slices)]


def ssh_all(args, node: str, command: str) -> list[str]:
    return [*_gcloud(args, "tpu-vm", "ssh", node), "--worker=all", f"--command={command}"]


# ------------------------------------------------------------------------------------ steps
def up(args, topo: Topology, run: Runner) -> None:
    """Creates the slice(s) unless they exist (reuse)."""
    version = args.runtime_version or topo.chip.runtime_version
    capacity = ["--spot"] if args.spot else (["--reserved"] if args.reserved else [])
    if topo.num_slices == 1:
        rc, _ = run.output(
            [*_gcloud(args, "tpu-vm", "describe", args.name), "--format=value(state)"]
        )
        if rc == 0 and not run.dry_run:
            print(f"[tpu] reusing existing TPU VM {args.name}", flush=True)
            return
        run(
            [
                *_gcloud(args, "tpu-vm", "create", args.name),
                f"--accelerator-type={topo.accelerator_type}",
                f"--version={version}",
                *capacity,
            ]
        )
        return
    # Multi-slice needs queued resources (one request for all slices).
    state_cmd = [
        *_gcloud(args, "queued-resources", "describe", args.name),
        "--format=value(state.state)",
    ]
    rc, state = run.output(state_cmd)
    if rc != 0 or run.dry_run:
        run(
            [
                *_gcloud(args, "queued-resources", "create", args.name),
                f"--node-count={topo.num_slices}",
                f"--node-prefix={args.name}",
                f"--accelerator-type={topo.accelerator_type}",
                f"--runtime-version={version}",
                *capacity,
            ]
        )
    else:
        print(f"[tpu] reusing queued resource {args.name} ({state})", flush=True)
    if run.dry_run:
        print(f"# wait until `{shlex.join(state_cmd)}` prints ACTIVE", flush=True)
        return
    deadline = time.monotonic() + args.wait_minutes * 60
    while state != "ACTIVE":
        if time.monotonic() > deadline:
            raise SystemExit(
                f"error: queued resource {args.name} not ACTIVE after {args.wait_minutes} min ({state})"
            )
        time.sleep(30)
        _, state = run.output(state_cmd)
        print(f"[tpu] queued resource {args.name}: {state or 'unknown'}", flush=True)


def remote_install_command(args) -> str:
    py = args.python
    apt = f"sudo apt-get install -y -qq {py} {py}-venv"
    # TPU VM images are Ubuntu 22.04 (Python 3.10): the distribution's package first, then the
    # deadsnakes PPA.
    get_python = (
        f"({py} --version >/dev/null 2>&1 || (sudo apt-get update -qq && {apt}) || "
        f"(sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -qq && {apt}))"
    )
    if args.git_url:
        url, _, ref = args.git_url.partition("@")
        branch = f" --branch {shlex.quote(ref)}" if ref else ""
        fetch = (
            f"rm -rf {REMOTE_DIR} && git clone --depth 1{branch} {shlex.quote(url)} {REMOTE_DIR}"
        )
    else:
        fetch = (
            f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar xzf ~/unified_mm_src.tgz -C {REMOTE_DIR}"
        )
    return " && ".join(
        [
            "set -e",
            get_python,
            fetch,
            f"{py} -m venv {REMOTE_VENV}",
            f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
            f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e '.[tpu]'",
            f"{REMOTE_VENV}/bin/python -c 'import unified_mm, jax; print(jax.__version__)'",
        ]
    )


def install(args, topo: Topology, run: Runner) -> None:
    """Ships this working tree (or clones --git_url) to every worker and pip-installs .[tpu]."""
    if not args.git_url:
        run(
            [
                "tar",
                "czf",
                SOURCE_TARBALL,
                "--exclude=.git",
                "--exclude=.venv",
                "--exclude=runs",
                "--exclude=.cache",
                "--exclude=__pycache__",
                "-C",
                REPO_ROOT,
                ".",
            ]
        )
    command = remote_install_command(args)
    for node in node_names(args, topo):
        if not args.git_url:
            run(
                [
                    *_gcloud(args, "tpu-vm", "scp", SOURCE_TARBALL, f"{node}:~/unified_mm_src.tgz"),
                    "--worker=all",
                ]
            )
        run(ssh_all(args, node, command))


def remote_train_command(args, extra: Sequence[str]) -> str:
    # "~" must stay unquoted so the remote shell expands it.
    trainer = f"{REMOTE_VENV}/bin/python " + shlex.join(
        [
            "-m",
            "unified_mm.main",
            f"--config={args.config}",
            f"--workdir={args.workdir}",
            "--distributed",
            *extra,
        ]
    )
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _remote_env(args).items())
    return (
        f"cd {REMOTE_DIR} && "
        # a previous run still holding the TPU would make this one fail to open it
        f"(test -f {REMOTE_PID} && kill -TERM $(cat {REMOTE_PID}) 2>/dev/null && sleep 10 || true) && "
        f"{env} nohup setsid {trainer} > {REMOTE_LOG} 2>&1 < /dev/null & "
        f"echo $! > {REMOTE_PID}"
    )


def _remote_env(args) -> dict[str, str]:
    env = {"UNIFIED_MM_DISTRIBUTED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.libtpu_init_args:
        env["LIBTPU_INIT_ARGS"] = args.libtpu_init_args
    return env


def train(args, topo: Topology, run: Runner, extra: Sequence[str]) -> None:
    """Starts the trainer on every worker of every slice (detached; logs to ~/unified_mm_train.log)."""
    if not args.config or not args.workdir:
        raise SystemExit("error: train needs --config and --workdir")
    if not args.workdir.startswith("gs://"):
        raise SystemExit(
            f"error: --workdir must be a gs:// bucket shared by all workers, got {args.workdir!r}"
        )
    command = remote_train_command(args, extra)
    for node in node_names(args, topo):
        run(ssh_all(args, node, command))


def logs(args, topo: Topology, run: Runner) -> None:
    """Follows the training log of one worker (worker 0 of slice 0 logs the metrics)."""
    node = node_names(args, topo)[0]
    run(
        [
            *_gcloud(args, "tpu-vm", "ssh", node),
            f"--worker={args.worker}",
            f"--command=tail -n +1 -F {REMOTE_LOG}",
        ],
        check=False,
    )


def stop(args, topo: Topology, run: Runner) -> None:
    """SIGTERM on every worker: the trainer checkpoints at the next step and exits."""
    command = f"test -f {REMOTE_PID} && kill -TERM $(cat {REMOTE_PID}) 2>/dev/null || true"
    for node in node_names(args, topo):
        run(ssh_all(args, node, command), check=False)


def down(args, topo: Topology, run: Runner) -> None:
    """Deletes the slice(s)."""
    if topo.num_slices == 1:
        run([*_gcloud(args, "tpu-vm", "delete", args.name), "--quiet"])
    else:
        run([*_gcloud(args, "queued-resources", "delete", args.name), "--force", "--quiet"])


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/tpu.py",
        description="Train unified_mm on Cloud TPU VMs (see the module docstring).",
    )
    p.add_argument(
        "action",
        choices=("run", "up", "install", "train", "logs", "stop", "down"),
        help="run = up + install + train + logs",
    )
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument(
        "--topology", required=True, help="v4-32, v5p-64, v5e-256, v6e-64, 2xv5e-256 ..."
    )
    p.add_argument("--num_slices", type=int, default=None, help="multi-slice count (DCN)")
    p.add_argument("--project", default=None)
    p.add_argument("--config", default=None, help="configs/<exp>.py[:arg]")
    p.add_argument("--workdir", default=None, help="gs://bucket/path")
    p.add_argument("--runtime_version", default=None, help="TPU software image (per chip default)")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--reserved", action="store_true")
    p.add_argument("--git_url", default=None, help="install from URL[@ref] instead of this tree")
    p.add_argument("--python", default="python3.11", help="interpreter on the workers (>= 3.11)")
    p.add_argument("--libtpu_init_args", default="", help="LIBTPU_INIT_ARGS for the run")
    p.add_argument("--worker", default="0", help="which worker's log `logs` follows (or all)")
    p.add_argument("--wait_minutes", type=float, default=120.0)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to unified_mm.main untouched (argparse would misparse it).
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    args.extra = extra
    try:
        topo = parse_topology(args.topology, args.num_slices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Runner(args.dry_run)
    print(f"# {topo.describe()}; {topo.num_slices} slice(s)", flush=True)
    try:
        if args.action in ("run", "train") and (not args.config or not args.workdir):
            raise SystemExit("error: train needs --config and --workdir")
        if args.action in ("run", "up"):
            up(args, topo, run)
        if args.action in ("run", "install"):
            install(args, topo, run)
        if args.action in ("run", "train"):
            train(args, topo, run, args.extra)
        if args.action in ("run", "logs"):
            logs(args, topo, run)
        if args.action == "stop":
            stop(args, topo, run)
        if args.action == "down":
            down(args, topo, run)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1 if "failed" in e.code else 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
