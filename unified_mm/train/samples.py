"""Periodic sample grids: TensorBoard images plus PNG files under ``<workdir>/samples``."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from PIL import Image

log = logging.getLogger("unified_mm")


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tiles uint8 NHWC images into one HWC grid with a 2-pixel border."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = (
            images[i]
        )
    return grid


def write_previews(family, model, stage, writer, workdir: str, step: int) -> None:
    """Asks the family for previews and writes them; a failing preview never stops training."""
    try:
        out = family.previews(model, stage, jax.random.key(step))
    except Exception as e:  # previews are diagnostics: log and continue
        log.warning("preview at step %d failed: %s", step, e)
        return
    if not out or jax.process_index() != 0:
        return
    folder = os.path.join(workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    images = {k: np.asarray(v) for k, v in out.get("images", {}).items()}
    if images:
        writer.write_images(step, {k: image_grid(v)[None] for k, v in images.items()})
        for name, batch in images.items():
            Image.fromarray(image_grid(batch)).save(
                os.path.join(folder, f"{stage.name}_step{step:07d}_{name}.png")
            )
    texts = out.get("texts", {})
    if texts:
        writer.write_texts(step, {k: str(v) for k, v in texts.items()})
        with open(os.path.join(folder, f"{stage.name}_step{step:07d}_texts.json"), "w") as f:
            json.dump(texts, f, indent=1)
