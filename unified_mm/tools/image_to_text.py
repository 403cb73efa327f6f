"""Image-to-text with a Harmon checkpoint (work directory or export): one answer per image.

    python -m unified_mm.tools.image_to_text --checkpoint runs/shapes_harmon \
        --image a.png --image b.png --prompt "Describe the image."
    python -m unified_mm.tools.image_to_text --checkpoint exp/ --image a.png \
        --prompt "What colour is the circle?" --sample --temperature 0.7 --top-k 5 --seed 3 \
        --out answers.jsonl

Images are padded to a square with grey, resized to --image-size (default: the checkpoint stage's
resolution) and encoded by the understanding path; the LLM decodes with its KV cache, greedily by
default. Prints `path<TAB>answer` per image; --out also writes JSONL records.
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


def read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image PIL can read") from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.image_to_text",
        description="Answer a prompt about each image with a Harmon checkpoint.",
    )
    add_checkpoint_args(ap)
    ap.add_argument("--image", action="append", required=True, help="image path (repeatable)")
    ap.add_argument("--prompt", default="Describe the image.", help="question asked of every image")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k best (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument(
        "--image-size", type=int, default=None, help="resolution (multiple of the stride)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="images per jitted call (default 64)"
    )
    ap.add_argument("--out", default=None, help="also write JSONL records here")
    return ap


def run(args: argparse.Namespace) -> list[dict]:
    import jax

    from unified_mm.eval import harmon_inference as inf

    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    images = [read_image(p) for p in args.image]
    loaded = load_checkpoint_of(args, "harmon", "image-to-text")
    size = int(args.image_size or evaluation_image_size(loaded))
    answers = inf.image_to_text(
        loaded.model,
        loaded.family.tokenizer,
        images,
        [args.prompt] * len(images),
        image_size=size,
        max_new_tokens=args.max_new_tokens,
        greedy=not args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        key=jax.random.key(args.seed) if args.sample else None,
        batch_size=args.batch_size,
        max_prompt_len=inf.model_limits(loaded.config)["max_prompt_len"],
    )
    records = [
        {
            "image": path,
            "prompt": args.prompt,
            "answer": a,
            "greedy": not args.sample,
            "seed": args.seed if args.sample else None,
            "image_size": size,
        }
        for path, a in zip(args.image, answers)
    ]
    for r in records:
        print(f"{r['image']}\t{r['answer']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
