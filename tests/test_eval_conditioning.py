"""The text-to-image conditioning probe (eval/conditioning.py) on a small random Harmon."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_inference_cli import random_model, smoke_config

from unified_mm.data.shapes import ShapesDataset
from unified_mm.eval.conditioning import t2i_conditioning_probe
from unified_mm.families.harmon import HarmonFamily


@pytest.fixture(scope="module")
def model_and_data():
    config = smoke_config()
    family = HarmonFamily(config)
    # Random weights everywhere (a fresh head outputs 0 whatever z is), the diffusion head's
    # scaled up so that its output depends visibly on z.
    model = random_model(lambda: family.build_model(nnx.Rngs(0)), seed=3)
    head = nnx.state(model.mar.diffloss, nnx.Param)
    nnx.update(model.mar.diffloss, jax.tree.map(lambda p: p * 5.0, head))
    data = ShapesDataset("heldout", seed=0, image_size=32)
    examples = [data[i] for i in range(6)]
    images = np.stack([e.image for e in examples])
    return family, model, images, [e.caption for e in examples], config.data.max_text_len


def test_probe_swaps_captions_and_masks_everything(model_and_data):
    family, model, images, captions, max_len = model_and_data
    kw = dict(max_text_len=max_len, key=jax.random.key(0), repeats=2)
    r = t2i_conditioning_probe(model, family.tokenizer, images, captions, **kw)
    assert len(set(captions)) > 1
    # a random LLM still carries the prompt into x_enc: other captions change the loss
    assert r["shuffled_text"] != r["loss"] and abs(r["text_gap"]) > 0
    assert r["shuffled_context"] != r["loss"] and abs(r["context_gap"]) > 0
    assert r["text_gap"] == pytest.approx(r["shuffled_text"] / r["loss"] - 1, rel=1e-2)
    assert r["context_gap"] == pytest.approx(r["shuffled_context"] / r["loss"] - 1, rel=1e-2)
    assert r["pairs"] == 6 and r["mask_ratio"] == 0.7
    # the same caption everywhere: swapping rows changes nothing (paired draws, exact zero)
    same = t2i_conditioning_probe(model, family.tokenizer, images, [captions[0]] * 6, **kw)
    assert same["text_gap"] == 0.0
    # the same image everywhere: swapping visible tokens changes nothing either
    one = np.repeat(images[:1], 6, axis=0)
    same_img = t2i_conditioning_probe(model, family.tokenizer, one, captions, **kw)
    assert same_img["context_gap"] == 0.0


def test_fresh_model_ignores_every_condition(model_and_data):
    """MAR zero-initialises the head's adaLN and output layers: at step 0 the prediction is 0
    whatever z is, so both gaps are exactly zero until training moves them."""
    family, _, images, captions, max_len = model_and_data
    fresh = family.build_model(nnx.Rngs(0))
    r = t2i_conditioning_probe(
        fresh, family.tokenizer, images, captions, max_text_len=max_len, key=jax.random.key(0)
    )
    assert r["text_gap"] == 0.0 and r["context_gap"] == 0.0


def test_probe_rejects_mismatched_inputs(model_and_data):
    family, model, images, captions, max_len = model_and_data
    with pytest.raises(ValueError, match="needs >= 2 image-caption pairs"):
        t2i_conditioning_probe(
            model,
            family.tokenizer,
            images,
            captions[:3],
            max_text_len=max_len,
            key=jax.random.key(0),
        )
