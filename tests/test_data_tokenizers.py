"""Tokenizers: word-level shapes vocabulary and Hugging Face tokenizer.json, one interface."""

import json
import pickle

import ml_collections
import pytest

from unified_mm.data import shapes, templates, tokenizers


@pytest.fixture(scope="module")
def word():
    return tokenizers.WordLevelTokenizer.from_file()


def _tiny_bpe_json(path):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [templates.generation_text("two red squares above a blue circle")] * 3
    corpus += ["What colour is the circle?", "How many squares are there?", "user assistant"]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


def test_shipped_asset_is_current():
    shipped = json.loads(tokenizers.ASSET_PATH.read_text())["tokens"]
    assert shipped == tokenizers.build_shapes_vocabulary()


def test_word_level_ids_and_round_trip(word):
    assert isinstance(word, tokenizers.Tokenizer)
    assert word.vocab_size == len(tokenizers.build_shapes_vocabulary()) < 100
    specials = {
        word.pad_id,
        word.endoftext_id,
        word.image_token_id,
        word.im_start_id,
        word.im_end_id,
    }
    assert len(specials) == 5 and word.eos_id == word.im_end_id
    text = templates.generation_text("two red squares above a blue circle")
    ids = word.encode(text)
    assert ids[0] == word.im_start_id and ids[-4:-1] == [
        word.encode("\n")[0],
        word.im_start_id,
        word.encode("assistant")[0],
    ]
    assert word.decode(ids) == text
    assert word.decode(ids, skip_special_tokens=True).startswith("user\nGenerate an image: two red")
    assert word.decode(word.encode("What colour is the circle?")) == "What colour is the circle?"
    assert word.encode("a tiger") == [word.encode("a")[0], word.unk_id]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        word.decode([word.vocab_size])


def test_word_level_covers_every_dataset_text(word):
    for split in shapes.SPLITS:
        ds = shapes.ShapesDataset(split, seed=0, image_size=32)
        for i in range(400):
            spec, _, qa = ds.scene(i)
            for text in [templates.generation_text(spec.caption)] + [
                t for q, a, _ in qa for t in (q, a)
            ]:
                ids = word.encode(text)
                assert word.unk_id not in ids, text
                assert word.decode(ids) == text
    assert word.unk_id not in word.encode(templates.generation_text(None))


def test_hf_tokenizer_json(tmp_path, word):
    path = _tiny_bpe_json(tmp_path / "tokenizer.json")
    tok = tokenizers.HFTokenizer(path)
    assert isinstance(tok, tokenizers.Tokenizer)
    base = json.loads(path.read_text())
    n_base = len(base["model"]["vocab"])
    # <image> is not in the file: added as a new special token at the end, like Harmon (151665).
    assert tok.image_token_id == n_base and tok.vocab_size == n_base + 1
    assert tok.im_start_id == base["model"]["vocab"]["<|im_start|>"]
    assert tok.pad_id == base["model"]["vocab"]["<|endoftext|>"] and tok.eos_id == tok.im_end_id
    text = templates.generation_text("two red squares above a blue circle")
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and tok.im_end_id in ids
    assert tok.decode(ids) == text  # byte-level BPE: exact round trip
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.image_token_id == tok.image_token_id
    # Factory from config, and its errors.
    cfg = ml_collections.ConfigDict(
        {
            "kind": "hf",
            "path": str(path),
            "image_token": "<image>",
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
        }
    )
    assert tokenizers.make_tokenizer(cfg).encode(text) == ids
    with pytest.raises(ValueError, match="does not exist"):
        tokenizers.HFTokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="has no token"):
        tokenizers.HFTokenizer(path, pad_token="<|nope|>")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizers.make_tokenizer(ml_collections.ConfigDict({"kind": "sentencepiece", "path": ""}))
    assert isinstance(
        tokenizers.make_tokenizer(ml_collections.ConfigDict({"kind": "shapes_word", "path": ""})),
        tokenizers.WordLevelTokenizer,
    )
