"""Ahead-of-time compilation for TPU topologies: naming, batch scaling and roofline (always), and
the real training step compiled for a TPU topology on this CPU host (needs the libtpu wheel:
``tpu_backend`` tests are skipped with a message where it is absent, e.g. in CI)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from unified_mm.parallel.topologies import CHIPS, parse_topology
from unified_mm.tools.aot_compile import (
    Report,
    StageCompiler,
    child_argv,
    remat_anywhere,
    roofline,
    scaled_task_batch,
    task_ratio,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]

if importlib.util.find_spec("libtpu") is None:
    # A skip reason is listed only under `pytest -rs`; a warning shows in every run's summary.
    warnings.warn(
        "libtpu is not installed: the tpu_backend tests (real TPU compiles on this host) are "
        "skipped; pip install -e '.[tpu]' to run them",
        stacklevel=1,
    )


@pytest.mark.parametrize(
    "name, topology_name, chips, wrap, slices",
    [
        ("v5p-8", "v5:2x2x1", 4, (False, False, False), 1),
        ("v5p-64", "v5:2x4x4", 32, (False, False, False), 1),
        ("v5p-128", "v5:4x4x4", 64, (True, True, True), 1),
        ("v4-32", "v4:2x2x4", 16, (False, False, False), 1),
        ("v4-512", "v4:4x8x8", 256, (True, True, True), 1),
        ("v5e-16", "v5e:4x4", 16, (False, False, False), 1),
        ("v5litepod-8", "v5e:2x4", 8, (False, False, False), 1),
        ("v5e-256", "v5e:16x16", 256, (True, True, False), 1),
        ("v6e-64", "v6e:8x8", 64, (False, False, False), 1),
        ("v6e-128", "v6e:8x16", 128, (False, True, False), 1),
        ("2xv5e-256", "v5e:16x16", 256, (True, True, False), 2),
    ],
)
def test_topology_names(name, topology_name, chips, wrap, slices):
    t = parse_topology(name)
    assert (t.topology_name, t.num_chips, t.wrap, t.num_slices) == (
        topology_name,
        chips,
        wrap,
        slices,
    )
    assert t.total_chips == chips * slices
    megacore = name.startswith("v4") or "v5p" in name  # one JAX device per 2-core chip
    assert t.chip.chip_config_name == ("megacore" if megacore else "default")


def test_topology_chip_figures_and_overrides():
    assert parse_topology("v5e-16", num_slices=4).num_slices == 4
    assert CHIPS["v5p"].peak_tflops == 459.0 and CHIPS["v5p"].hbm_gib == 95.0
    assert CHIPS["v6e"].peak_tflops == 918.0 and CHIPS["v5e"].hbm_gib == 16.0
    for bad, msg in [
        ("v5p-12", "power-of-two"),
        ("v3-8", "unknown"),
        ("v5e-512", "at most 256"),
        ("v4-2", "smallest"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_topology(bad)


def test_per_chip_batch_keeps_the_stage_task_ratio():
    assert task_ratio({"i2t": 256, "t2i": 1024}) == {"i2t": 1, "t2i": 4}
    assert scaled_task_batch({"i2t": 256, "t2i": 1024}, 10, 32) == {"i2t": 64, "t2i": 256}
    with pytest.raises(ValueError, match="multiple of 5"):
        scaled_task_batch({"i2t": 256, "t2i": 1024}, 7, 32)


def test_roofline_picks_the_slowest_resource():
    chip = CHIPS["v5e"]
    mem = dict(argument=1e9, output=1e9, temp=2e9)
    r = roofline(
        flops_per_chip=197e12,
        memory=mem,
        param_bytes=4e9,
        trainable_bytes=4e9,
        mesh_shape={"data": 1, "fsdp": 16, "tensor": 1},
        num_slices=1,
        chip=chip,
        remat=False,
    )
    assert r["compute_s"] == pytest.approx(1.0)
    assert r["hbm_s"] == pytest.approx(6e9 / 819e9)
    # 2 all-gathers of every parameter + 1 reduce-scatter of the gradients, 15/16 of each
    assert r["ici_s"] == pytest.approx(3 * 4e9 * 15 / 16 / 400e9)
    assert r["dcn_s"] == 0.0 and r["mfu"] == pytest.approx(1.0)
    remat = roofline(
        flops_per_chip=197e12,
        memory=mem,
        param_bytes=4e9,
        trainable_bytes=4e9,
        mesh_shape={"data": 2, "fsdp": 16, "tensor": 1},
        num_slices=2,
        chip=chip,
        remat=True,
    )
    assert remat["mfu"] == pytest.approx(0.75)  # the recomputed forward is not model FLOPs
    assert remat["dcn_s"] == pytest.approx(2 * 4e9 / 16 * 0.5 / 6.25e9)


def test_remat_is_found_at_any_level_of_the_model_config():
    import ml_collections

    harmon = ml_collections.ConfigDict(dict(remat=True, llm=dict(hidden_size=8)))
    vqrae = ml_collections.ConfigDict(
        dict(tokenizer=dict(encoder=dict(remat=False), decoder=dict(remat=True)), llm={})
    )
    assert remat_anywhere(harmon) and remat_anywhere(vqrae)
    vqrae.tokenizer.decoder.remat = False
    assert not remat_anywhere(vqrae) and not remat_anywhere({})


class _FakeCompiler(StageCompiler):
    """Memory = 10 GiB + 1.5 GiB per example on a 32 GiB chip: the largest fit is 14."""

    def __init__(self):
        self.mesh = type("Mesh", (), {"size": 4})()
        self.compiled: list[int] = []

    def compile(self, stage, task_batch):
        per_chip = sum(task_batch.values()) // 4
        self.compiled.append(per_chip)
        total = (10 + 1.5 * per_chip) * 2**30
        hbm = 32 * 2**30
        return Report(
            config="",
            stage="s",
            topology="t",
            num_slices=1,
            chips=4,
            mesh={},
            task_batch=dict(task_batch),
            per_chip_batch=per_chip,
            fits=total <= hbm,
            memory={"total": total},
            hbm_bytes=hbm,
        )


def test_max_batch_search_uses_the_linear_memory_model():
    stage = type("Stage", (), {"name": "s", "task_batch": {"i2t": 256, "t2i": 1024}})()
    c = _FakeCompiler()
    best = c.find_max_batch(stage, limit=1000)
    # units of 5 (1:4); 10 + 1.5 * 5k <= 0.98 * 32 -> k = 2 fits, k = 3 does not
    assert best.per_chip_batch == 10 and best.search_exact
    assert c.compiled == [5, 10, 15]  # two points, then the prediction's next unit fails
    c = _FakeCompiler()
    partial = c.find_max_batch(stage, limit=1000, max_compiles=2)
    assert partial.per_chip_batch == 10 and not partial.search_exact and c.compiled == [5, 10]


def test_check_only_children_get_the_config_but_not_the_run_flags():
    argv = [
        "--config=configs/harmon_1p5b.py",
        "--config.seed=3",
        "--topology",
        "v5p-64",
        "--stage",
        "align",
        "--per_chip_batch=10",
        "--find_max_batch",
        "--check_only",
        "--nomarkdown",
        "--json_out",
        "/tmp/x.json",
        "--max_compiles=3",
    ]
    assert child_argv(argv) == [
        "--config=configs/harmon_1p5b.py",
        "--config.seed=3",
        "--topology",
        "v5p-64",
    ]


def _aot(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "unified_mm.tools.aot_compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.tpu_backend
def test_toy_config_compiles_for_v5e_and_reports(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot(
        "--config",
        "tests/configs/toy.py",
        "--topology",
        "v5e-8",
        "--per_chip_batch",
        "4",
        "--json_out",
        str(out),
        "--markdown",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert [x["stage"] for x in reports] == ["head_only", "all"]
    for x in reports:
        assert x["fits"] and x["chips"] == 8 and x["task_batch"] == {"t2i": 32}
        m = x["memory"]
        assert 0 < m["argument"] and 0 < m["total"] < x["hbm_bytes"] == 16 * 2**30
        assert x["flops_per_chip"] == pytest.approx(3 * 2 * (8 * 16 + 16) * 32 / 8)
        assert 0 < x["roofline"]["mfu"] <= 1
    # the head-only stage trains (and keeps optimizer state for) fewer parameters
    assert reports[0]["trainable_params"] < reports[1]["trainable_params"]
    assert "memory per chip: arguments" in r.stdout and "| toy | all | v5e-8 |" in r.stdout


@pytest.mark.tpu_backend
def test_step_that_does_not_fit_exits_nonzero_with_the_reason():
    r = _aot(
        "--config",
        "tests/configs/toy.py",
        "--topology",
        "v5e-8",
        "--stage",
        "all",
        "--per_chip_batch",
        str(1 << 28),
    )
    assert r.returncode == 1
    assert "does not fit on v5e-8" in r.stderr and "memory" in r.stderr.lower()


@pytest.mark.tpu_backend
def test_multislice_and_max_batch_search(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot(
        "--config",
        "tests/configs/toy.py",
        "--topology",
        "v5e-4",
        "--num_slices",
        "2",
        "--config.mesh.data=1",
        "--stage",
        "all",
        "--find_max_batch",
        "--max_per_chip_batch",
        "8",
        "--json_out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (x,) = json.loads(out.read_text())
    assert x["num_slices"] == 2 and x["mesh"]["data"] == 2 and x["chips"] == 8
    # the toy's memory hardly grows, so the linear prediction jumps straight to the limit
    assert x["per_chip_batch"] == 8 and x["search"] == [[1, True], [2, True], [8, True]]
    assert x["search_exact"]


@pytest.mark.tpu_backend
def test_check_only_stops_at_buffer_assignment(tmp_path):
    out = tmp_path / "check.json"
    r = _aot(
        "--config",
        "tests/configs/toy.py",
        "--topology",
        "v5e-8",
        "--stage",
        "all",
        "--per_chip_batch",
        "4",
        "--check_only",
        "--json_out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (x,) = json.loads(out.read_text())
    assert x["fits"] and x["check_only"] and 0 < x["memory"]["temp"] < x["hbm_bytes"]
    assert "fits (check only" in r.stdout
    # and a size that cannot fit fails at buffer assignment, with the compiler's reason
    r = _aot(
        "--config",
        "tests/configs/toy.py",
        "--topology",
        "v5e-8",
        "--stage",
        "all",
        "--per_chip_batch",
        str(1 << 28),
        "--check_only",
    )
    assert r.returncode == 1 and "does not fit on v5e-8" in r.stderr, r.stderr[-2000:]
    assert "RESOURCE_EXHAUSTED" in r.stderr


@pytest.mark.tpu_backend
@pytest.mark.slow
def test_harmon_smoke_stage_compiles():
    r = _aot("--config", "configs/harmon_1p5b.py:smoke", "--topology", "v5e-8", "--stage", "align")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[align] v5e-8" in r.stdout and "roofline" in r.stdout


def test_bad_topology_is_one_clear_line():
    r = _aot("--config", "tests/configs/toy.py", "--topology", "v9-8", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown TPU topology 'v9-8'")
