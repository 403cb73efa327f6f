"""LLM readout probe of a Harmon config: shapes-VQA from oracle image tokens (eval/readout_probe.py).

    python -m unified_mm.tools.readout_probe --config configs/shapes_harmon.py
    python -m unified_mm.tools.readout_probe --config configs/shapes_harmon.py --steps 2000 \
        --llm-depth 4 --out /tmp/readout.json

Trains the config's LLM from initialisation on oracle image tokens (the object centred in each
grid cell, given outright) with the main job's question-answer packing, and prints held-out
first-token accuracy per question type every --eval-every steps, then the JSON report (also
written to --out). The learning rate, schedule and image size are the --stage's (default: the
first stage that trains the LLM), with its step count replaced by --steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from unified_mm.tools.cli import emit_report, run_cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.readout_probe",
        description="shapes-VQA of a Harmon config's LLM trained on oracle image tokens.",
    )
    ap.add_argument("--config", required=True, help="config file (configs/<exp>.py[:arg])")
    ap.add_argument("--stage", default=None, help="stage whose lr schedule and image size to use")
    ap.add_argument("--steps", type=int, default=1000, help="training steps")
    ap.add_argument("--batch-size", type=int, default=32, help="understanding samples per step")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: stage's)")
    ap.add_argument("--llm-depth", type=int, default=None, help="LLM layers (default: config's)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between scorings")
    ap.add_argument("--questions", type=int, default=300, help="held-out shapes-VQA questions")
    ap.add_argument("--num-train", type=int, default=20000, help="train-split scenes")
    ap.add_argument(
        "--train-qtypes",
        nargs="+",
        default=None,
        help="question types to train on (default: all, as the main job)",
    )
    ap.add_argument("--seed", type=int, default=0, help="shapes data and sampling seed")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    return ap


def _load_config(spec: str):
    """A config file with an optional ``:arg``, loaded as main.py's --config flag loads it."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("readout_probe_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def run(args: argparse.Namespace) -> dict:
    from unified_mm import families
    from unified_mm.eval.readout_probe import ReadoutSettings, readout_probe
    from unified_mm.train.stages import stages_from_config

    config = _load_config(args.config)
    if config.family != "harmon":
        raise ValueError(f"the readout probe needs a Harmon config, got family {config.family!r}")
    if args.llm_depth is not None:
        if args.llm_depth < 1:
            raise ValueError(f"--llm-depth must be >= 1, got {args.llm_depth}")
        with config.unlocked():
            config.model.llm.num_hidden_layers = args.llm_depth
    stages = stages_from_config(config)
    if args.stage is None:
        stage = next((s for s in stages if "llm" in s.trainable), None)
        if stage is None:
            raise ValueError("no stage of the config trains the LLM; name one with --stage")
    else:
        stage = next((s for s in stages if s.name == args.stage), None)
        if stage is None:
            raise ValueError(
                f"unknown stage {args.stage!r}; the config has {[s.name for s in stages]}"
            )
    changes = {"steps": args.steps}
    if args.lr is not None:
        if args.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        changes["lr"] = args.lr
    stage = dataclasses.replace(stage, **changes)
    settings = ReadoutSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        num_train=args.num_train,
        num_questions=args.questions,
        eval_every=args.eval_every,
        seed=args.seed,
        **({"train_qtypes": tuple(args.train_qtypes)} if args.train_qtypes else {}),
    )
    family = families.build(config)
    report = readout_probe(config, family, stage, settings, log=print)
    report.update(config=args.config, lr=stage.lr, schedule=stage.schedule)
    emit_report(report, args.out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
