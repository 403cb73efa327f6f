"""Rasterisation of the embedded shapes dataset: palette, shape geometry, `render_objects`.

Everything here is pure numpy and exactly reproducible: an object list renders to the same bytes
on every machine. Object geometry lives in normalised image coordinates (0..1), so one object
list renders at any resolution; the evaluator re-renders ground truth through `render_objects`.

The shapes are chosen to stay geometrically distinct at 32 px with the minimum object size
(`MIN_OBJECT_SIZE` of the image side, 9 px at 32 px): a detector that segments by palette colour
and classifies connected components by geometry (fill ratio, symmetry, convexity) separates them.
Hexagons and pentagons are left out on purpose: at 9 px they are indistinguishable from circles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}

# Saturated, pairwise far apart in RGB (min distance > 100) so nearest-palette segmentation is
# unambiguous; black is the background and therefore not an object colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (245, 235, 50),
    "green": (30, 180, 50),
    "cyan": (0, 220, 230),
    "blue": (30, 70, 230),
    "purple": (150, 50, 210),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# Sizes are the side of the object's square bounding box, as a fraction of the image side.
MIN_OBJECT_SIZE = 0.28
MAX_OBJECT_SIZE = 0.6
# Free space kept between bounding boxes and to the image border (fractions of the side).
OBJECT_GAP = 0.05
BORDER_MARGIN = 0.02
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One rendered object. `size`, `cx`, `cy` are fractions of the image side (y points down)."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the square bounding box in normalised coordinates."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _star_polygon() -> np.ndarray:
    """Five-pointed star, point up, vertically centred in [-1, 1]; returns (10, 2) vertices."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    # The lower points reach only cos(36 deg) = 0.81: centre the extent vertically, then scale
    # so the star touches its bounding box like the other shapes.
    pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2
    return pts / np.abs(pts).max()


_STAR = _star_polygon()


def _polygon_edges(poly: np.ndarray) -> tuple[tuple[float, float, float, float], ...]:
    """(x0, y0, y1, dx/dy) per non-horizontal edge, precomputed for `_inside_polygon`."""
    edges = []
    for i in range(len(poly)):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % len(poly)]
        if y1 != y0:
            edges.append((float(x0), float(y0), float(y1), float((x1 - x0) / (y1 - y0))))
    return tuple(edges)


_STAR_EDGES = _polygon_edges(_STAR)


def _inside_polygon(u: np.ndarray, v: np.ndarray, edges) -> np.ndarray:
    """Even-odd rule, vectorised over points (u, v broadcast against each other)."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for x0, y0, y1, slope in edges:
        inside ^= ((y0 > v) != (y1 > v)) & (u < x0 + (v - y0) * slope)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` for points (u, v) in the object's local frame [-1, 1]^2."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the box.
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return (np.minimum(au, av) <= 1.0 / 3.0) & (np.maximum(au, av) <= 1.0)
    if shape == "star":
        return _inside_polygon(u, v, _STAR_EDGES)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


# Shapes whose sharp tips can sample to a pixel touching the body only diagonally; such
# fragments would count as extra objects for a connected-components detector.
_THIN_TIPPED = frozenset({"star"})


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keeps the largest 4-connected component: every object renders as exactly one."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def validate_objects(objects: list[ObjectSpec] | tuple[ObjectSpec, ...]) -> None:
    """One-line ValueError for an object that cannot be rendered."""
    for o in objects:
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}; known: {', '.join(SHAPES)}")
        if o.colour not in PALETTE:
            raise ValueError(f"unknown colour {o.colour!r}; known: {', '.join(COLOURS)}")
        if not 0.0 < o.size <= 1.0:
            raise ValueError(f"object size {o.size} is outside (0, 1]")


def render_objects(
    objects: list[ObjectSpec] | tuple[ObjectSpec, ...],
    image_size: int,
    *,
    antialias: int = 1,
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """Renders objects (painted in list order) to a uint8 [image_size, image_size, 3] image.

    Pixel (x, y) is sampled at its centre ((x + 0.5) / S). With `antialias=a > 1` each pixel
    averages an a x a grid of sub-samples (coverage blending); `antialias=1` gives hard edges and
    only palette colours, which is what the geometry detector is calibrated on.
    """
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if antialias < 1:
        raise ValueError(f"antialias must be >= 1, got {antialias}")
    validate_objects(objects)
    s = image_size
    img = np.empty((s, s, 3), dtype=np.float32 if antialias > 1 else np.uint8)
    img[...] = background
    for o in objects:
        x0, y0, x1, y1 = o.box()
        # Pixel range that can contain the object (clipped to the image).
        px0, py0 = max(int(np.floor(x0 * s)), 0), max(int(np.floor(y0 * s)), 0)
        px1, py1 = min(int(np.ceil(x1 * s)), s), min(int(np.ceil(y1 * s)), s)
        if px1 <= px0 or py1 <= py0:
            continue
        half = o.size * s / 2
        if antialias == 1:
            xs = (np.arange(px0, px1) + 0.5 - o.cx * s) / half
            ys = (np.arange(py0, py1) + 0.5 - o.cy * s) / half
            mask = shape_mask(o.shape, xs[None, :], ys[:, None])
            if o.shape in _THIN_TIPPED:
                mask = _largest_component(mask)
            img[py0:py1, px0:px1][mask] = PALETTE[o.colour]
        else:
            a = antialias
            sub = (np.arange(a) + 0.5) / a
            xs = ((np.arange(px0, px1)[:, None] + sub[None, :]).reshape(-1) - o.cx * s) / half
            ys = ((np.arange(py0, py1)[:, None] + sub[None, :]).reshape(-1) - o.cy * s) / half
            m = shape_mask(o.shape, xs[None, :], ys[:, None]).astype(np.float32)
            cover = m.reshape(py1 - py0, a, px1 - px0, a).mean(axis=(1, 3))[..., None]
            patch = img[py0:py1, px0:px1]
            img[py0:py1, px0:px1] = patch * (1 - cover) + np.float32(PALETTE[o.colour]) * cover
    if antialias > 1:
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img


def boxes_overlap(a: ObjectSpec, b: ObjectSpec, gap: float = OBJECT_GAP) -> bool:
    """True if the bounding boxes, grown by gap / 2 on every side, intersect."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)
