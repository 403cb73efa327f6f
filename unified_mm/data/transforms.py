"""Typed transforms: image crop / resize / value range, prompt templating and tokenisation.

Each task's transform is a frozen dataclass called as `transform(sample, rng) -> dict of numpy
arrays` with static shapes. Randomness comes only from the `rng` argument, which the pipeline
derives from (seed, task, global example position), so an example does not depend on threads,
workers or process count.

Image crops (`CROPS`), as in the papers:
* "center": MAR/ADM `center_crop_arr`: halve with BOX while the short side is >= 2x the target,
  bicubic-resize the short side to the target, then crop the centre.
* "random": Harmon's generation `crop2square`: a random square along the long side, then resize.
* "pad": Harmon's understanding `expand2square`: pad to a square with grey (127, 127, 127), then
  resize.
Resizing is PIL bicubic (Harmon uses PIL's default for `resize`); images already at the target
size (the shapes source renders at it) are passed through untouched.

Text truncation never cuts the template, the image span or the assistant suffix: generation
prompts drop trailing caption words; understanding samples drop trailing answer words first (down
to half the free budget when the question is long too), then trailing question words. A truncated
answer still ends with <|im_end|>.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from unified_mm.data import templates
from unified_mm.data.records import BadRecord
from unified_mm.data.sources import Sample
from unified_mm.data.tokenizers import Tokenizer

CROPS: tuple[str, ...] = ("center", "random", "pad")
PAD_GREY = (127, 127, 127)
IGNORE_LABEL = -100


# ----------------------------------------------------------------------------------- images


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def _center_crop_adm(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def prepare_image(
    image: np.ndarray, size: int, crop: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] with the given square crop (see module doc)."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    if crop == "center":
        return _center_crop_adm(image, size)
    if crop == "random":
        if rng is None:
            raise ValueError("random crop needs an rng")
        side = min(h, w)
        top = int(rng.random() * (h - side + 1))
        left = int(rng.random() * (w - side + 1))
        image = image[top : top + side, left : left + side]
    elif crop == "pad":
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[...] = PAD_GREY
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = image
        image = canvas
    else:
        raise ValueError(f"unknown crop {crop!r}; known: {', '.join(CROPS)}")
    if image.shape[0] == size:
        return image
    return _resize(np.ascontiguousarray(image), size, size)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (x / 255 * 2 - 1, as Harmon and MAR)."""
    return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    size: int
    crop: str

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return to_unit_range(prepare_image(image, self.size, self.crop, rng))


# ------------------------------------------------------------------------------------- text


def _fit_words(text: str, fits: Callable[[str], bool]) -> str:
    """Longest prefix (in whitespace words) of `text` for which `fits` holds ('' if none)."""
    if fits(text):
        return text
    words = text.split()
    lo, hi = 0, len(words)  # fits(words[:lo]) is assumed; words[:hi] does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(" ".join(words[:mid])):
            lo = mid
        else:
            hi = mid
    return " ".join(words[:lo])


def _pad(ids: list[int], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((max_len,), pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros((max_len,), np.int32)
    mask[: len(ids)] = 1
    return out, mask


def generation_prompt_ids(tokenizer: Tokenizer, caption: str | None, max_len: int) -> list[int]:
    """Token ids of the generation prompt (None: the null prompt), caption-truncated to max_len."""
    ids = tokenizer.encode(templates.generation_text(caption))
    if len(ids) <= max_len:
        return ids
    if caption is None:
        raise ValueError(
            f"max_text_len {max_len} is shorter than the null prompt ({len(ids)} tokens)"
        )
    kept = _fit_words(
        caption, lambda c: len(tokenizer.encode(templates.generation_text(c))) <= max_len
    )
    ids = tokenizer.encode(templates.generation_text(kept))
    if len(ids) > max_len:
        raise ValueError(f"max_text_len {max_len} is shorter than the empty generation prompt")
    return ids


def encode_generation_prompt(
    tokenizer: Tokenizer, caption: str | None, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 [max_len], right-padded with pad_id."""
    return _pad(generation_prompt_ids(tokenizer, caption, max_len), max_len, tokenizer.pad_id)


def understanding_fixed_len(tokenizer: Tokenizer, image_tokens: int) -> int:
    """Tokens of an understanding sample with empty question and answer (template + image)."""
    before, after = templates.understanding_text_parts("")
    suffix = tokenizer.encode(templates.SUFFIX + templates.SEP)
    return len(tokenizer.encode(before)) + image_tokens + len(tokenizer.encode(after)) + len(suffix)


def encode_understanding(
    tokenizer: Tokenizer,
    question: str,
    answer: str | None,
    *,
    image_tokens: int,
    max_len: int,
) -> dict[str, np.ndarray]:
    """Understanding sample: `<|im_start|>user\\n` + image span + `\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n` + answer + `<|im_end|>` + `\\n`.

    Returns int32 [max_len] arrays input_ids, attention_mask, labels (HF convention: labels[i] =
    input_ids[i] on the answer and its <|im_end|>, IGNORE_LABEL elsewhere; the loss compares
    logits[:, :-1] with labels[:, 1:]) and the scalar prompt_len (where the answer starts).
    With answer=None only the prompt is encoded (for generation at evaluation time).
    """
    suffix_ids = tokenizer.encode(templates.SUFFIX)
    sep_ids = tokenizer.encode(templates.SEP)

    def prompt_ids(q: str) -> list[int]:
        before, after = templates.understanding_text_parts(q)
        return (
            tokenizer.encode(before)
            + [tokenizer.image_token_id] * image_tokens
            + tokenizer.encode(after)
        )

    tail = len(suffix_ids) + len(sep_ids) if answer is not None else 0
    prompt = prompt_ids(question)
    ans = tokenizer.encode(answer) if answer is not None else []
    if len(prompt) + len(ans) + tail > max_len:
        free = max_len - understanding_fixed_len(tokenizer, image_tokens)
        if answer is not None:
            q_len = len(prompt) - len(prompt_ids(""))
            a_max = max(free - q_len, min(len(ans), free // 2), 1)
            answer = _fit_words(answer, lambda a: len(tokenizer.encode(a)) <= a_max)
            ans = tokenizer.encode(answer)[:a_max]
        budget = max_len - len(ans) - tail
        question = _fit_words(question, lambda q: len(prompt_ids(q)) <= budget)
        prompt = prompt_ids(question)
        if len(prompt) > budget:
            raise ValueError(
                f"max_und_len {max_len} cannot hold the template and {image_tokens} image tokens"
            )
    ids = prompt + ans
    labels = [IGNORE_LABEL] * len(prompt) + ans
    if answer is not None:
        ids += suffix_ids + sep_ids
        labels += suffix_ids + [IGNORE_LABEL] * len(sep_ids)
    input_ids, mask = _pad(ids, max_len, tokenizer.pad_id)
    lab = np.full((max_len,), IGNORE_LABEL, np.int32)
    lab[: len(labels)] = labels
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": lab,
        "prompt_len": np.int32(len(prompt)),
    }


def append_turns(
    tokenizer: Tokenizer,
    enc: dict[str, np.ndarray],
    turns: Sequence[tuple[str, str]],
) -> dict[str, np.ndarray]:
    """Adds follow-up question/answer turns (no image) after a one-turn understanding sample.

    Each turn is `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n`
    with labels on the answer and its `<|im_end|>`, the layout of a multi-turn chat. Turns that
    do not fit into the static length are dropped whole, so no answer is ever cut.
    """
    suffix_ids = tokenizer.encode(templates.SUFFIX)
    sep_ids = tokenizer.encode(templates.SEP)
    input_ids, mask, labels = enc["input_ids"].copy(), enc["attention_mask"].copy(), enc["labels"]
    labels = labels.copy()
    used = int(mask.sum())
    max_len = input_ids.shape[0]
    for question, answer in turns:
        prompt = tokenizer.encode(templates.INSTRUCTION.format(input=question))
        ans = tokenizer.encode(answer)
        ids = prompt + ans + suffix_ids + sep_ids
        if used + len(ids) > max_len:
            break
        lab = [IGNORE_LABEL] * len(prompt) + ans + suffix_ids + [IGNORE_LABEL] * len(sep_ids)
        input_ids[used : used + len(ids)] = ids
        mask[used : used + len(ids)] = 1
        labels[used : used + len(ids)] = lab
        used += len(ids)
    return {**enc, "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pick_question(
    sample: Sample,
    rng: np.random.Generator,
    caption_question: str,
    question_weights: Mapping[str, float] | None = None,
) -> tuple[str, str]:
    """One (question, answer) for understanding: a question type, then a question of it.

    The type is drawn among the record's types uniformly, or in proportion to `question_weights`
    (type -> weight > 0; unlisted types weigh 1). Records without question-answer pairs become
    captioning samples (caption_question -> caption).
    """
    if sample.qa:
        qtypes = sorted({qt for _, _, qt in sample.qa})
        if question_weights:
            cum = np.cumsum([float(question_weights.get(t, 1.0)) for t in qtypes])
            pick = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            qt = qtypes[min(pick, len(qtypes) - 1)]
        else:
            qt = qtypes[int(rng.random() * len(qtypes))]
        pool = [(q, a) for q, a, t in sample.qa if t == qt]
        return pool[int(rng.random() * len(pool))]
    if sample.caption:
        return caption_question, sample.caption
    raise BadRecord("missing_caption", "understanding needs a caption or question-answer pairs")


# ------------------------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True)
class GenerationTransform:
    """t2i: image + generation prompt; the caption is replaced by the null prompt with
    probability null_prompt_prob (the first draw of rng, so it depends on the example only)."""

    image: ImageTransform
    tokenizer: Tokenizer
    max_text_len: int
    null_prompt_prob: float

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        use_null = bool(rng.random() < self.null_prompt_prob)
        if sample.caption is None:
            raise BadRecord("missing_caption", "generation needs a caption")
        ids, mask = encode_generation_prompt(
            self.tokenizer, None if use_null else sample.caption, self.max_text_len
        )
        return {"image": self.image(sample.image, rng), "input_ids": ids, "attention_mask": mask}


@dataclasses.dataclass(frozen=True)
class UnderstandingTransform:
    """i2t: image + question/answer with labels on the answer and its <|im_end|> only."""

    image: ImageTransform
    tokenizer: Tokenizer
    max_und_len: int
    image_tokens: int
    caption_question: str = templates.CAPTION_QUESTION

    # >1 packs follow-up questions about the same image into the padding of the static length
    # (multi-turn chat); 1 is Harmon's one question per sample.
    qa_turns: int = 1
    # (question type, relative weight) pairs for `pick_question`; empty: types drawn uniformly.
    question_weights: tuple[tuple[str, float], ...] = ()

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        weights = dict(self.question_weights)
        question, answer = pick_question(sample, rng, self.caption_question, weights)
        enc = encode_understanding(
            self.tokenizer,
            question,
            answer,
            image_tokens=self.image_tokens,
            max_len=self.max_und_len,
        )
        del enc["prompt_len"]
        if self.qa_turns > 1 and sample.qa:
            asked = {question}
            follow_ups = []
            for _ in range(4 * self.qa_turns):
                if len(follow_ups) == self.qa_turns - 1:
                    break
                q, a = pick_question(sample, rng, self.caption_question, weights)
                if q not in asked:
                    asked.add(q)
                    follow_ups.append((q, a))
            enc = append_turns(self.tokenizer, enc, follow_ups)
        return {"image": self.image(sample.image, rng), **enc}


@dataclasses.dataclass(frozen=True)
class ImageOnlyTransform:
    """image: pixels only (tokenizer / autoencoder stages)."""

    image: ImageTransform

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": self.image(sample.image, rng)}
