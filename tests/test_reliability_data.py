"""Reliability 4: dirty data. 1% of a source's records corrupted in each way a record can fail
(read errors, malformed records, non-UTF-8 captions, missing captions, undecodable, empty,
wrong-channel and oversized images): training continues and the skips are counted per source and
reason in metrics.jsonl and the log. A source with every record corrupted: one clear error within
the first steps from ``python -m unified_mm.main``.

The default runs train the toy model on real pipeline batches (the trainer, DataFeed and the
Grain pipeline are the production code; only the model is tiny). The slow test trains the Harmon
smoke model on a dirty source mixed with the shapes data.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from reliability_helpers import (
    DIRTY_KINDS,
    HERE,
    REPO,
    ForkServer,
    child_env,
    pipeline_toy_config,
    raw_metric_rows,
    read_log,
    write_records,
)

from unified_mm.train.train import train_and_evaluate

N = 100  # 1% = 1 record per kind: 8 bad records (8%) in the dirty source


def _check_counts(rows, sources_clean=("clean",), dirty="dirty") -> dict:
    """Skip counts of the run (summed over stages: each stage's data stream counts afresh)."""
    ends = [
        r for i, r in enumerate(rows) if i + 1 == len(rows) or rows[i + 1]["stage"] != r["stage"]
    ]
    total: dict[str, int] = {}
    for last in ends:
        skipped = {
            k[len("data/skipped/") :]: v for k, v in last.items() if k.startswith("data/skipped/")
        }
        for s in sources_clean:
            assert skipped[s] == 0, skipped
        reasons = {
            k.split("/", 1)[1]: int(v) for k, v in skipped.items() if k.startswith(dirty + "/")
        }
        assert skipped[dirty] == sum(reasons.values()), skipped
        for k, v in reasons.items():
            total[k] = total.get(k, 0) + v
    assert set(total) <= set(DIRTY_KINDS) and sum(total.values()) > 0, total
    for stage in {r["stage"] for r in rows}:  # counts only grow within a stage
        seen = [r.get(f"data/skipped/{dirty}", 0) for r in rows if r["stage"] == stage]
        assert seen == sorted(seen), seen
    return total


def test_dirty_records_are_skipped_and_counted_per_source(tmp_path, caplog):
    bad = write_records(str(tmp_path / "dirty.array_record"), N, bad_per_kind=N // 100)
    write_records(str(tmp_path / "clean.array_record"), N, seed=1)
    config = pipeline_toy_config(
        {"dirty": tmp_path / "dirty.array_record", "clean": tmp_path / "clean.array_record"},
        steps=(6, 6),
        max_bad_fraction=0.2,  # 8% of the dirty source is bad by construction
        # t2i reads the dirty source alone: 32 rows x 6 steps > N, so each stage's stream goes
        # through a whole epoch (a permutation) and every bad record is drawn; i2t mixes both.
        mixtures={"t2i": {"dirty": 1.0}, "i2t": {"dirty": 1.0, "clean": 1.0}},
    )
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="unified_mm"):
        report = train_and_evaluate(config, str(tmp_path / "run"))
    assert report["global_step"] == 12
    rows = raw_metric_rows(str(tmp_path / "run"))
    assert all(r["finite"] == 1.0 for r in rows)  # no bad record reached the model
    reasons = _check_counts(rows)
    assert set(reasons) == set(DIRTY_KINDS), (
        reasons
    )  # every kind was drawn (a whole epoch was drawn)
    summary = [r.getMessage() for r in caplog.records if "skipped bad records" in r.getMessage()]
    assert len(summary) == 2 and "'dirty':" in summary[-1], summary  # one per stage
    print(
        f"\ndirty data: {sum(len(v) for v in bad.values())} of {N} records bad "
        f"({N // 100} per kind); 12 steps trained in {time.monotonic() - t0:.1f} s; "
        f"skips per reason in the dirty source: {reasons}; clean source: 0"
    )


_CLI_CONFIG = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from reliability_helpers import pipeline_toy_config

    def get_config(arg=None):
        return pipeline_toy_config({{"junk": {path!r}}})
""")


def test_fully_corrupt_source_is_one_clear_error_in_the_first_steps(tmp_path):
    path = str(tmp_path / "junk.array_record")
    write_records(path, 60, bad_per_kind=60, kinds=("decode_error",))
    cfg = tmp_path / "junk_config.py"
    cfg.write_text(_CLI_CONFIG.format(tests=HERE, path=path))
    workdir = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "unified_mm.main", "--config", str(cfg), "--workdir", str(workdir)],
        cwd=REPO,
        env=child_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    msg = errors[0]
    assert "data source 'junk' (array_record " in msg and "decode_error: 17" in msg, msg
    assert "17 consecutive records failed" in msg, msg
    # Within the first steps: nothing was trained, nothing was checkpointed.
    metrics = workdir / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
    assert not os.path.isdir(workdir / "checkpoints") or not any(
        d.isdigit() for d in os.listdir(workdir / "checkpoints")
    )
    print(f"\n100% corrupt source: exit 2 after {seconds:.1f} s (process start included): {msg}")


@pytest.mark.slow
def test_harmon_smoke_trains_through_dirty_data(tmp_path):
    """The Harmon smoke model, one stage, on the shapes data mixed with a dirty ArrayRecord source."""
    from unified_mm.data.sources import source_config

    write_records(str(tmp_path / "dirty.array_record"), N, bad_per_kind=N // 100)
    server = ForkServer(devices=8)
    try:
        log = str(tmp_path / "life.log")
        overrides = {
            "stage_order": ["align"],
            "stages.align.steps": 3,
            "evaluate_after_each_stage": False,
            "eval.preview_prompts": [],
            "data.sources.dirty": source_config(
                "array_record", path=str(tmp_path / "dirty.array_record")
            ),
            "data.mixtures.t2i": {"shapes": 1.0, "dirty": 1.0},
            "data.mixtures.i2t": {"shapes": 1.0, "dirty": 1.0},
            "data.max_bad_fraction": 0.2,
            "data.min_records_for_check": 40,
            "data.max_image_pixels": 128 * 128,
        }
        t0 = time.monotonic()
        rc = server.run(
            log,
            workdir=str(tmp_path / "run"),
            overrides=overrides,
            config_fn="reliability_helpers:harmon_smoke_config",
            timeout=1200,
        )
        assert rc == 0, read_log(log)[-3000:]
    finally:
        server.close()
    rows = raw_metric_rows(str(tmp_path / "run"))
    reasons = _check_counts(rows, sources_clean=("shapes",))
    assert "skipped bad records" in read_log(log)
    print(
        f"\nHarmon smoke through dirty data: 3 steps in {time.monotonic() - t0:.0f} s; "
        f"skips per reason: {reasons}; rows: {json.dumps(rows[-1])[:300]}"
    )
