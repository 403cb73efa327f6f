"""A classical object detector for the shapes dataset (the GenEval detector of this project).

Pipeline for one uint8 RGB image:

1. colour segmentation: every pixel goes to its nearest colour among the renderer's palette and
   the black background; pixels farther than `colour_threshold` from all of them stay unassigned
   (blurry or off-palette pixels of generated images);
2. connected components per palette colour (8-connectivity: a minimum-size star's legs touch its
   body only diagonally at 32 px; the dataset keeps >= 1 empty pixel between objects);
3. shape classification by geometry: the component is compared with each shape's exact geometry
   (`shapes_render.shape_mask`) fitted to the component's bounding box over a small grid of
   sub-pixel centres and sizes; the best intersection-over-union wins, and a component that fits
   no shape with IoU >= `min_iou` is not an object (the detector's confidence threshold);
4. positions: the centre of the fitted shape's box, which is exactly the dataset's object centre
   (a triangle's area centroid would sit lower), and its box for GenEval's relation rule.

`validate_detector` measures the detector against the ground-truth object lists of rendered
dataset images; the evaluation suite reports it next to every GenEval score.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unified_mm.data.shapes_render import (
    BACKGROUND,
    COLOURS,
    MIN_OBJECT_SIZE,
    PALETTE,
    SHAPES,
    ObjectSpec,
    shape_mask,
)

# GenEval's `POSITION_THRESHOLD`: the centre offset is shrunk by this fraction of the summed box
# dimensions before the direction test.
POSITION_THRESHOLD = 0.1
_EIGHT = np.ones((3, 3), dtype=bool)
# Palette row 0 is the background, rows 1.. the object colours in COLOURS order.
_COLOUR_TABLE = np.array([BACKGROUND, *(PALETTE[c] for c in COLOURS)], dtype=np.float32)
# Sub-pixel search grid of the shape fit: centre offsets and size increments in pixels.
_CENTRE_OFFSETS = (-0.25, 0.0, 0.25)
_SIZE_OFFSETS = (-0.5, 0.0, 0.5, 1.0, 1.5)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector (defaults validated on rendered data at 32, 64 and 128 px)."""

    # Max RGB distance of a pixel to its palette colour (palette colours are > 100 apart).
    colour_threshold: float = 90.0
    # Smallest component kept, as a fraction of the image area (a minimum-size star covers ~2.7%).
    min_area_fraction: float = 0.01
    # Components whose best shape fit has a lower IoU are not counted as objects.
    min_iou: float = 0.5


DEFAULT_DETECTOR = DetectorConfig()


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object. Coordinates are fractions of the image side (y points down)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float  # side of the fitted square box
    iou: float  # fit quality of `shape` (the detection's confidence)
    area: int  # pixels in the component

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def segment_colours(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Per-pixel label: -1 unassigned, 0 background, 1 + i for COLOURS[i]."""
    img = _check_image(image).astype(np.float32)
    d2 = ((img[:, :, None, :] - _COLOUR_TABLE[None, None]) ** 2).sum(-1)
    label = d2.argmin(-1).astype(np.int32)
    far = d2.min(-1) > config.colour_threshold**2
    return np.where(far, -1, label)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"detector: expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}"
        )
    return image


def _fit_shape(mask: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best (shape, iou, cx, cy, size) in pixels for one component mask cropped at (x0, y0)."""
    h, w = mask.shape
    pad = 2
    window = np.zeros((h + 2 * pad, w + 2 * pad), bool)
    window[pad : pad + h, pad : pad + w] = mask
    # Pixel centres of the window in image pixel coordinates.
    xs = np.arange(w + 2 * pad) + (x0 - pad) + 0.5
    ys = np.arange(h + 2 * pad) + (y0 - pad) + 0.5
    bx, by = x0 + w / 2, y0 + h / 2  # bounding-box centre (continuous coordinates)
    base = float(max(w, h))
    # Most central candidates first: argmax keeps the first of equal fits, and a pixel grid leaves
    # sub-pixel shifts and sizes unresolved, where the box centre and size are the unbiased guess.
    offsets = sorted(
        ((dx, dy, ds) for dx in _CENTRE_OFFSETS for dy in _CENTRE_OFFSETS for ds in _SIZE_OFFSETS),
        key=lambda o: abs(o[0]) + abs(o[1]) + abs(o[2]),
    )
    cands = np.array([(bx + dx, by + dy, base + ds) for dx, dy, ds in offsets if base + ds > 1.0])
    half = cands[:, 2:3] / 2
    u = (xs[None, None, :] - cands[:, 0:1, None]) / half[:, :, None]  # [K, 1, W]
    v = (ys[None, :, None] - cands[:, 1:2, None]) / half[:, :, None]  # [K, H, 1]
    area = window.sum()
    best = ("", -1.0, bx, by, base)
    for shape in SHAPES:
        m = shape_mask(shape, u, v)  # [K, H, W]
        inter = (m & window).sum(axis=(1, 2))
        iou = inter / (m.sum(axis=(1, 2)) + area - inter)
        k = int(np.argmax(iou))
        if iou[k] > best[1]:
            best = (shape, float(iou[k]), *map(float, cands[k]))
    return best


def detect_objects(image: np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """Objects in one uint8 [S, S, 3] image (sorted by colour, then top-to-bottom)."""
    image = _check_image(image)
    s_h, s_w = image.shape[:2]
    side = float(max(s_h, s_w))
    labels = segment_colours(image, config)
    min_area = config.min_area_fraction * s_h * s_w
    out: list[Detection] = []
    for ci, colour in enumerate(COLOURS, start=1):
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        if n == 0:
            continue
        for j, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == j
            area = int(mask.sum())
            if area < min_area:
                continue
            shape, iou, cx, cy, size = _fit_shape(mask, sl[1].start, sl[0].start)
            if iou < config.min_iou:
                continue
            out.append(Detection(shape, colour, cx / side, cy / side, size / side, iou, area))
    return out


def detect_batch(
    images: np.ndarray | Sequence[np.ndarray], config: DetectorConfig = DetectorConfig()
) -> list[list[Detection]]:
    return [detect_objects(np.asarray(im), config) for im in images]


# ------------------------------------------------------------------------------------------------
# GenEval's relation rule


_RELATION_NAMES = ("left of", "right of", "above", "below")


def _relation_flags(offset: np.ndarray, dims: np.ndarray, threshold: float) -> np.ndarray:
    """GenEval's rule, vectorised: offset, dims [..., 2] -> flags [..., 4] in _RELATION_NAMES order."""
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    norm = np.maximum(np.linalg.norm(offset, axis=-1, keepdims=True), 1e-12)
    d = shrunk / norm
    none = np.all(np.abs(shrunk) < 1e-3, axis=-1, keepdims=True)
    flags = np.concatenate(
        [d[..., :1] < -0.5, d[..., :1] > 0.5, d[..., 1:] < -0.5, d[..., 1:] > 0.5], axis=-1
    )
    return flags & ~none


def _offset_dims(a, b) -> tuple[np.ndarray, np.ndarray]:
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    return ca - cb, dims


def relative_position(
    a: tuple[float, float, float, float],
    b: tuple[float, float, float, float],
    threshold: float = POSITION_THRESHOLD,
) -> frozenset[str]:
    """Relations of box a to box b ((x0, y0, x1, y1), y down) under GenEval's rule.

    The centre offset is shrunk per axis by threshold x (sum of the two boxes' extents on that
    axis); a relation holds when the shrunk offset, divided by the length of the raw offset,
    exceeds 0.5 in its direction. Both a diagonal relation pair and none at all are possible.
    """
    flags = _relation_flags(*_offset_dims(a, b), threshold)
    return frozenset(n for n, f in zip(_RELATION_NAMES, flags) if f)


def relation_decidable(
    a: tuple[float, float, float, float],
    b: tuple[float, float, float, float],
    tolerance: float,
    threshold: float = POSITION_THRESHOLD,
) -> bool:
    """Whether GenEval's relation set of (a, b) stays the same when each centre moves by up to
    `tolerance` per axis and each box side by up to 2 x `tolerance` (the localisation error a
    pixel grid allows: `tolerance` = half a pixel). Pairs on a rule boundary are not decidable
    from a rendered image at that resolution."""
    offset, dims = _offset_dims(a, b)
    steps = np.array([-2.0, 0.0, 2.0]) * tolerance  # both centres move: the offset moves twice
    grid = np.stack(np.meshgrid(steps, steps, steps * 2, indexing="ij"), -1).reshape(-1, 3)
    offsets = offset[None] + grid[:, :2]
    dims_p = dims[None] + grid[:, 2:3]
    flags = _relation_flags(offsets, dims_p, threshold)
    return bool(np.all(flags == flags[:1]))


# ------------------------------------------------------------------------------------------------
# Validation against rendered ground truth


def _match(truth: Sequence[ObjectSpec], found: Sequence[Detection]) -> list[int | None]:
    """Index of the detection matched to each ground-truth object (nearest centre, one-to-one,
    within half the object's size), or None."""
    pairs = sorted(
        (np.hypot(t.cx - d.cx, t.cy - d.cy), i, j)
        for i, t in enumerate(truth)
        for j, d in enumerate(found)
    )
    out: list[int | None] = [None] * len(truth)
    used: set[int] = set()
    for dist, i, j in pairs:
        if out[i] is None and j not in used and dist < truth[i].size / 2:
            out[i], _ = j, used.add(j)
    return out


@dataclasses.dataclass
class _Tally:
    images: int = 0
    images_ok: int = 0
    objects: int = 0
    objects_ok: int = 0
    spurious: int = 0
    counts_ok: int = 0
    pairs: int = 0
    pairs_ok: int = 0
    pairs_undecidable: int = 0
    pairs_undecidable_ok: int = 0
    images_ok_all_pairs: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def compare_to_truth(
    truth: Sequence[ObjectSpec],
    found: Sequence[Detection],
    *,
    image_size: int,
    tally: _Tally | None = None,
) -> bool:
    """Whether detections reproduce the ground truth exactly: every object found with its shape
    and colour, no spurious object, per-(shape, colour) counts equal, and GenEval's relation set
    of every ordered object pair equal to the one of the true boxes (pairs that sit on a rule
    boundary within half a pixel are counted apart as undecidable, see `relation_decidable`)."""
    t = tally if tally is not None else _Tally()
    match = _match(truth, found)
    ok = True
    t.images += 1
    for obj, j in zip(truth, match):
        t.objects += 1
        if j is None:
            t.errors["missed"] += 1
            ok = False
        elif (found[j].shape, found[j].colour) != (obj.shape, obj.colour):
            t.errors[f"{obj.shape}->{found[j].shape}"] += 1
            ok = False
        else:
            t.objects_ok += 1
    extra = len(found) - sum(j is not None for j in match)
    t.spurious += extra
    ok &= extra == 0
    want = collections.Counter((o.shape, o.colour) for o in truth)
    got = collections.Counter((d.shape, d.colour) for d in found)
    t.counts_ok += want == got
    ok &= want == got
    ok_all = ok
    for i, a in enumerate(truth):
        for k, b in enumerate(truth):
            if i == k:
                continue
            ja, jb = match[i], match[k]
            same = (
                ja is not None
                and jb is not None
                and relative_position(found[ja].box(), found[jb].box())
                == relative_position(a.box(), b.box())
            )
            ok_all &= same
            if not relation_decidable(a.box(), b.box(), 0.5 / image_size):
                t.pairs_undecidable += 1
                t.pairs_undecidable_ok += same
                continue
            t.pairs += 1
            t.pairs_ok += same
            ok &= same
    t.images_ok += ok
    t.images_ok_all_pairs += ok_all
    return ok


def validate_detector(
    image_size: int,
    *,
    num_images: int = 300,
    seed: int = 1234,
    splits: Sequence[str] = ("train", "heldout"),
    antialias: int = 1,
    config: DetectorConfig = DetectorConfig(),
) -> dict:
    """Accuracy of `detect_objects` on rendered dataset images against their object lists.

    `accuracy` is the strict per-image rate (every object, count and pairwise relation right);
    the object-, count- and relation-level rates and the confusions are reported beside it.
    """
    from unified_mm.data.shapes import ShapesDataset

    tally = _Tally()
    per_split = max(1, num_images // len(splits))
    for split in splits:
        ds = ShapesDataset(split, seed=seed, image_size=image_size, antialias=antialias)
        for i in range(per_split):
            ex = ds[i]
            found = detect_objects(ex.image, config)
            compare_to_truth(ex.objects, found, image_size=image_size, tally=tally)
    n = max(tally.images, 1)
    return {
        "image_size": image_size,
        "antialias": antialias,
        "images": tally.images,
        "accuracy": tally.images_ok / n,
        "object_accuracy": tally.objects_ok / max(tally.objects, 1),
        "count_accuracy": tally.counts_ok / n,
        "relation_accuracy": tally.pairs_ok / max(tally.pairs, 1),
        "relation_pairs": tally.pairs,
        "relation_pairs_undecidable": tally.pairs_undecidable,
        # The same with boundary pairs included (what a pixel grid cannot always get right).
        "relation_accuracy_undecidable_pairs": tally.pairs_undecidable_ok
        / max(tally.pairs_undecidable, 1),
        "accuracy_all_pairs": tally.images_ok_all_pairs / n,
        "spurious_objects": tally.spurious,
        "errors": dict(tally.errors),
    }


def min_object_pixels(image_size: int) -> float:
    """Side in pixels of the smallest object the dataset renders at `image_size`."""
    return MIN_OBJECT_SIZE * image_size
