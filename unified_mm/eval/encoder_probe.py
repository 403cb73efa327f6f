"""Linear shape probe of Harmon's shared visual encoder: what the understanding path can read.

Features are the MAR encoder's output on an unmasked image (the understanding path's `x_enc`,
before `proj_in`), averaged over the image tokens. Labels are how many objects of each shape the
scene holds (0-4 per shape; `attributes=("shape", "colour")` adds one count per colour). One
softmax head per label is fit on frozen features of train-split images (full batch, AdamW on
standardised features) and scored on held-out images, every one of
which holds a (shape, colour) pair never seen in training (`probe`), and on fresh train-split
images (`probe_train_split`): a probe that reads shape through colour, which training correlates
with shape by leaving the held-out pairs out, does well on the second and fails the first.

The probe separates "the encoder does not see shape" from "the LLM does not read it": shape,
count and existence questions all need the per-shape counts, so a VQA failure with a probe that
reads them points at the LLM, and one without points at the encoder. Run it on the trained
checkpoint and on the same model at initialisation (random features) for the baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unified_mm.data.shapes import ShapesDataset
from unified_mm.data.shapes_render import COLOURS, SHAPES, ObjectSpec

MAX_COUNT = 4  # the dataset draws 1 to 4 objects
# The object attributes a label set can count, each with its values in label order.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS}


def _check_settings(settings, label: str) -> None:
    unknown = [a for a in settings.attributes if a not in ATTRIBUTE_VALUES]
    if (
        unknown
        or not settings.attributes
        or len(set(settings.attributes)) < len(settings.attributes)
    ):
        raise ValueError(
            f"{label} attributes must be distinct names from {', '.join(ATTRIBUTE_VALUES)}, "
            f"got {list(settings.attributes)}"
        )
    for name in ("num_train", "num_test", "steps", "batch_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{label} {name} must be >= 1, got {getattr(settings, name)}")
    if settings.lr <= 0:
        raise ValueError(f"{label} lr must be > 0, got {settings.lr}")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Images per split, the fit's steps / learning rate / weight decay, and the data seed."""

    num_train: int = 4000
    num_test: int = 1000
    steps: int = 500
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    batch_size: int = 256
    attributes: tuple[str, ...] = ("shape",)

    def __post_init__(self):
        _check_settings(self, "probe")


def label_names(attributes: Sequence[str] = ("shape",)) -> tuple[str, ...]:
    """The value each label column counts: every shape, then every colour (if asked)."""
    return tuple(v for a in attributes for v in ATTRIBUTE_VALUES[a])


def count_labels(
    objects: Sequence[ObjectSpec], attributes: Sequence[str] = ("shape",)
) -> np.ndarray:
    """[len(label_names(attributes))] int32: how many objects hold each attribute value."""
    counts = np.zeros(len(label_names(attributes)), np.int32)
    offset = 0
    for a in attributes:
        values = ATTRIBUTE_VALUES[a]
        for o in objects:
            counts[offset + values.index(getattr(o, a))] += 1
        offset += len(values)
    return counts


def shapes_split(
    split: str, n: int, image_size: int, seed: int, attributes: Sequence[str] = ("shape",)
) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, S, S, 3] in [-1, 1], labels [n, labels]) of the first n examples."""
    data = ShapesDataset(split, seed=seed, image_size=image_size)
    examples = [data[i] for i in range(n)]
    images = np.stack([e.image for e in examples]).astype(np.float32) / 127.5 - 1.0
    return images, np.stack([count_labels(e.objects, attributes) for e in examples])


def probe_splits(
    image_size: int,
    num_train: int,
    num_test: int,
    seed: int,
    attributes: Sequence[str] = ("shape",),
) -> dict:
    """Fit images (train split), fresh train-split images and held-out images, with labels."""
    x, y = shapes_split("train", num_train + num_test, image_size, seed, attributes)
    return {
        "fit": (x[:num_train], y[:num_train]),
        "train_split": (x[num_train:], y[num_train:]),
        "heldout": shapes_split("heldout", num_test, image_size, seed, attributes),
    }


def pooled_features(model: nnx.Module, images: jax.Array) -> jax.Array:
    """[B, De]: the MAR encoder's output on unmasked images, mean over the image tokens."""
    feat = model.extract_visual_feature(model.encode(images), None, deterministic=True)
    return feat.x_enc[:, model.cfg.mar.buffer_size :].mean(axis=1)


def encoder_features(model: nnx.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """`pooled_features` of every image, in jitted chunks of `batch_size`, as numpy."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, x):
        return pooled_features(nnx.merge(graphdef, state), x)

    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pad = batch_size - len(chunk)  # one compiled shape for every chunk
        x = (
            np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            if pad
            else chunk
        )
        out.append(np.asarray(pooled(state, jnp.asarray(x)))[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, settings: ProbeSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Softmax heads [De, labels, MAX_COUNT + 1]: returns (weight, bias, mean, std)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / std)
    y = jnp.asarray(labels)
    n_shapes = labels.shape[1]
    params = {
        "w": jnp.zeros((x.shape[1], n_shapes, MAX_COUNT + 1), jnp.float32),
        "b": jnp.zeros((n_shapes, MAX_COUNT + 1), jnp.float32),
    }
    opt = optax.adamw(settings.lr, weight_decay=settings.weight_decay)

    def loss(p):
        logits = jnp.einsum("nd,dsk->nsk", x, p["w"]) + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=settings.steps)
        return p

    params = fit(params)
    return np.asarray(params["w"]), np.asarray(params["b"]), mean, std


def score_counts(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of counts [N, labels]: count, presence (count > 0) and all-exact."""
    return {
        "count_accuracy": float((predicted == labels).mean()),
        "presence_accuracy": float(((predicted > 0) == (labels > 0)).mean()),
        "all_exact": float((predicted == labels).all(axis=1).mean()),
    }


def majority_scores(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
    """The baseline that predicts each label's most frequent train count."""
    majority = np.array(
        [np.bincount(column, minlength=MAX_COUNT + 1).argmax() for column in train_labels.T]
    )
    return score_counts(np.broadcast_to(majority, test_labels.shape), test_labels)


def shape_probe(model: nnx.Module, image_size: int, settings: ProbeSettings) -> dict:
    """Fit on train-split features, score on held-out ones; also the majority baseline."""
    splits = probe_splits(
        image_size, settings.num_train, settings.num_test, settings.seed, settings.attributes
    )
    train_x, train_y = splits["fit"]
    test_x, test_y = splits["heldout"]
    f_train = encoder_features(model, train_x, settings.batch_size)
    w, b, mean, std = fit_linear_probe(f_train, train_y, settings)

    def predict(x):
        features = encoder_features(model, x, settings.batch_size)
        return (np.einsum("nd,dsk->nsk", (features - mean) / std, w) + b).argmax(-1)

    predicted = predict(test_x)
    return {
        "probe": score_counts(predicted, test_y),
        "majority": majority_scores(train_y, test_y),
        "probe_train_split": score_counts(
            predict(splits["train_split"][0]), splits["train_split"][1]
        ),
        "per_label_count_accuracy": {
            s: float((predicted[:, i] == test_y[:, i]).mean())
            for i, s in enumerate(label_names(settings.attributes))
        },
        "image_size": int(image_size),
        "feature_dim": int(f_train.shape[1]),
        "settings": dataclasses.asdict(settings),
    }


@dataclasses.dataclass(frozen=True)
class SupervisedSettings:
    """The supervised control: steps, batch, peak lr (warm-up, at most half the steps, then
    cosine to 10 %), images."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.02
    num_train: int = 20000
    num_test: int = 1000
    seed: int = 0
    attributes: tuple[str, ...] = ("shape",)

    def __post_init__(self):
        _check_settings(self, "supervised probe")


def supervised_shape_probe(
    model: nnx.Module,
    image_size: int,
    settings: SupervisedSettings,
    *,
    trainable: Callable[[tuple, Any], bool],
    update_model: bool = False,
) -> dict:
    """Trains the encoder with a linear count head on the labels directly (a copy of `model`;
    `update_model` writes the trained weights back into `model`).

    The control for `shape_probe`: how fast this encoder learns shape when told it outright,
    against what the question-answer loss taught it. `trainable` (an NNX path filter, e.g. the
    Harmon family's "mar_encoder" group) picks the parameters that train; nothing else changes,
    weight decay included.
    """
    splits = probe_splits(
        image_size, settings.num_train, settings.num_test, settings.seed, settings.attributes
    )
    train_x, train_y = splits["fit"]
    test_x, test_y = splits["heldout"]
    width = model.cfg.mar.encoder_embed_dim
    n_labels = train_y.shape[1]
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, trainable), ...)
    rng = np.random.default_rng(settings.seed)
    head = {
        "w": jnp.asarray(rng.normal(0, width**-0.5, (width, n_labels, MAX_COUNT + 1)), jnp.float32),
        "b": jnp.zeros((n_labels, MAX_COUNT + 1), jnp.float32),
    }
    warmup = min(settings.warmup_steps, settings.steps // 2)  # short runs still decay
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, warmup, settings.steps, settings.lr * 0.1
    )
    opt = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=settings.weight_decay)

    def logits_of(trained, x):
        params, head = trained
        h = pooled_features(nnx.merge(graphdef, params, rest), x)
        return jnp.einsum("nd,dsk->nsk", h, head["w"]) + head["b"]

    def loss(trained, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits_of(trained, x), y).mean()

    @jax.jit
    def step(trained, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(trained, x, y)
        updates, opt_state = opt.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, value

    predict = jax.jit(lambda trained, x: logits_of(trained, x).argmax(-1))
    trained = (params, head)
    opt_state = opt.init(trained)
    losses = []
    for _ in range(settings.steps):
        idx = rng.integers(0, len(train_x), settings.batch_size)
        trained, opt_state, value = step(trained, opt_state, train_x[idx], train_y[idx])
        losses.append(float(value))

    def predicted(x):
        return np.concatenate(
            [np.asarray(predict(trained, x[i : i + 250])) for i in range(0, len(x), 250)]
        )

    if update_model:
        nnx.update(model, trained[0])
    tail = max(1, settings.steps // 10)
    return {
        "probe": score_counts(predicted(test_x), test_y),
        "majority": majority_scores(train_y, test_y),
        "probe_train_split": score_counts(
            predicted(splits["train_split"][0]), splits["train_split"][1]
        ),
        "first_loss": float(np.mean(losses[:tail])),
        "last_loss": float(np.mean(losses[-tail:])),
        "image_size": int(image_size),
        "settings": dataclasses.asdict(settings),
    }
