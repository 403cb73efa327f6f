"""Reconstruction with a VQRAE checkpoint (work directory or export): images in, reconstructions
and code ids out.

    python -m unified_mm.tools.reconstruct --checkpoint runs/vqrae --image a.png --image b.png \
        --out recon/

Each input is centre-cropped to a square and resized to --image-size (default: the checkpoint
stage's resolution), tokenised (encoder -> SimVQ ids) and decoded. Writes `<name>_recon.png`,
`<name>_ids.npy` (int32 [h, w] code grid) per image and `summary.json` (PSNR / SSIM per image, code
utilisation and perplexity over the inputs). One jitted function per shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from unified_mm.eval.reconstruction import evaluate_reconstruction, uint8_to_unit, unit_to_uint8
from unified_mm.tools.cli import add_checkpoint_args, load_checkpoint_of, run_cli


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    recon, ids = model.reconstruct(images)
    return recon, ids


def tokenizer_of(model):
    """The VQRAE tokenizer of a model: the model itself, or the family's unified model's
    `.tokenizer` (VQRAEUnified)."""
    for m in (model, getattr(model, "tokenizer", None)):
        if m is not None and hasattr(m, "reconstruct") and hasattr(m, "quantizer"):
            return m
    raise ValueError("reconstruction needs a VQRAE model (a tokenizer with a quantizer)")


def reconstruct_images(
    model, images: Sequence[np.ndarray], *, image_size: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray, dict]:
    """uint8 images -> (uint8 reconstructions [N, S, S, 3], ids [N, h, w], metrics).

    `model` is a VQRAE or the VQRAE family's unified model (its tokenizer is used)."""
    from unified_mm.data.transforms import prepare_image

    model = tokenizer_of(model)
    if not len(images):
        raise ValueError("no images to reconstruct")
    px = np.stack(
        [
            uint8_to_unit(prepare_image(np.ascontiguousarray(im), image_size, "center"))
            for im in images
        ]
    )
    graphdef, state = nnx.split(model)
    recons, ids_all = [], []

    def fn(batch):
        n = len(batch)
        if n < batch_size and len(px) > batch_size:  # fixed batch: one compilation
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        recon, ids = _reconstruct(graphdef, state, batch)
        recons.append(np.asarray(recon)[:n])
        ids_all.append(np.asarray(ids)[:n])
        return recon[:n], ids[:n]

    codebook = int(model.cfg.quantizer.codebook_size)
    metrics = evaluate_reconstruction(
        fn, (px[s : s + batch_size] for s in range(0, len(px), batch_size)), codebook_size=codebook
    )
    ids = np.concatenate(ids_all)
    h, w = model.grid
    if ids.shape[1] == h * w:
        ids = ids.reshape(len(ids), h, w)
    return unit_to_uint8(np.concatenate(recons)), ids.astype(np.int32), metrics


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.reconstruct",
        description="Reconstruct images with a VQRAE checkpoint; writes images and code ids.",
    )
    add_checkpoint_args(ap)
    ap.add_argument("--image", action="append", required=True, help="image path (repeatable)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--image-size", type=int, default=None, help="input resolution")
    ap.add_argument("--batch-size", type=int, default=16)
    return ap


def run(args: argparse.Namespace) -> dict:
    from PIL import Image

    from unified_mm.eval.suite import checkpoint_stage
    from unified_mm.tools.image_to_text import read_image

    images = [read_image(p) for p in args.image]
    loaded = load_checkpoint_of(args, "vqrae", "reconstruction")
    size = int(args.image_size or checkpoint_stage(loaded.config, loaded.meta).image_size)
    recon, ids, metrics = reconstruct_images(
        loaded.model, images, image_size=size, batch_size=args.batch_size
    )
    os.makedirs(args.out, exist_ok=True)
    names = []
    for path, r, i in zip(args.image, recon, ids):
        stem = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
        Image.fromarray(r).save(f"{stem}_recon.png")
        np.save(f"{stem}_ids.npy", i)
        names.append(stem)
    summary = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "image_size": size,
        "images": args.image,
        **metrics,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"reconstructed {len(names)} images to {args.out}: PSNR {metrics['psnr']:.2f} dB, "
        f"SSIM {metrics['ssim']:.4f}, codebook use {metrics['codebook_utilisation']:.4f}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
