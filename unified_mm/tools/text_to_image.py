"""Text-to-image with a Harmon checkpoint (work directory or export), on CPU or accelerators.

    python -m unified_mm.tools.text_to_image --checkpoint runs/shapes_harmon \
        --prompt "a red circle" --prompt "two blue squares" --num-samples 4 --out samples/
    python -m unified_mm.tools.text_to_image --checkpoint exp/ --prompts prompts.jsonl \
        --geneval-layout --out geneval_out/ --cfg 3.0 --cfg-schedule linear --num-iter 16 --seed 1

Prompts: --prompt (repeatable) and/or --prompts FILE: .txt (one per line), .json (a list of
strings or of objects with "prompt"), .jsonl (one string or object per line; GenEval's
evaluation_metadata.jsonl works as is). Sampler settings default to the checkpoint config's `eval`
section; the image size to the checkpoint stage's resolution.

Output: one PNG per sample plus a metadata JSON next to it (`<p:05d>_<k:02d>.png/.json`), or with
--geneval-layout GenEval's folders `<p:05d>/metadata.jsonl` + `samples/<k:05d>.png` (+ `.json`).
The same jitted sampler as the training previews (`eval/harmon_inference.text_to_image`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from unified_mm.tools.cli import (
    add_checkpoint_args,
    evaluation_image_size,
    load_checkpoint_of,
    run_cli,
)


def read_prompt_file(path: str) -> list[dict]:
    """Prompt records ({"prompt": str, ...}) from .txt / .json / .jsonl."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.endswith(".json"):
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json prompt file holds a list of prompts")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"prompt": item})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(dict(item))
        else:
            raise ValueError(f"{path}: entry {i} is neither a string nor an object with 'prompt'")
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.text_to_image",
        description="Generate images from text prompts with a Harmon checkpoint.",
    )
    add_checkpoint_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts", default=None, help="prompt file: .txt, .json or .jsonl")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-samples", type=int, default=1, help="images per prompt")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="images per jitted call (default 64)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (1.0: no CFG)")
    ap.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None)
    ap.add_argument("--num-iter", type=int, default=None, help="masked-AR steps")
    ap.add_argument("--diffusion-steps", type=int, default=None, help="DDPM steps per token")
    ap.add_argument("--temperature", type=float, default=None, help="DDPM noise temperature")
    ap.add_argument(
        "--image-size", type=int, default=None, help="resolution (multiple of the stride)"
    )
    ap.add_argument("--geneval-layout", action="store_true", help="GenEval's folder layout")
    return ap


def _settings(args, config, stage_size: int) -> dict:
    from unified_mm.eval import harmon_inference as inf

    base = inf.sampling_options(config.get("eval", {}) or {})
    for name, value in (
        ("num_iter", args.num_iter),
        ("cfg", args.cfg),
        ("cfg_schedule", args.cfg_schedule),
        ("temperature", args.temperature),
        ("num_diffusion_steps", args.diffusion_steps),
    ):
        if value is not None:
            base[name] = value
    base["image_size"] = int(args.image_size or stage_size)
    return base


def run(args: argparse.Namespace) -> list[str]:
    import jax
    from PIL import Image

    from unified_mm.eval import harmon_inference as inf
    from unified_mm.eval.geneval import write_geneval_folder

    records = [{"prompt": p} for p in args.prompt]
    if args.prompts:
        records += read_prompt_file(args.prompts)
    if not records:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts FILE")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    loaded = load_checkpoint_of(args, "harmon", "text-to-image")
    settings = _settings(args, loaded.config, evaluation_image_size(loaded))
    image_size = settings.pop("image_size")
    limits = inf.model_limits(loaded.config)
    n = args.num_samples
    images = inf.text_to_image(
        loaded.model,
        loaded.family.tokenizer,
        [r["prompt"] for r in records for _ in range(n)],
        image_size=image_size,
        key=jax.random.key(args.seed),
        batch_size=args.batch_size,
        max_text_len=limits["max_text_len"],
        **settings,
    )
    os.makedirs(args.out, exist_ok=True)
    common = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "step": int(loaded.meta.get("step") or 0),
        "ema": loaded.used_ema,
        "seed": args.seed,
        "batch_size": args.batch_size or inf.DEFAULT_BATCH,
        "image_size": image_size,
        **settings,
    }
    paths = []
    for p, rec in enumerate(records):
        block = images[p * n : (p + 1) * n]
        if args.geneval_layout:
            pngs = write_geneval_folder(args.out, p, rec, block)
        else:
            pngs = []
            for k, img in enumerate(block):
                path = os.path.join(args.out, f"{p:05d}_{k:02d}.png")
                Image.fromarray(np.asarray(img)).save(path)
                pngs.append(path)
        for k, path in enumerate(pngs):
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump(
                    {"prompt": rec["prompt"], "prompt_index": p, "sample": k, **common}, f, indent=1
                )
        paths += pngs
    print(f"wrote {len(paths)} images to {args.out}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
