"""Transforms: understanding label layout, truncation, null-prompt rate, square crops."""

import numpy as np
import pytest

from unified_mm.data import templates, transforms
from unified_mm.data.config import default_data_config
from unified_mm.data.pipeline import make_train_iterator
from unified_mm.data.tokenizers import WordLevelTokenizer

IGNORE = transforms.IGNORE_LABEL


@pytest.fixture(scope="module")
def tok():
    return WordLevelTokenizer.from_file()


def test_understanding_label_layout(tok):
    enc = transforms.encode_understanding(
        tok, "What colour is the circle?", "blue", image_tokens=6, max_len=40
    )
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert ids.shape == mask.shape == labels.shape == (40,) and ids.dtype == np.int32
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (ids[n:] == tok.pad_id).all() and (labels[n:] == IGNORE).all()
    # <|im_start|>user\n then exactly image_tokens image ids, then \nquestion...
    prefix = tok.encode("<|im_start|>user\n")
    assert list(ids[: len(prefix)]) == prefix
    img = np.flatnonzero(ids == tok.image_token_id)
    assert list(img) == list(range(len(prefix), len(prefix) + 6))
    # Labels: only the answer and its <|im_end|>, equal to the input ids there (HF convention).
    on = np.flatnonzero(labels != IGNORE)
    assert list(ids[on]) == tok.encode("blue") + [tok.im_end_id]
    assert (labels[on] == ids[on]).all()
    assert on[0] == enc["prompt_len"] and list(ids[on[-1] + 1 : n]) == tok.encode("\n")
    text = tok.decode([i for i in ids[:n] if i != tok.image_token_id])
    assert (
        text
        == templates.INSTRUCTION.format(input="\nWhat colour is the circle?") + "blue<|im_end|>\n"
    )
    # Prompt-only encoding (evaluation) ends with "assistant\n" and has no labels.
    p = transforms.encode_understanding(
        tok, "What colour is the circle?", None, image_tokens=6, max_len=40
    )
    assert int(p["attention_mask"].sum()) == p["prompt_len"] == enc["prompt_len"]
    assert (p["labels"] == IGNORE).all()


def test_truncation_keeps_template_and_image_span(tok):
    long_q = "What colour is the circle? " * 10
    long_a = "a red circle and a blue square " * 10
    fixed = transforms.understanding_fixed_len(tok, 8)
    max_len = fixed + 12
    enc = transforms.encode_understanding(
        tok, long_q.strip(), long_a.strip(), image_tokens=8, max_len=max_len
    )
    ids, labels = enc["input_ids"], enc["labels"]
    assert int(enc["attention_mask"].sum()) <= max_len
    assert (ids == tok.image_token_id).sum() == 8
    n = int(enc["attention_mask"].sum())
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    start = int(enc["prompt_len"])
    assert list(ids[start - len(tail) : start]) == tail  # assistant suffix intact
    on = np.flatnonzero(labels != IGNORE)
    assert len(on) >= 2 and ids[on[-1]] == tok.im_end_id and on[-1] == n - 2
    # Both parts were cut (answer first, then question), each keeping a prefix of its words.
    q_ids = ids[len(tok.encode("<|im_start|>user\n")) + 8 : start - len(tail)]
    assert 0 < len(q_ids) < len(tok.encode("\n" + long_q.strip()))
    # Generation prompts drop caption words, never the suffix.
    g = transforms.generation_prompt_ids(tok, "two red squares above a blue circle " * 6, 24)
    assert len(g) <= 24 and g[-3:] == tok.encode("<|im_start|>assistant\n")
    assert tok.decode(g).startswith("<|im_start|>user\nGenerate an image: two red squares")
    with pytest.raises(ValueError, match="cannot hold"):
        transforms.encode_understanding(tok, "q", "a", image_tokens=50, max_len=40)


def test_null_prompt_rate_and_determinism(tok):
    cfg = default_data_config()
    cfg.null_prompt_prob = 0.1
    cfg.threads = 0
    null_ids = transforms.encode_generation_prompt(tok, None, cfg.max_text_len)[0]
    it = make_train_iterator(cfg, task_batch={"t2i": 100}, image_size=32, seed=7, tokenizer=tok)
    is_null = np.concatenate(
        [(next(it)["t2i"]["input_ids"] == null_ids).all(axis=1) for _ in range(20)]
    )
    rate = is_null.mean()
    assert 0.075 < rate < 0.125, rate  # 2000 draws: +-2.5 sigma
    # Same seed, same decisions; a per-example draw, not a per-batch one.
    it2 = make_train_iterator(cfg, task_batch={"t2i": 100}, image_size=32, seed=7, tokenizer=tok)
    again = (next(it2)["t2i"]["input_ids"] == null_ids).all(axis=1)
    np.testing.assert_array_equal(again, is_null[:100])
    assert 0 < again.sum() < 100


@pytest.mark.parametrize("crop", transforms.CROPS)
def test_square_crops(crop):
    rng = np.random.default_rng(0)
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, :50] = 200  # left half bright
    out = transforms.prepare_image(image, 32, crop, rng)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if crop == "pad":
        assert tuple(out[0, 16]) == transforms.PAD_GREY  # grey bands above and below
    if crop == "center":
        assert out[:, :8].mean() > 150 and out[:, -8:].mean() < 50  # centre straddles the edge
    x = transforms.to_unit_range(out)
    assert x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    assert transforms.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]
    same = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    assert transforms.prepare_image(same, 32, crop, rng) is same  # already square at size


def test_random_crop_offsets_vary():
    image = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (50, 1, 3))
    starts = {
        int(transforms.prepare_image(image, 50, "random", np.random.default_rng(s))[0, 0, 0])
        for s in range(20)
    }
    assert len(starts) > 5


def test_multi_turn_packing_fills_padding_with_whole_turns(tok):
    from unified_mm.data.shapes import ShapesDataset
    from unified_mm.data.sources import Sample

    ex = ShapesDataset("train", seed=0, image_size=32)[5]
    sample = Sample(ex.image, ex.caption, ex.qa)
    image = transforms.ImageTransform(32, "pad")
    one = transforms.UnderstandingTransform(image, tok, 96, 20)
    many = transforms.UnderstandingTransform(image, tok, 96, 20, qa_turns=6)
    a = one(sample, np.random.default_rng(3))
    b = many(sample, np.random.default_rng(3))
    n_a, n_b = int(a["attention_mask"].sum()), int(b["attention_mask"].sum())
    # The first turn is the one-turn sample unchanged; follow-ups only use its padding.
    assert (b["input_ids"][:n_a] == a["input_ids"][:n_a]).all() and n_b > n_a
    assert (b["labels"][:n_a] == a["labels"][:n_a]).all()
    assert (b["input_ids"][n_b:] == tok.pad_id).all() and (b["labels"][n_b:] == IGNORE).all()
    assert int((b["input_ids"] == tok.image_token_id).sum()) == 20  # one image span only
    # Every labelled run is one answer of this image's QA followed by <|im_end|>.
    answers = {ans for _, ans, _ in ex.qa}
    runs, run = [], []
    for i, lab in zip(b["input_ids"], b["labels"]):
        if lab != IGNORE:
            run.append(int(i))
        elif run:
            runs.append(run)
            run = []
    assert len(runs) >= 3
    for r in runs:
        assert r[-1] == tok.im_end_id and tok.decode(r[:-1]).strip() in answers
    # Whole turns only: the sequence ends with <|im_end|>\n, never with a cut answer.
    assert list(b["input_ids"][n_b - 2 : n_b]) == [tok.im_end_id] + tok.encode("\n")


def test_question_weights_shift_the_type_draw(tok):
    from unified_mm.data.shapes import ShapesDataset
    from unified_mm.data.sources import Sample

    ex = ShapesDataset("train", seed=0, image_size=32)[5]
    sample = Sample(ex.image, ex.caption, ex.qa)
    types = sorted({t for _, _, t in ex.qa})
    assert "count" in types and len(types) >= 4
    qtype_of = {q: t for q, _, t in ex.qa}

    def count_share(weights, n=3000):
        rng = np.random.default_rng(0)
        picks = [transforms.pick_question(sample, rng, "?", weights)[0] for _ in range(n)]
        return np.mean([qtype_of[q] == "count" for q in picks])

    k = len(types)
    assert abs(count_share(None) - 1 / k) < 0.03
    assert abs(count_share({"count": 5.0}) - 5 / (k + 4)) < 0.03
    # Unlisted types weigh 1: weighting another type lowers the count share.
    assert abs(count_share({"colour": 3.0}) - 1 / (k + 2)) < 0.03
    # Packed turns follow the weights too.
    image = transforms.ImageTransform(32, "pad")
    plain = transforms.UnderstandingTransform(image, tok, 112, 20, qa_turns=6)
    heavy = transforms.UnderstandingTransform(
        image, tok, 112, 20, qa_turns=6, question_weights=(("count", 20.0),)
    )
    how_many = tok.encode("How many")

    def count_turns(t):
        rng = np.random.default_rng(1)
        total = 0
        for _ in range(40):
            ids = list(t(sample, rng)["input_ids"])
            total += sum(ids[i : i + 2] == how_many for i in range(len(ids) - 1))
        return total

    assert count_turns(heavy) > count_turns(plain)
