"""The embedded shapes dataset: procedural image-text examples generated from (seed, split, index).

Each example is 1 to 4 objects (`shapes_render.SHAPES`) in palette colours on a black
background, with a caption in one of GenEval's six prompt families, understanding
question-answer pairs, the ground-truth object list and the structured `PromptSpec` the caption
expresses (what a GenEval-style evaluator checks).

Held-out split: the (shape, colour) pairs in `HELDOUT_PAIRS` never occur in a train image,
caption or question-answer pair; every held-out example contains at least one of them (and its
caption names it whenever the family's caption carries colours).

Nothing is downloaded and nothing random escapes the per-index generator
`np.random.default_rng((seed, split salt, index))`, so example i is the same on every host.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from unified_mm.data import templates
from unified_mm.data.shapes_render import (
    BORDER_MARGIN,
    COLOURS,
    MAX_OBJECT_SIZE,
    MIN_OBJECT_SIZE,
    OBJECT_GAP,
    SHAPE_PLURALS,
    SHAPES,
    ObjectSpec,
    render_objects,
)

# GenEval's six categories, under GenEval's names.
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ANSWER_YES, ANSWER_NO = "yes", "no"
QTYPES: tuple[str, ...] = ("colour", "count", "exist", "shape", "position", "caption")

# One pair per shape and six different colours: every shape and colour still occurs in train.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "green"),
        ("square", "purple"),
        ("triangle", "cyan"),
        ("diamond", "orange"),
        ("cross", "blue"),
        ("star", "white"),
    }
)
SPLITS: tuple[str, ...] = ("train", "heldout")
_SPLIT_SALT = {"train": 0x5A17, "heldout": 0x4E1D}
SPLIT_LENGTHS = {"train": 1_000_000, "heldout": 10_000}

# Question templates (the word-level tokenizer vocabulary is built from these).
Q_COLOUR = "What colour is the {shape}?"
Q_COUNT = "How many {plural} are there?"
Q_EXIST = "Is there {article} {colour} {shape}?"
Q_SHAPE = "What shape is the {colour} object?"
Q_POSITION = "Is the {shape1} {relation} the {shape2}?"
# Centre distance along the relation axis below which a left/right/above/below question is
# ambiguous and is not asked.
RELATION_MARGIN = 0.15


@dataclasses.dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of `shape`; `colour` is None when the prompt does not name a colour."""

    shape: str
    count: int
    colour: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for: the GenEval category, the text and its structured content.

    `relation` (one of RELATIONS) relates groups[0] to groups[1] ("groups[0] is left of groups[1]").
    """

    category: str
    caption: str
    groups: tuple[ObjectGroup, ...]
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class ShapesExample:
    """One example. `image` is uint8 [S, S, 3]; `qa` holds (question, answer, qtype) triples."""

    image: np.ndarray
    caption: str
    qa: tuple[tuple[str, str, str], ...]
    objects: tuple[ObjectSpec, ...]
    category: str
    prompt: PromptSpec
    index: int


def article(word: str) -> str:
    """'an' before a vowel sound ('an orange circle'), else 'a' (all our words are regular)."""
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, n: int) -> str:
    return shape if n == 1 else SHAPE_PLURALS[shape]


def group_phrase(group: ObjectGroup) -> str:
    """'a circle', 'two red squares'."""
    words = [group.colour] if group.colour is not None else []
    words.append(_noun(group.shape, group.count))
    count = article(words[0]) if group.count == 1 else NUMBER_WORDS[group.count]
    return " ".join([count, *words])


def caption_for(category: str, groups: Sequence[ObjectGroup], relation: str | None) -> str:
    """The caption of a prompt family; the inverse is the `PromptSpec` itself."""
    if category == "counting" or len(groups) == 1:
        return group_phrase(groups[0])
    if category == "position":
        return f"{group_phrase(groups[0])} {relation} {group_phrase(groups[1])}"
    return f"{group_phrase(groups[0])} and {group_phrase(groups[1])}"


def describe_objects(objects: Sequence[ObjectSpec]) -> str:
    """Full description listing every object: 'two red squares and a blue circle'."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    order: list[tuple[str, str]] = []
    for o in objects:
        key = (o.shape, o.colour)
        if key not in counts:
            order.append(key)
        counts[key] += 1
    phrases = [group_phrase(ObjectGroup(s, counts[(s, c)], c)) for s, c in order]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _allowed(split: str, shape: str, colour: str) -> bool:
    return split == "heldout" or (shape, colour) not in HELDOUT_PAIRS


_ALLOWED_PAIRS = {
    split: tuple((s, c) for s in SHAPES for c in COLOURS if _allowed(split, s, c))
    for split in SPLITS
}


def _choice(rng: np.random.Generator, items: Sequence):
    # rng.random() is ~5x cheaper than rng.integers() for scalars.
    return items[int(rng.random() * len(items))]


def _pick_colour(
    rng: np.random.Generator, split: str, shape: str, exclude: Sequence[str] = ()
) -> str:
    options = [c for c in COLOURS if c not in exclude and _allowed(split, shape, c)]
    return _choice(rng, options)


def _pick_shapes(rng: np.random.Generator, k: int) -> list[str]:
    return [SHAPES[i] for i in rng.permutation(len(SHAPES))[:k]]


def _sample_spec(rng: np.random.Generator, split: str, category: str) -> tuple[PromptSpec, list]:
    """Samples a prompt of `category` and the (shape, colour) of every object it implies.

    Returns (spec, object attributes as (shape, colour, group index)). Held-out samples force one
    group (the "target") onto a held-out pair.
    """
    heldout = split == "heldout"
    relation = None
    if category in ("single_object", "colors"):
        n_groups, counts = 1, [1]
    elif category in ("two_object", "color_attr"):
        n_groups, counts = 2, [1, 1]
    elif category == "counting":
        n_groups, counts = 1, [2 + int(rng.random() * 3)]
    elif category == "position":
        n_groups = 2
        # Mostly single objects (GenEval's form), sometimes pairs: "two red squares above ...".
        counts = [1 + int(rng.random() < 0.25), 1 + int(rng.random() < 0.25)]
        relation = _choice(rng, RELATIONS)
    else:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    shapes = _pick_shapes(rng, n_groups)
    target = int(rng.random() * n_groups) if heldout else -1
    colours: list[str] = []
    for g in range(n_groups):
        exclude = colours if category == "color_attr" else ()
        if g == target:
            options = [c for s, c in sorted(HELDOUT_PAIRS) if s == shapes[g] and c not in exclude]
            if not options:  # the held-out colour is taken: use a shape that has a free one
                pairs = [(s, c) for s, c in sorted(HELDOUT_PAIRS) if c not in exclude]
                others = shapes[:g] + shapes[g + 1 :]
                pairs = [(s, c) for s, c in pairs if s not in others]
                shapes[g], col = _choice(rng, pairs)
            else:
                col = _choice(rng, options)
            colours.append(col)
        else:
            colours.append(_pick_colour(rng, split, shapes[g], exclude))
    # Whether the caption names colours: always for the colour families, half of the time for
    # counting / position in train, always in held-out (the held-out pair must be named).
    if category in ("colors", "color_attr"):
        named = True
    elif category in ("counting", "position"):
        named = heldout or bool(rng.random() < 0.5)
    else:
        named = False
    groups = tuple(
        ObjectGroup(shapes[g], counts[g], colours[g] if named else None) for g in range(n_groups)
    )
    attrs = []
    for g in range(n_groups):
        for k in range(counts[g]):
            # Unnamed groups get one colour per object (the first object keeps the sampled one,
            # which is the held-out colour for the target group).
            colour = colours[g] if (named or k == 0) else _pick_colour(rng, split, shapes[g])
            attrs.append((shapes[g], colour, g))
    spec = PromptSpec(category, caption_for(category, groups, relation), groups, relation)
    return spec, attrs


def _object_size_range(n_objects: int) -> tuple[float, float]:
    """Smaller objects in busier scenes, so 4 objects with gaps always fit."""
    if n_objects == 1:
        return MIN_OBJECT_SIZE, MAX_OBJECT_SIZE
    if n_objects == 2:
        return MIN_OBJECT_SIZE, 0.45
    return MIN_OBJECT_SIZE, 0.36


def _regions(relation: str | None, split_at: float) -> tuple[tuple, tuple]:
    """Allowed (x0, x1, y0, y1) boxes for group 0 and group 1 under `relation`."""
    lo, hi = (0.0, split_at - OBJECT_GAP / 2), (split_at + OBJECT_GAP / 2, 1.0)
    full = (0.0, 1.0)
    if relation == "left of":
        return (*lo, *full), (*hi, *full)
    if relation == "right of":
        return (*hi, *full), (*lo, *full)
    if relation == "above":
        return (*full, *lo), (*full, *hi)
    if relation == "below":
        return (*full, *hi), (*full, *lo)
    return (*full, *full), (*full, *full)


def _layout(
    rng: np.random.Generator, attrs: Sequence[tuple[str, str, int]], relation: str | None
) -> tuple[ObjectSpec, ...]:
    """Non-overlapping sizes and positions; groups respect `relation` by construction.

    Objects are placed largest first by rejection sampling of their centre against the boxes
    already placed (grown by OBJECT_GAP); a crowded scene is retried with sizes shrunk towards
    the minimum readable size. Plain Python floats: numpy is slower on 1-4 boxes.
    """
    n = len(attrs)
    smin, smax = _object_size_range(n)
    sizes = [smin + (smax - smin) * float(rng.random()) for _ in range(n)]
    regions = _regions(relation, 0.4 + 0.2 * float(rng.random()))
    order = sorted(range(n), key=lambda i: -sizes[i])
    for _ in range(50):
        centres: list[tuple[float, float] | None] = [None] * n
        placed: list[tuple[float, float, float, float]] = []  # grown boxes (x0, y0, x1, y1)
        for i in order:
            x0, x1, y0, y1 = regions[attrs[i][2]]
            s = sizes[i]
            half = s / 2 + OBJECT_GAP / 2
            cx_lo, cx_hi = x0 + s / 2 + BORDER_MARGIN, x1 - s / 2 - BORDER_MARGIN
            cy_lo, cy_hi = y0 + s / 2 + BORDER_MARGIN, y1 - s / 2 - BORDER_MARGIN
            if cx_hi < cx_lo or cy_hi < cy_lo:
                break
            for _try in range(64):
                cx = cx_lo + (cx_hi - cx_lo) * float(rng.random())
                cy = cy_lo + (cy_hi - cy_lo) * float(rng.random())
                box = (cx - half, cy - half, cx + half, cy + half)
                if all(
                    box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1]
                    for p in placed
                ):
                    centres[i] = (cx, cy)
                    placed.append(box)
                    break
            else:
                break
        else:
            return tuple(
                ObjectSpec(a[0], a[1], sizes[i], centres[i][0], centres[i][1])
                for i, a in enumerate(attrs)
            )
        # Crowded: shrink and retry (never below the minimum readable size).
        sizes = [max(x * 0.92, smin) for x in sizes]
    raise RuntimeError(f"could not lay out {n} objects without overlap")  # not reached in practice


def relation_holds(a: ObjectSpec, b: ObjectSpec, relation: str) -> bool | None:
    """Whether `a <relation> b` by centres; None when the centres are within RELATION_MARGIN."""
    if relation in ("left of", "right of"):
        d = b.cx - a.cx if relation == "left of" else a.cx - b.cx
    elif relation in ("above", "below"):
        d = b.cy - a.cy if relation == "above" else a.cy - b.cy
    else:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    if abs(d) < RELATION_MARGIN:
        return None
    return d > 0


def questions_for(
    objects: Sequence[ObjectSpec], caption_answer: str, split: str, rng: np.random.Generator
) -> tuple[tuple[str, str, str], ...]:
    """Every question-answer pair whose answer is unambiguous from the object list."""
    qa: list[tuple[str, str, str]] = []
    by_shape = collections.Counter(o.shape for o in objects)
    by_colour = collections.Counter(o.colour for o in objects)
    present = {(o.shape, o.colour) for o in objects}
    for o in objects:
        if by_shape[o.shape] == 1:
            qa.append((Q_COLOUR.format(shape=o.shape), o.colour, "colour"))
    for shape in sorted(by_shape):
        qa.append(
            (Q_COUNT.format(plural=SHAPE_PLURALS[shape]), NUMBER_WORDS[by_shape[shape]], "count")
        )
    absent_shapes = [s for s in SHAPES if s not in by_shape]
    if absent_shapes:
        qa.append(
            (Q_COUNT.format(plural=SHAPE_PLURALS[_choice(rng, absent_shapes)]), "zero", "count")
        )
    for shape, colour in sorted(present):
        qa.append(
            (
                Q_EXIST.format(article=article(colour), colour=colour, shape=shape),
                ANSWER_YES,
                "exist",
            )
        )
    absent = [p for p in _ALLOWED_PAIRS[split] if p not in present]
    s, c = _choice(rng, absent)
    qa.append((Q_EXIST.format(article=article(c), colour=c, shape=s), ANSWER_NO, "exist"))
    for o in objects:
        if by_colour[o.colour] == 1:
            qa.append((Q_SHAPE.format(colour=o.colour), o.shape, "shape"))
    unique = [o for o in objects if by_shape[o.shape] == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for rel in RELATIONS:
                holds = relation_holds(a, b, rel)
                if holds is not None:
                    q = Q_POSITION.format(shape1=a.shape, relation=rel, shape2=b.shape)
                    qa.append((q, ANSWER_YES if holds else ANSWER_NO, "position"))
    qa.append((templates.CAPTION_QUESTION, caption_answer, "caption"))
    return tuple(qa)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; known: {', '.join(SPLITS)}")


def check_category_weights(weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(CATEGORIES),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"category weights must be {len(CATEGORIES)} non-negative numbers with a positive sum "
            f"(order: {', '.join(CATEGORIES)}), got {list(weights)}"
        )
    return w / w.sum()


class ShapesDataset:
    """Random-access shapes examples: `ShapesDataset(split, seed, image_size)[i]`.

    `__len__` is nominal (1e6 train, 1e4 held-out); any non-negative index is valid and
    deterministic. `scene(i)` gives everything but the pixels (cheap, for evaluation metadata).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        image_size: int = 64,
        *,
        antialias: int = 1,
        category_weights: Sequence[float] | None = None,
        length: int | None = None,
    ):
        _check_split(split)
        self.split = split
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.antialias = int(antialias)
        self._weights = check_category_weights(category_weights)
        self._cum = np.cumsum(self._weights)
        self._length = int(length) if length is not None else SPLIT_LENGTHS[split]
        # Fail here rather than in a worker thread.
        render_objects((), self.image_size, antialias=self.antialias)

    def __len__(self) -> int:
        return self._length

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"shapes index must be >= 0, got {index}")
        return np.random.default_rng((self.seed, _SPLIT_SALT[self.split], index))

    def scene(self, index: int) -> tuple[PromptSpec, tuple[ObjectSpec, ...], tuple]:
        """(prompt spec, objects, qa) of example `index`, without rendering."""
        rng = self._rng(index)
        category = CATEGORIES[
            int(np.searchsorted(self._cum, rng.random() * self._cum[-1], "right"))
        ]
        spec, attrs = _sample_spec(rng, self.split, category)
        objects = _layout(rng, attrs, spec.relation)
        qa = questions_for(objects, describe_objects(objects), self.split, rng)
        return spec, objects, qa

    def __getitem__(self, index: int) -> ShapesExample:
        index = int(index)
        spec, objects, qa = self.scene(index)
        image = render_objects(objects, self.image_size, antialias=self.antialias)
        return ShapesExample(image, spec.caption, qa, objects, spec.category, spec, index)


def geneval_prompts(
    num_per_category: int, *, split: str = "heldout", seed: int = 0
) -> list[PromptSpec]:
    """GenEval-style prompts, `num_per_category` per category in CATEGORIES order.

    With split="heldout" every prompt's target group uses a held-out (shape, colour) pair; the
    colour is named in colour-bearing families (colors, color_attr, counting, position).
    """
    _check_split(split)
    out = []
    for ci, category in enumerate(CATEGORIES):
        for i in range(num_per_category):
            rng = np.random.default_rng((seed, _SPLIT_SALT[split], 0xE7A1, ci, i))
            out.append(_sample_spec(rng, split, category)[0])
    return out


def scene_for_prompt(
    spec: PromptSpec, *, seed: int = 0, split: str = "train"
) -> tuple[ObjectSpec, ...]:
    """A ground-truth object list satisfying `spec` (unnamed colours drawn allowed in `split`)."""
    _check_split(split)
    rng = np.random.default_rng((seed, _SPLIT_SALT[split], 0x5CE7E))
    attrs = []
    for g, group in enumerate(spec.groups):
        for _ in range(group.count):
            colour = group.colour or _pick_colour(rng, split, group.shape)
            attrs.append((group.shape, colour, g))
    return _layout(rng, attrs, spec.relation)


def vocabulary_words() -> list[str]:
    """Every text string the shapes dataset and the prompt templates can produce (unsplit)."""
    texts = [
        templates.INSTRUCTION,
        templates.GENERATION_PREFIX,
        templates.NULL_PROMPT_INPUT,
        templates.CAPTION_QUESTION,
        Q_COLOUR,
        Q_COUNT,
        Q_EXIST,
        Q_SHAPE,
        Q_POSITION,
        "a an , and",
        ANSWER_YES,
        ANSWER_NO,
    ]
    texts += list(SHAPES) + list(SHAPE_PLURALS.values()) + list(COLOURS) + list(NUMBER_WORDS)
    texts += list(RELATIONS)
    return texts
