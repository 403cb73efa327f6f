"""The evaluation suite on a tiny trained checkpoint: the report schema (through the CLI), the log table,
stage and override resolution."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from trained_checkpoints import TRAIN_STEPS, trained_harmon

STEP = TRAIN_STEPS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # The checkpoint the real trainer trained (shared with test_inference_cli in one worker).
    return trained_harmon(tmp_path_factory.getbasetemp()).workdir


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_evaluate_cli_report_schema(workdir, tmp_path):
    from unified_mm import evaluate
    from unified_mm.data.shapes import CATEGORIES
    from unified_mm.eval.suite import REPORT_KEYS

    out = tmp_path / "report.json"
    rc = evaluate.main(
        [
            "--checkpoint",
            workdir,
            "--out",
            str(out),
            "--artifacts",
            str(tmp_path),
            "--geneval-prompts-per-category",
            "1",
            "--geneval-images-per-prompt",
            "1",
            "--vqa-questions",
            "6",
            "--vqa-train-split",
            "5",
            "--detector-images",
            "40",
            "--batch-size",
            "6",
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(REPORT_KEYS) <= set(rep)
    assert rep["step"] == STEP and rep["stage"] == "full" and rep["image_size"] == 32
    assert rep["used_ema"] is True
    assert rep["detector_accuracy"] >= 0.99 and rep["geneval_valid"] is True
    assert set(rep["geneval"]) == {*CATEGORIES, "overall"}
    assert all(0.0 <= v <= 1.0 for v in rep["geneval"].values())
    assert rep["geneval"]["overall"] == pytest.approx(
        np.mean([rep["geneval"][c] for c in CATEGORIES])
    )
    assert rep["geneval_ground_truth"]["overall"] >= 0.8
    assert rep["vqa"]["questions"] == 6 and 0.0 <= rep["vqa"]["overall"] <= 1.0
    assert rep["vqa_train_split"]["questions"] == 5
    assert 0.0 <= rep["vqa_train_split"]["overall"] <= 1.0
    assert "skipped" in rep["fid"] and "Inception" in rep["fid"]["skipped"]
    assert rep["geneval_settings"]["images_per_prompt"] == 1
    stem = tmp_path / "eval" / f"full_step{STEP}"
    assert pathlib.Path(f"{stem}_geneval.png").is_file()
    lines = pathlib.Path(f"{stem}_geneval.jsonl").read_text().splitlines()
    assert len(lines) == len(CATEGORIES)
    assert len(pathlib.Path(f"{stem}_vqa.jsonl").read_text().splitlines()) == 6


def test_evaluate_cli_bad_checkpoint(tmp_path, capsys):
    from unified_mm import evaluate

    assert evaluate.main(["--checkpoint", str(tmp_path)]) == 2
    assert "neither a training work directory" in _err(capsys)


def test_format_table_and_helpers():
    import ml_collections
    from test_inference_cli import smoke_config

    from unified_mm.eval.suite import apply_overrides, checkpoint_stage, format_table

    report = {
        "step": 3,
        "stage": "full",
        "image_size": 32,
        "detector_accuracy": 0.95,
        "geneval_valid": False,
        "geneval": {"single_object": 0.5, "overall": 0.5},
        "vqa": {"colour": 1.0, "overall": 1.0},
        "fid": {"skipped": "no weights"},
        "seconds": {"total": 1.0},
    }
    table = format_table(report)
    assert "t2i conditioning" not in table
    report["t2i_conditioning"] = {"text_gap": -1e-5, "context_gap": 0.0771, "loss": 0.15}
    table = format_table(report)
    assert "text gap +0.0% | context gap +7.7%" in table
    assert "NOT meaningful" in table and "single 0.50" in table and "skipped: no weights" in table
    config = smoke_config()
    assert checkpoint_stage(config, {"stage": "hires"}).image_size == config.stages.hires.image_size
    assert checkpoint_stage(config, {"stage": "align"}).image_size == config.stages.align.image_size
    assert checkpoint_stage(config, {}).name == config.stage_order[-1]
    ev = apply_overrides(
        config.eval, {"cfg": 1.5, "vqa_questions": None, "fid_inception_path": "x"}
    )
    assert isinstance(ev, ml_collections.ConfigDict)
    assert ev.cfg == 1.5 and ev.vqa_questions == config.eval.vqa_questions
    assert ev.fid_inception_path == "x"
