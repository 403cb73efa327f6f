"""Evaluate a training work directory or an exported checkpoint; writes one JSON report.

    python -m unified_mm.evaluate --checkpoint runs/shapes_harmon
    python -m unified_mm.evaluate --checkpoint runs/shapes_harmon --step 1800 --out report.json \
        --geneval-images-per-prompt 2 --fid-inception pt_inception.safetensors

Harmon: detector validation, shapes-GenEval, shapes-VQA and optional FID (`unified_mm.eval.suite`);
other families run their own `evaluate`. Settings default to the checkpoint config's `eval`
section; the flags below override them. EMA weights are used when the checkpoint has them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.evaluate",
        description="Run the evaluation suite on a work directory or an exported checkpoint.",
    )
    ap.add_argument("--checkpoint", required=True, help="training work directory or export dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument(
        "--out", default=None, help="report path (default: <checkpoint>/eval/<stage>_step<N>.json)"
    )
    ap.add_argument(
        "--artifacts", default=None, help="folder for eval/ grids (default: the checkpoint)"
    )
    ap.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")
    g = ap.add_argument_group("overrides of config.eval")
    g.add_argument("--image-size", type=int, default=None, help="0: the checkpoint stage's size")
    g.add_argument("--geneval-prompts-per-category", type=int, default=None)
    g.add_argument("--geneval-images-per-prompt", type=int, default=None)
    g.add_argument("--vqa-questions", type=int, default=None)
    g.add_argument(
        "--vqa-train-split",
        type=int,
        default=None,
        help="also ask this many questions about fresh train-split images (0: off)",
    )
    g.add_argument("--detector-images", type=int, default=None)
    g.add_argument("--num-iter", type=int, default=None, help="AR steps")
    g.add_argument("--diffusion-steps", type=int, default=None, help="DDPM steps per AR step")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--fid-inception", default=None, help="pytorch-fid Inception-v3 weights file")
    return ap


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "image_size": args.image_size,
        "geneval_prompts_per_category": args.geneval_prompts_per_category,
        "geneval_images_per_prompt": args.geneval_images_per_prompt,
        "vqa_questions": args.vqa_questions,
        "vqa_train_split_questions": args.vqa_train_split,
        "detector_images": args.detector_images,
        "num_iter": args.num_iter,
        "num_diffusion_steps": args.diffusion_steps,
        "cfg": args.cfg,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "fid_inception_path": args.fid_inception,
    }


def run(args: argparse.Namespace) -> dict:
    from unified_mm.eval import suite
    from unified_mm.train.load import load_model

    if not os.path.exists(args.checkpoint):
        raise ValueError(f"checkpoint path {args.checkpoint} does not exist")
    loaded = load_model(args.checkpoint, step=args.step, prefer_ema=not args.no_ema)
    step = int(loaded.meta.get("step") or 0)
    stage = suite.checkpoint_stage(loaded.config, loaded.meta)
    eval_cfg = suite.apply_overrides(loaded.config.get("eval", None), _overrides(args))
    artifacts = args.artifacts or args.checkpoint
    if loaded.config.family == "harmon":
        report = suite.evaluate_harmon(
            loaded.model, loaded.family, stage, workdir=artifacts, step=step, eval_cfg=eval_cfg
        )
    else:
        loaded.family.config.unlock()
        loaded.family.config.eval = eval_cfg
        report = loaded.family.evaluate(loaded.model, stage, workdir=artifacts, step=step)
        if not report:
            raise ValueError(f"family {loaded.config.family!r} has no evaluation suite")
    report["checkpoint"] = os.path.abspath(args.checkpoint)
    report["used_ema"] = loaded.used_ema
    out = args.out or os.path.join(args.checkpoint, "eval", f"{stage.name}_step{step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
