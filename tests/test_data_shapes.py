"""The embedded shapes dataset: determinism, ground truth, held-out split, GenEval prompts."""

import collections

import numpy as np
import pytest
from scipy import ndimage

from unified_mm.data import shapes
from unified_mm.data.shapes_render import (
    COLOURS,
    MIN_OBJECT_SIZE,
    PALETTE,
    SHAPES,
    ObjectSpec,
    boxes_overlap,
    render_objects,
)


def test_determinism_across_instances_and_sizes():
    a = shapes.ShapesDataset("train", seed=3, image_size=48)
    b = shapes.ShapesDataset("train", seed=3, image_size=48)
    for i in (0, 1, 17, 999_999):
        ea, eb = a[i], b[i]
        np.testing.assert_array_equal(ea.image, eb.image)
        assert (ea.caption, ea.qa, ea.objects, ea.prompt) == (
            eb.caption,
            eb.qa,
            eb.objects,
            eb.prompt,
        )
    # Other seeds / indices give other scenes; other resolutions the same scene.
    assert a[0].objects != shapes.ShapesDataset("train", seed=4, image_size=48)[0].objects
    assert a[0].objects != a[1].objects
    big = shapes.ShapesDataset("train", seed=3, image_size=512)[5]
    assert big.image.shape == (512, 512, 3) and big.objects == a[5].objects
    for bad in (31, 513):
        with pytest.raises(ValueError, match="outside 32..512"):
            shapes.ShapesDataset("train", image_size=bad)
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes.ShapesDataset("test")


def _components(image: np.ndarray, colour: str) -> list[tuple[slice, slice]]:
    mask = (image == np.array(PALETTE[colour], np.uint8)).all(-1)
    labels, _ = ndimage.label(mask)
    return ndimage.find_objects(labels)


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_matches_pixels_and_text(size):
    ds = shapes.ShapesDataset("train", seed=0, image_size=size)
    categories = collections.Counter()
    for i in range(300):
        ex = ds[i]
        categories[ex.category] += 1
        objs = ex.objects
        assert 1 <= len(objs) <= 4 and ex.image.dtype == np.uint8
        # Pixels: only background and object colours; one connected component per object.
        colours = collections.Counter(o.colour for o in objs)
        px = ex.image.reshape(-1, 3).astype(np.int64)
        present = set(np.unique(px[:, 0] << 16 | px[:, 1] << 8 | px[:, 2]).tolist())
        assert present <= {0} | {r << 16 | g << 8 | b for r, g, b in (PALETTE[c] for c in colours)}
        for colour, n in colours.items():
            assert len(_components(ex.image, colour)) == n, (i, ex.caption)
        for o in objs:
            assert o.size * size >= 8  # readable at 32 px
            assert 0 <= o.box()[0] and o.box()[2] <= 1 and 0 <= o.box()[1] and o.box()[3] <= 1
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                assert not boxes_overlap(objs[a], objs[b], gap=0.0)
        # Caption <-> spec <-> objects.
        spec = ex.prompt
        assert spec.caption == ex.caption and spec.category == ex.category
        assert sum(g.count for g in spec.groups) == len(objs)
        for g in spec.groups:
            match = [o for o in objs if o.shape == g.shape and g.colour in (None, o.colour)]
            assert len(match) == g.count
            assert shapes.group_phrase(g) in ex.caption
        if spec.relation:
            ga = [o for o in objs if o.shape == spec.groups[0].shape]
            gb = [o for o in objs if o.shape == spec.groups[1].shape]
            assert all(shapes.relation_holds(a, b, spec.relation) for a in ga for b in gb)
        # Every answer follows from the object list.
        by_shape = collections.Counter(o.shape for o in objs)
        for q, a, qt in ex.qa:
            if qt == "colour":
                shape = q.split()[-1].rstrip("?")
                assert [o.colour for o in objs if o.shape == shape] == [a]
            elif qt == "count":
                plural = q.split()[2]
                shape = next(s for s in SHAPES if shapes.SHAPE_PLURALS[s] == plural)
                assert shapes.NUMBER_WORDS[by_shape[shape]] == a
            elif qt == "exist":
                colour, shape = q.rstrip("?").split()[-2:]
                assert (a == "yes") == any(o.shape == shape and o.colour == colour for o in objs)
            elif qt == "shape":
                colour = q.split()[4]
                assert [o.shape for o in objs if o.colour == colour] == [a]
            elif qt == "position":
                s1, s2 = q.split()[2], q.rstrip("?").split()[-1]
                rel = " ".join(q.split()[3:-2])
                o1 = next(o for o in objs if o.shape == s1)
                o2 = next(o for o in objs if o.shape == s2)
                assert shapes.relation_holds(o1, o2, rel) == (a == "yes")
            else:
                assert qt == "caption" and a == shapes.describe_objects(objs)
    assert set(categories) == set(shapes.CATEGORIES)


def test_heldout_split_is_disjoint_from_train():
    heldout_phrases = {f"{c} {s}" for s, c in shapes.HELDOUT_PAIRS}
    heldout_phrases |= {f"{c} {shapes.SHAPE_PLURALS[s]}" for s, c in shapes.HELDOUT_PAIRS}
    train = shapes.ShapesDataset("train", seed=0, image_size=32)
    for i in range(1500):
        spec, objs, qa = train.scene(i)
        assert not {(o.shape, o.colour) for o in objs} & shapes.HELDOUT_PAIRS
        texts = [spec.caption] + [t for q, a, _ in qa for t in (q, a)]
        assert not any(p in t for p in heldout_phrases for t in texts), texts
    held = shapes.ShapesDataset("heldout", seed=0, image_size=32)
    named = 0
    for i in range(600):
        spec, objs, _ = held.scene(i)
        assert {(o.shape, o.colour) for o in objs} & shapes.HELDOUT_PAIRS
        named += any(p in spec.caption for p in heldout_phrases)
        if spec.category in ("colors", "color_attr", "counting", "position"):
            assert any(p in spec.caption for p in heldout_phrases), spec.caption
    assert named > 300
    # Held-out images are new scenes, not recoloured train scenes.
    assert train[0].objects != held[0].objects


def test_geneval_prompts_and_reference_scenes():
    prompts = shapes.geneval_prompts(5, split="heldout", seed=1)
    assert [p.category for p in prompts] == [c for c in shapes.CATEGORIES for _ in range(5)]
    assert prompts == shapes.geneval_prompts(5, split="heldout", seed=1)
    for p in prompts:
        if p.category in ("colors", "color_attr", "counting", "position"):
            assert any((g.shape, g.colour) in shapes.HELDOUT_PAIRS for g in p.groups)
        objs = shapes.scene_for_prompt(p, seed=2, split="heldout")
        for g in p.groups:
            assert sum(o.shape == g.shape and g.colour in (None, o.colour) for o in objs) == g.count
        if p.relation:
            a = [o for o in objs if o.shape == p.groups[0].shape]
            b = [o for o in objs if o.shape == p.groups[1].shape]
            assert all(shapes.relation_holds(x, y, p.relation) for x in a for y in b)
    counts = {
        p.groups[0].count
        for p in shapes.geneval_prompts(30, split="train")
        if p.category == "counting"
    }
    assert counts == {2, 3, 4}


def test_shapes_are_distinguishable_at_32px():
    """Template matching on the rendered ground truth recovers every shape (evaluator premise)."""
    ds = shapes.ShapesDataset("train", seed=5, image_size=32)
    correct = total = 0
    for i in range(150):
        ex = ds[i]
        for o in ex.objects:
            single = render_objects([o], 32).any(-1)
            scores = {}
            for s in SHAPES:
                t = render_objects([ObjectSpec(s, "white", o.size, o.cx, o.cy)], 32)[..., 0] > 0
                scores[s] = (t & single).sum() / (t | single).sum()
            correct += max(scores, key=scores.get) == o.shape
            total += 1
            # Runner-up clearly worse: no two shapes render alike at the minimum size.
            assert sorted(scores.values())[-2] < 0.9
    assert correct == total


def test_render_objects_api():
    objs = [ObjectSpec("circle", "red", 0.5, 0.5, 0.5)]
    img = render_objects(objs, 32)
    assert img.shape == (32, 32, 3) and tuple(img[16, 16]) == PALETTE["red"]
    assert tuple(img[0, 0]) == (0, 0, 0)
    aa = render_objects(objs, 32, antialias=4)
    edge = {tuple(c) for c in aa.reshape(-1, 3)} - {(0, 0, 0), PALETTE["red"]}
    assert edge  # blended edge pixels exist only with antialiasing
    with pytest.raises(ValueError, match="unknown shape"):
        render_objects([ObjectSpec("hexagon", "red", 0.3, 0.5, 0.5)], 32)
    with pytest.raises(ValueError, match="unknown colour"):
        render_objects([ObjectSpec("circle", "pink", 0.3, 0.5, 0.5)], 32)
    assert MIN_OBJECT_SIZE * 32 >= 8 and len(COLOURS) == len(set(PALETTE.values()))
