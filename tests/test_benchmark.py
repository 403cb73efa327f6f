"""The benchmark tool in a tiny mode: the JSON schema of its figures, no recompiles across timed
calls, the analytic FLOP helpers. No timing assertions (the CI machine is shared)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from unified_mm.tools import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/bench beside the checkout, else the copy kept with the tests (a clean clone in CI).
BENCH = ROOT.parent / "shared" / "bench" / "harmon_bench_config.json"
if not BENCH.exists():
    BENCH = ROOT / "tests" / "data" / "harmon_bench_config.json"
if not BENCH.exists():
    print(f"test_benchmark: {BENCH} is absent; the bench-mode tests are skipped")
needs_bench = pytest.mark.skipif(not BENCH.exists(), reason=f"{BENCH} is absent")

TIMING = {
    "median_s",
    "min_s",
    "first_call_s",
    "iters",
    "recompiles",
    "gflop_per_call",
    "gflops_achieved",
}


def _check_timing(fig: dict, rate: str) -> None:
    assert TIMING | {rate} <= set(fig), sorted(fig)
    assert 0 < fig["min_s"] <= fig["median_s"] and fig["iters"] == 2
    assert fig["gflop_per_call"] > 0 and fig["gflops_achieved"] > 0 and fig[rate] > 0
    assert fig["recompiles"] == 0  # static shapes: timed calls never compile again


@needs_bench
def test_bench_mode_sampling_schema():
    out = benchmark.run_bench(str(BENCH), 2, ["t2i_sample", "i2t_decode"], shrink=True)
    json.dumps(out)  # one JSON line
    assert out["benchmark"] == "harmon_bench" and out["dtype"] == "float32" and out["shrunk"]
    assert out["cpu_fp32_matmul_peak_gflops"] > 0
    _check_timing(out["t2i_sample"], "images_per_s")
    _check_timing(out["i2t_decode"], "tokens_per_s")
    assert out["t2i_sample"]["cache_entries"] == 1 and out["i2t_decode"]["cache_entries"] == 1
    assert out["t2i_sample"]["seconds_per_image"] == pytest.approx(
        out["t2i_sample"]["median_s"] / 4
    )
    assert out["i2t_decode"]["tokens_per_s"] == pytest.approx(
        4 * 32 / out["i2t_decode"]["median_s"]
    )
    assert "t2i_train" not in out


@needs_bench
@pytest.mark.slow
def test_bench_mode_training_steps_schema():
    out = benchmark.run_bench(str(BENCH), 2, ["t2i_train", "i2t_train"], shrink=True)
    _check_timing(out["t2i_train"], "samples_per_s")
    _check_timing(out["i2t_train"], "samples_per_s")


@needs_bench
def test_bench_gflop_counts_follow_the_workload():
    cfg = benchmark.load_bench_config(str(BENCH), shrink=True)[1]
    layers, q = cfg.llm.num_hidden_layers, cfg.llm.num_attention_heads * cfg.llm.head_dim
    # a cached token attends to 99 more keys: 4 FLOPs per key and query channel (scores, values)
    extra = benchmark._llm(cfg, 1, prefix=99) - benchmark._llm(cfg, 1, prefix=0)
    assert extra == pytest.approx(layers * 4.0 * 99 * q)
    # the encoder counts only the rows it is given (the official visible + buffer count)
    assert benchmark._mar_encoder(cfg, 24) < benchmark._mar_encoder(cfg, 35)


def test_cap_depths_caps_every_depth_field():
    c = ml_collections.ConfigDict(
        dict(
            mar=dict(encoder_depth=20, decoder_depth=2, diffloss_d=12, encoder_embed_dim=1280),
            llm=dict(num_hidden_layers=28, hidden_size=1536),
        )
    )
    changed = benchmark.cap_depths(c, 2)
    assert sorted(changed) == ["llm.num_hidden_layers", "mar.diffloss_d", "mar.encoder_depth"]
    assert c.mar.encoder_depth == c.llm.num_hidden_layers == c.mar.diffloss_d == 2
    assert c.mar.encoder_embed_dim == 1280 and c.llm.hidden_size == 1536


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "unified_mm.tools.benchmark", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_config_mode_times_every_stage_and_the_input_pipeline():
    r = _cli("--config", "tests/configs/toy.py", "--iters", "2", "--pipeline_batches", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = r.stdout.strip().splitlines()  # exactly one JSON line on stdout
    out = json.loads(line)
    assert out["benchmark"] == "config" and out["devices"] == 8
    assert sorted(out["stages"]) == ["all", "head_only"]
    for fig in out["stages"].values():
        assert 0 < fig["min_s"] <= fig["median_s"] and fig["iters"] == 2
        assert fig["recompiles"] == 0 and fig["compile_s"] > 0
        assert fig["examples_per_s"] == pytest.approx(16 / fig["median_s"])
        # the toy's analytic count: 3 x 2 x (8*16 + 16) FLOPs per example, batch 16
        assert fig["model_tflop_per_step"] == pytest.approx(16 * 3 * 2 * 144 / 1e12)
        assert fig["pipeline_examples_per_s"] > 0 and fig["pipeline_vs_step"] > 0
        assert "mfu" not in fig  # no known peak for a CPU: no MFU rather than a made-up one


def test_cli_rejects_a_config_without_bench_section():
    r = _cli("--bench-config", str(ROOT / "tests" / "data" / "harmon_tiny" / "config.json"))
    assert r.returncode == 2
    assert "has no 'bench' section" in r.stderr and r.stdout == ""
