"""The Cloud TPU launcher's --dry-run output (no gcloud, no network) and topology naming."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_tpu():
    spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "launch" / "tpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = _load_tpu()


def _dry_run(capsys, *argv) -> tuple[int, list[str]]:
    code = tpu.main(["--dry-run", *argv])
    out = capsys.readouterr()
    return code, [ln[2:] for ln in out.out.splitlines() if ln.startswith("+ ")], out


def test_run_single_slice_prints_every_step(capsys):
    code, cmds, _ = _dry_run(
        capsys,
        "run",
        "--name",
        "h1",
        "--zone",
        "us-east5-a",
        "--topology",
        "v5p-64",
        "--project",
        "proj",
        "--config",
        "configs/harmon_1p5b.py",
        "--workdir",
        "gs://bucket/run",
        "--",
        "--config.seed=3",
    )
    assert code == 0
    create = [c for c in cmds if " tpu-vm create " in c]
    assert create == [
        "gcloud compute tpus tpu-vm create h1 --zone=us-east5-a --project=proj "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5"
    ]
    # reuse: the slice is looked up before it is created
    assert cmds.index(next(c for c in cmds if " tpu-vm describe h1 " in c)) < cmds.index(create[0])
    # install on every worker: the working tree is shipped and pip-installed with the tpu extra
    scp = [c for c in cmds if " tpu-vm scp " in c]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    install = [c for c in cmds if "pip install" in c]
    assert len(install) == 1 and "--worker=all" in install[0]
    assert "pip install -q -e '\"'\"'.[tpu]'\"'\"'" in install[0]
    # the same trainer command on all workers, distributed, with the config, workdir and extras
    train = [c for c in cmds if "unified_mm.main" in c]
    assert len(train) == 1
    for part in (
        "--worker=all",
        "--distributed",
        "--config=configs/harmon_1p5b.py",
        "--workdir=gs://bucket/run",
        "--config.seed=3",
        "nohup",
        "unified_mm_train.log",
    ):
        assert part in train[0], part
    # then worker 0's log is streamed
    assert "tail -n +1 -F ~/unified_mm_train.log" in cmds[-1] and "--worker=0" in cmds[-1]
    assert cmds.index(install[0]) < cmds.index(train[0]) < len(cmds) - 1


def test_multislice_uses_queued_resources(capsys):
    code, cmds, _ = _dry_run(
        capsys,
        "run",
        "--name",
        "ms",
        "--zone",
        "z",
        "--topology",
        "v5e-256",
        "--num_slices",
        "2",
        "--config",
        "c.py",
        "--workdir",
        "gs://b/r",
        "--git_url",
        "https://example.com/u.git@v1",
    )
    assert code == 0
    create = [c for c in cmds if "queued-resources create" in c]
    assert len(create) == 1
    for part in (
        "--node-count=2",
        "--node-prefix=ms",
        "--accelerator-type=v5e-256",
        "--runtime-version=v2-alpha-tpuv5-lite",
    ):
        assert part in create[0]
    # one install and one start per slice, on every worker of it; git source, no tarball
    assert not any(" scp " in c for c in cmds)
    assert sum("git clone --depth 1 --branch v1 https://example.com/u.git" in c for c in cmds) == 2
    train = [c for c in cmds if "unified_mm.main" in c]
    assert [c.split()[5] for c in train] == ["ms-0", "ms-1"]
    assert all("--worker=all" in c and "--distributed" in c for c in train)


def test_stop_and_down(capsys):
    code, cmds, _ = _dry_run(capsys, "stop", "--name", "h", "--zone", "z", "--topology", "v6e-64")
    assert code == 0 and len(cmds) == 1
    assert "--worker=all" in cmds[0] and "kill -TERM $(cat ~/unified_mm_train.pid)" in cmds[0]
    code, cmds, _ = _dry_run(capsys, "down", "--name", "h", "--zone", "z", "--topology", "v4-32")
    assert cmds == ["gcloud compute tpus tpu-vm delete h --zone=z --quiet"]
    code, cmds, _ = _dry_run(capsys, "down", "--name", "h", "--zone", "z", "--topology", "2xv6e-64")
    assert cmds == ["gcloud compute tpus queued-resources delete h --zone=z --force --quiet"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["up", "--name", "a", "--zone", "z", "--topology", "v5p-63"], "must be even"),
        (["up", "--name", "a", "--zone", "z", "--topology", "v7-8"], "unknown TPU topology"),
        (
            [
                "train",
                "--name",
                "a",
                "--zone",
                "z",
                "--topology",
                "v5e-8",
                "--config",
                "c",
                "--workdir",
                "/local/dir",
            ],
            "gs:// bucket",
        ),
        (["run", "--name", "a", "--zone", "z", "--topology", "v5e-8"], "needs --config"),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, argv, message):
    code = tpu.main(["--dry-run", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_script_runs_without_jax():
    # The launcher must work on a laptop with only gcloud: it never imports JAX or unified_mm.
    code = (
        "import sys, runpy; sys.argv = ['tpu.py', 'down', '--dry-run', '--name', 'x', "
        "'--zone', 'z', '--topology', 'v5e-16']\n"
        "try:\n    runpy.run_path({!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'jax' not in sys.modules and 'unified_mm' not in sys.modules, 'imported jax'\n"
    ).format(str(ROOT / "launch" / "tpu.py"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "tpu-vm delete x --zone=z --quiet" in r.stdout


def test_launchers_pass_only_flags_the_trainer_defines(capsys):
    # Every --flag the TPU and local launchers put on `python -m unified_mm.main` must exist there.
    # Read from main.py's DEFINE_* calls: importing it here would redefine absl flags that other
    # entry points (tools.import_harmon) already defined in this test process.
    import ast

    tree = ast.parse((ROOT / "unified_mm" / "main.py").read_text())
    defined = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }

    _, cmds, _ = _dry_run(
        capsys,
        "train",
        "--name",
        "a",
        "--zone",
        "z",
        "--topology",
        "v6e-64",
        "--config",
        "configs/harmon_0p5b.py",
        "--workdir",
        "gs://b/r",
    )
    (train,) = [c for c in cmds if "unified_mm.main" in c]
    spec = importlib.util.spec_from_file_location("lmp", ROOT / "launch" / "local_multiprocess.py")
    lmp = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lmp
    spec.loader.exec_module(lmp)
    local = lmp.process_command(
        ["--config", "c.py", "--workdir", "/w"],
        process_id=1,
        num_processes=2,
        port=1234,
        module="unified_mm.main",
    )
    assert local[-4:] == [
        "--distributed",
        "--coordinator=localhost:1234",
        "--num_processes=2",
        "--process_id=1",
    ]
    passed = {
        w.split("=")[0].lstrip("-")
        for w in train.split("unified_mm.main", 1)[1].split() + local
        if w.startswith("--") and not w.startswith("--config.")
    }
    assert {"config", "workdir", "distributed", "coordinator"} <= passed
    assert passed <= defined, passed - defined
