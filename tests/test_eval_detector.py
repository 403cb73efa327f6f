"""The classical shapes detector against the renderer's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from unified_mm.data.shapes_render import COLOURS, SHAPES, ObjectSpec, render_objects
from unified_mm.eval.shapes_detector import (
    detect_objects,
    relation_decidable,
    relative_position,
    segment_colours,
    validate_detector,
)


@pytest.mark.parametrize("size,images", [(32, 300), (64, 200), (128, 40)])
def test_detector_accuracy_on_rendered_dataset(size, images):
    r = validate_detector(size, num_images=images)
    print(f"detector @ {size}px: {r}")
    assert r["images"] == images
    assert r["accuracy"] >= 0.99, r
    assert r["object_accuracy"] >= 0.995 and r["count_accuracy"] >= 0.99, r
    assert r["relation_accuracy"] >= 0.99 and r["relation_pairs"] > images // 2, r
    assert r["spurious_objects"] == 0


def test_every_shape_and_colour_at_the_minimum_size():
    for shape in SHAPES:
        for colour in COLOURS:
            img = render_objects([ObjectSpec(shape, colour, 0.28, 0.47, 0.53)], 32)
            found = detect_objects(img)
            assert [(d.shape, d.colour) for d in found] == [(shape, colour)], (shape, colour)
            assert found[0].iou > 0.8
            assert found[0].cx == pytest.approx(0.47, abs=0.02)
            assert found[0].cy == pytest.approx(0.53, abs=0.02)


def test_counts_and_no_objects_in_noise():
    objs = [ObjectSpec("star", "blue", 0.3, 0.2 + 0.3 * i, 0.25) for i in range(3)]
    objs.append(ObjectSpec("cross", "white", 0.3, 0.5, 0.75))
    found = detect_objects(render_objects(objs, 64))
    assert sorted((d.shape, d.colour) for d in found) == sorted(
        [("star", "blue")] * 3 + [("cross", "white")]
    )
    grey = np.full((32, 32, 3), 127, np.uint8)  # far from every palette colour: unassigned
    assert (segment_colours(grey) == -1).all() and detect_objects(grey) == []
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert detect_objects(noise) == []  # speckles: below the minimum area / no shape fits
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(np.zeros((32, 32, 3), np.float32))


def test_geneval_relation_rule():
    a = (0.0, 0.4, 0.2, 0.6)  # left, vertically centred
    b = (0.6, 0.4, 0.8, 0.6)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    c = (0.6, 0.7, 0.8, 0.9)  # diagonal: both relations
    assert relative_position(a, (0.6, 0.7, 0.8, 0.9)) == {"left of"}  # dy/|offset| = 0.42
    assert relative_position((0.1, 0.1, 0.3, 0.3), c) == {"left of", "above"}
    # overlapping boxes whose offset is eaten by the 0.1 x (dims) threshold: no relation
    assert relative_position((0.4, 0.4, 0.6, 0.6), (0.43, 0.41, 0.63, 0.61)) == frozenset()
    # a pair right on the 0.5 boundary is not decidable at 32 px, a clear one is
    assert relation_decidable(a, b, 0.5 / 32)
    # b's centre below a's by y such that the shrunk x offset / |offset| is exactly 0.5
    y = np.sqrt((0.56 / 0.5) ** 2 - 0.6**2)
    near = (0.6, 0.4 + y, 0.8, 0.6 + y)
    assert not relation_decidable(a, near, 0.5 / 32)
    assert relation_decidable(a, near, 1e-6) is False  # exactly on the boundary
    far = (0.6, 0.4 + y / 2, 0.8, 0.6 + y / 2)
    assert relation_decidable(a, far, 0.5 / 32) and "left of" in relative_position(a, far)
