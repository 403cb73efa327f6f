"""The linear shape probe of Harmon's visual encoder (eval/encoder_probe.py, tools/encoder_probe)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_inference_cli import random_model, smoke_config

from unified_mm.data.shapes import ShapesDataset
from unified_mm.data.shapes_render import COLOURS, SHAPES
from unified_mm.eval import encoder_probe as ep
from unified_mm.families.harmon import HarmonFamily


def _synthetic_labels(n: int, seed: int) -> np.ndarray:
    # Per-shape counts as the dataset makes them: 1-4 objects in all.
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, len(SHAPES)), np.int32)
    for row in labels:
        for s in rng.integers(0, len(SHAPES), rng.integers(1, 5)):
            row[s] += 1
    return labels


def _one_hot_counts(labels: np.ndarray) -> np.ndarray:
    return np.eye(ep.MAX_COUNT + 1, dtype=np.float32)[labels].reshape(len(labels), -1)


def test_labels_count_objects_per_shape():
    data = ShapesDataset("train", seed=0, image_size=32)
    for i in range(20):
        e = data[i]
        labels = ep.count_labels(e.objects)
        assert labels.sum() == len(e.objects)
        for s, n in zip(SHAPES, labels):
            assert n == sum(o.shape == s for o in e.objects)
        both = ep.count_labels(e.objects, ("shape", "colour"))
        assert both.shape == (len(SHAPES) + len(COLOURS),) and both.sum() == 2 * len(e.objects)
        np.testing.assert_array_equal(both[: len(SHAPES)], labels)
        for c, n in zip(COLOURS, both[len(SHAPES) :]):
            assert n == sum(o.colour == c for o in e.objects)
    images, labels = ep.shapes_split("heldout", 3, 32, seed=0)
    assert images.shape == (3, 32, 32, 3) and labels.shape == (3, len(SHAPES))
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_scores_on_hand_made_counts():
    labels = np.array([[1, 0, 2], [0, 0, 1]])
    predicted = np.array([[1, 0, 1], [0, 1, 1]])
    s = ep.score_counts(predicted, labels)
    assert s["count_accuracy"] == pytest.approx(4 / 6)
    assert s["presence_accuracy"] == pytest.approx(5 / 6)  # 1 vs 2 objects: both present
    assert s["all_exact"] == 0.0
    assert ep.score_counts(labels, labels)["all_exact"] == 1.0


def test_probe_reads_counts_that_the_features_hold_and_not_from_noise():
    train_y, test_y = _synthetic_labels(800, 0), _synthetic_labels(300, 1)
    rng = np.random.default_rng(2)
    settings = ep.ProbeSettings(steps=300)

    def held_out_accuracy(train_x, test_x):
        w, b, mean, std = ep.fit_linear_probe(train_x, train_y, settings)
        logits = np.einsum("nd,dsk->nsk", (test_x - mean) / std, w) + b
        return ep.score_counts(logits.argmax(-1), test_y)["count_accuracy"]

    # Features that hold the counts (plus noise dimensions) are read almost perfectly ...
    noise = lambda n: rng.standard_normal((n, 16)).astype(np.float32)  # noqa: E731
    informative = held_out_accuracy(
        np.concatenate([_one_hot_counts(train_y), noise(800)], 1),
        np.concatenate([_one_hot_counts(test_y), noise(300)], 1),
    )
    assert informative > 0.99
    # ... and pure noise does no better than predicting each shape's commonest count.
    majority = (test_y == 0).mean()
    assert held_out_accuracy(noise(800), noise(300)) < majority + 0.05


def test_shape_probe_on_a_random_model_reports_probe_and_baseline():
    config = smoke_config()
    family = HarmonFamily(config)
    model = random_model(lambda: family.build_model(nnx.Rngs(0)), seed=1)
    settings = ep.ProbeSettings(num_train=64, num_test=32, steps=20, batch_size=32)
    features = ep.encoder_features(model, ep.shapes_split("train", 40, 32, 0)[0], batch_size=32)
    assert features.shape == (40, config.model.mar.encoder_embed_dim)  # a padded last chunk
    assert np.isfinite(features).all() and features.std(0).max() > 0
    r = ep.shape_probe(model, 32, settings)
    for name in ("probe", "probe_train_split", "majority"):
        assert set(r[name]) == {"count_accuracy", "presence_accuracy", "all_exact"}
        assert all(0.0 <= v <= 1.0 for v in r[name].values())
    assert set(r["per_label_count_accuracy"]) == set(SHAPES)
    assert r["feature_dim"] == config.model.mar.encoder_embed_dim and r["image_size"] == 32


def test_supervised_control_trains_a_copy_of_the_encoder():
    config = smoke_config()
    family = HarmonFamily(config)
    model = family.build_model(nnx.Rngs(0))
    encoder = family.param_groups()["mar_encoder"]
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    settings = ep.SupervisedSettings(
        steps=60, batch_size=16, lr=3e-3, warmup_steps=5, num_train=200, num_test=40
    )
    r = ep.supervised_shape_probe(model, 32, settings, trainable=encoder)
    assert r["last_loss"] < r["first_loss"] - 0.2  # measured: 1.81 -> 0.69
    assert all(0.0 <= v <= 1.0 for v in r["probe"].values())
    assert set(r["probe_train_split"]) == set(r["probe"])
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))
    # update_model writes the trained encoder back; nothing else moves (no weight decay either)
    ep.supervised_shape_probe(model, 32, settings, trainable=encoder, update_model=True)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, nnx.state(model, nnx.Param)
    )
    assert any(jax.tree.leaves(changed["mar"]["encoder_blocks"]))
    assert not any(jax.tree.leaves(changed["llm"]))
    assert not any(jax.tree.leaves(changed["mar"]["decoder_blocks"]))


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="num_train must be >= 1"):
        ep.ProbeSettings(num_train=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        ep.ProbeSettings(lr=0.0)
    with pytest.raises(ValueError, match="supervised probe steps must be >= 1"):
        ep.SupervisedSettings(steps=0)
    with pytest.raises(ValueError, match=r"attributes must be distinct names from shape, colour"):
        ep.ProbeSettings(attributes=("size",))
    with pytest.raises(ValueError, match=r"attributes must be distinct"):
        ep.SupervisedSettings(attributes=("shape", "shape"))
