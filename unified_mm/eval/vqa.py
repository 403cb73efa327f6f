"""shapes-VQA: exact-match accuracy on held-out questions, per question type.

Questions come from held-out examples of the shapes dataset (`split="heldout"`: every image holds
a (shape, colour) pair never seen in training). Types are taken in turn so each is about equally
represented; an example that has no question of the type due gives the next type it has.

shapes-VQA is the short-answer types (`VQA_TYPES`: colour, count, exist, shape, position), like
VQAv2/GQA. "Describe the image." is captioning, not a question with one short answer (a
two-group caption may name its groups in either order), so its exact match is reported on its
own (`qtypes=CAPTION_TYPES`) and is not part of the VQA score.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from unified_mm.data.shapes import QTYPES, ShapesDataset

CAPTION_TYPES: tuple[str, ...] = ("caption",)
VQA_TYPES: tuple[str, ...] = tuple(t for t in QTYPES if t not in CAPTION_TYPES)


@dataclasses.dataclass(frozen=True)
class Question:
    image: np.ndarray
    question: str
    answer: str
    qtype: str
    index: int  # example index in its split


def shapes_questions(
    n: int,
    *,
    image_size: int,
    seed: int = 0,
    split: str = "heldout",
    qtypes: Sequence[str] = VQA_TYPES,
) -> list[Question]:
    """`n` questions about the first `n` examples of `split`, the types of `qtypes` in turn."""
    if n < 1:
        raise ValueError(f"number of VQA questions must be >= 1, got {n}")
    unknown = [t for t in qtypes if t not in QTYPES]
    if unknown or not qtypes:
        raise ValueError(f"question types {list(qtypes)} must be a non-empty subset of {QTYPES}")
    ds = ShapesDataset(split, seed=seed, image_size=image_size)
    out = []
    for i in range(n):
        ex = ds[i]
        by_type = collections.defaultdict(list)
        for q, a, t in ex.qa:
            by_type[t].append((q, a))
        qtype = None
        for k in range(len(qtypes)):
            qtype = qtypes[(i + k) % len(qtypes)]
            if by_type.get(qtype):
                break
        pool = by_type[qtype]
        if not pool:
            raise ValueError(f"{split} example {i} has no question of types {list(qtypes)}")
        rng = np.random.default_rng((seed, 0x7A5, i))
        q, a = pool[int(rng.integers(len(pool)))]
        out.append(Question(ex.image, q, a, qtype, i))
    return out


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing full stop (the exact-match key)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").strip()


def score_answers(questions: Sequence[Question], answers: Sequence[str]) -> tuple[dict, list[dict]]:
    """(summary: per-type accuracy, "overall" over all questions, "mean_per_type"; records)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    per: dict[str, list[bool]] = collections.defaultdict(list)
    records = []
    for q, a in zip(questions, answers):
        ok = normalize_answer(a) == normalize_answer(q.answer)
        per[q.qtype].append(ok)
        records.append(
            {
                "index": q.index,
                "qtype": q.qtype,
                "question": q.question,
                "answer": q.answer,
                "prediction": a,
                "correct": ok,
            }
        )
    summary = {t: float(np.mean(per[t])) for t in QTYPES if per.get(t)}
    summary["overall"] = float(np.mean([r["correct"] for r in records])) if records else 0.0
    summary["mean_per_type"] = float(np.mean([summary[t] for t in per])) if per else 0.0
    summary["questions"] = len(records)
    return summary, records


def answer_budget(tokenizer, questions: Sequence[Question]) -> int:
    """New tokens needed by the longest reference answer plus its end-of-turn token."""
    return max(len(tokenizer.encode(q.answer)) for q in questions) + 1


def evaluate_vqa(
    answer_fn: Callable[[Sequence[np.ndarray], Sequence[str], int], list[str]],
    tokenizer,
    *,
    num_questions: int,
    image_size: int,
    seed: int = 0,
    qtypes: Sequence[str] = VQA_TYPES,
    split: str = "heldout",
) -> tuple[dict, list[dict]]:
    """Asks `answer_fn(images, questions, max_new_tokens)` the held-out questions and scores them
    (`split="train"`: fresh train-split images instead, the learned-but-not-generalised check)."""
    questions = shapes_questions(
        num_questions, image_size=image_size, seed=seed, qtypes=qtypes, split=split
    )
    answers = answer_fn(
        [q.image for q in questions],
        [q.question for q in questions],
        answer_budget(tokenizer, questions),
    )
    return score_answers(questions, answers)
