"""shapes-GenEval scoring rules and shapes-VQA scoring."""

from __future__ import annotations

import numpy as np
import pytest

from unified_mm.data.shapes import (
    CATEGORIES,
    QTYPES,
    ObjectGroup,
    PromptSpec,
    ShapesDataset,
    geneval_prompts,
)
from unified_mm.data.shapes_render import ObjectSpec, render_objects
from unified_mm.eval import geneval, vqa
from unified_mm.eval.shapes_detector import detect_objects


def _score(spec: PromptSpec, objects, size: int = 64) -> tuple[bool, str]:
    image = render_objects(objects, size)
    return geneval.score_image(geneval.geneval_metadata(spec), detect_objects(image))


def _spec(category, groups, relation=None):
    return PromptSpec(category, "test prompt", tuple(groups), relation)


def test_wrong_image_scores_zero():
    spec = _spec("colors", [ObjectGroup("circle", 1, "blue")])
    ok, reason = _score(spec, [ObjectSpec("square", "red", 0.5, 0.5, 0.5)])
    assert not ok and "circle" in reason
    summary, _ = geneval.score_generations(
        [spec],
        [render_objects([ObjectSpec("square", "red", 0.5, 0.5, 0.5)], 32)],
        images_per_prompt=1,
    )
    assert summary["colors"] == 0.0 and summary["overall"] == 0.0
    # the right shape in the wrong colour also fails, the right object passes
    assert not _score(spec, [ObjectSpec("circle", "red", 0.5, 0.5, 0.5)])[0]
    assert _score(spec, [ObjectSpec("circle", "blue", 0.5, 0.5, 0.5)])[0]


def test_category_rules():
    two = _spec("two_object", [ObjectGroup("star", 1), ObjectGroup("cross", 1)])
    star = ObjectSpec("star", "white", 0.35, 0.25, 0.3)
    cross = ObjectSpec("cross", "green", 0.35, 0.75, 0.7)
    assert _score(two, [star, cross])[0]
    assert not _score(two, [star])[0]

    count = _spec("counting", [ObjectGroup("square", 3, "yellow")])
    squares = [
        ObjectSpec("square", "yellow", 0.3, x, y)
        for x, y in ((0.2, 0.2), (0.6, 0.2), (0.2, 0.7), (0.65, 0.7))
    ]
    assert _score(count, squares[:3])[0]
    ok, reason = _score(count, squares)  # four: the exclude clause fails exact counting
    assert not ok and "square<4" in reason
    assert not _score(count, squares[:2])[0]

    attr = _spec("color_attr", [ObjectGroup("star", 1, "white"), ObjectGroup("cross", 1, "green")])
    assert _score(attr, [star, cross])[0]
    swapped = [
        ObjectSpec("star", "green", 0.35, 0.25, 0.3),
        ObjectSpec("cross", "white", 0.35, 0.75, 0.7),
    ]
    assert not _score(attr, swapped)[0]

    pos = _spec("position", [ObjectGroup("star", 1, "white"), ObjectGroup("cross", 1)], "left of")
    left = ObjectSpec("star", "white", 0.3, 0.2, 0.5)
    right = ObjectSpec("cross", "red", 0.3, 0.8, 0.5)
    assert _score(pos, [left, right])[0]
    ok, reason = _score(
        pos, [ObjectSpec("star", "white", 0.3, 0.8, 0.5), ObjectSpec("cross", "red", 0.3, 0.2, 0.5)]
    )
    assert not ok and "right of" in reason
    above = _spec("position", [ObjectGroup("star", 1), ObjectGroup("cross", 1)], "above")
    assert not _score(above, [left, right])[0]


def test_metadata_matches_geneval_format():
    pos = _spec("position", [ObjectGroup("star", 1, "white"), ObjectGroup("cross", 2)], "below")
    meta = geneval.geneval_metadata(pos)
    assert meta["tag"] == "position"
    assert meta["include"] == [
        {"class": "cross", "count": 2},
        {"class": "star", "count": 1, "color": "white", "position": ["below", 0]},
    ]
    count = geneval.geneval_metadata(_spec("counting", [ObjectGroup("circle", 4)]))
    assert count["exclude"] == [{"class": "circle", "count": 5}]


def test_summary_is_mean_of_categories():
    results = [
        {"tag": "single_object", "correct": True},
        {"tag": "single_object", "correct": False},
        {"tag": "counting", "correct": True},
    ]
    s = geneval.summarize(results)
    assert s["single_object"] == 0.5 and s["counting"] == 1.0 and s["overall"] == 0.75


def test_ground_truth_scenes_score_near_one():
    specs = geneval_prompts(6)
    assert len(specs) == 6 * len(CATEGORIES)
    s = geneval.ground_truth_score(specs, 32, seeds=2)
    assert set(s) == {*CATEGORIES, "overall"}
    for c in CATEGORIES:
        assert s[c] >= (0.9 if c == "position" else 1.0), s  # GenEval's box rule on boundary pairs


def test_geneval_folder_round_trip(tmp_path):
    spec = _spec("single_object", [ObjectGroup("diamond", 1)])
    good = render_objects([ObjectSpec("diamond", "orange", 0.4, 0.5, 0.5)], 32)
    bad = render_objects([ObjectSpec("circle", "orange", 0.4, 0.5, 0.5)], 32)
    geneval.write_geneval_folder(str(tmp_path), 0, geneval.geneval_metadata(spec), [good, bad])
    summary, results = geneval.score_geneval_folder(str(tmp_path))
    assert [r["correct"] for r in results] == [True, False] and summary["overall"] == 0.5
    with pytest.raises(ValueError, match="no GenEval samples"):
        geneval.score_geneval_folder(str(tmp_path / "00000" / "samples"))


class _WordCount:
    """The one tokenizer method `evaluate_vqa` needs: a token per word."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_vqa_questions_and_scoring():
    qs = vqa.shapes_questions(60, image_size=32)
    # shapes-VQA is the short-answer types; captioning is asked separately
    assert len(qs) == 60 and {q.qtype for q in qs} == set(QTYPES) - {"caption"}
    caps = vqa.shapes_questions(3, image_size=32, qtypes=vqa.CAPTION_TYPES)
    assert [q.question for q in caps] == ["Describe the image."] * 3
    with pytest.raises(ValueError, match="subset"):
        vqa.shapes_questions(3, image_size=32, qtypes=("colour", "weather"))
    again = vqa.shapes_questions(60, image_size=32)
    assert [(q.question, q.answer) for q in qs] == [(q.question, q.answer) for q in again]
    assert all(q.image.shape == (32, 32, 3) for q in qs)
    answers = [q.answer.upper() + "." if i % 2 == 0 else "wrong" for i, q in enumerate(qs)]
    summary, records = vqa.score_answers(qs, answers)
    assert summary["overall"] == 0.5 and summary["questions"] == 60
    assert set(summary) >= set(vqa.VQA_TYPES) | {"overall", "mean_per_type"}
    assert records[0]["correct"] and not records[1]["correct"]
    assert vqa.normalize_answer("  Two  Red squares. ") == "two red squares"
    with pytest.raises(ValueError):
        vqa.score_answers(qs, answers[:-1])
    # evaluate_vqa asks about the split it is given: train-split scenes hold no held-out pair.
    asked = {}

    def record(images, questions, budget):
        asked["n"] = len(images)
        return ["no"] * len(images)

    summary, _ = vqa.evaluate_vqa(record, _WordCount(), num_questions=30, image_size=32)
    train, _ = vqa.evaluate_vqa(
        record, _WordCount(), num_questions=30, image_size=32, split="train"
    )
    assert asked["n"] == 30 and summary["questions"] == train["questions"] == 30
    train_data = ShapesDataset("train", seed=0, image_size=32)
    for q in vqa.shapes_questions(10, image_size=32, split="train"):
        assert np.array_equal(q.image, train_data[q.index].image)


def test_score_generations_checks_the_layout():
    specs = geneval_prompts(1)
    with pytest.raises(ValueError, match="images"):
        geneval.score_generations(specs, np.zeros((3, 32, 32, 3), np.uint8), images_per_prompt=1)
