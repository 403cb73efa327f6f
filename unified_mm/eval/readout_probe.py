"""LLM readout probe: how much of shapes-VQA the from-scratch LLM learns from oracle image tokens.

Harmon's understanding path has two learners in series: the MAR encoder has to mark the objects,
and the LLM has to read colour, shape, counts and relations from those marks. This probe takes
the first one away. Every image row the LLM sees is an oracle token: a learned embedding of the
shape plus one of the colour of the object whose centre lies in that grid cell (a "none"
embedding for an empty cell), plus a learned embedding of the cell. The buffer rows are learned
constants. The LLM is the config's architecture, freshly initialised as in the main job. It
trains with the oracle embeddings on the main job's understanding samples (the same question
draw, `data.qa_turns` packing, `data.max_und_len`) under a stage's learning-rate schedule and
the config's AdamW settings.

Every `eval_every` steps the probe scores shapes-VQA's held-out questions (`eval.vqa`: the same
questions, every image holding a (shape, colour) pair never seen in training) by the first
answer token, teacher-forced. Every shapes-VQA answer is one word-level token.

What it bounds: with perfect object marks, any shortfall after N steps is the LLM's readout in
N steps, and no encoder can lift the main job above it at that step count. The curve then
measures whether an LLM-side change (depth, heads, learning rate, question mix) moves it.
`tools/readout_probe.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unified_mm.data.config import question_weights_of
from unified_mm.data.shapes import QTYPES, ShapesDataset
from unified_mm.data.shapes_render import COLOURS, SHAPES, ObjectSpec
from unified_mm.data.sources import Sample
from unified_mm.data.transforms import UnderstandingTransform, encode_understanding
from unified_mm.eval.vqa import VQA_TYPES, shapes_questions
from unified_mm.models.harmon.harmon import splice_image_rows
from unified_mm.models.llm.qwen2 import Qwen2
from unified_mm.train.optimizer import make_optimizer, mar_weight_decay_rule
from unified_mm.train.stages import StageSpec

if TYPE_CHECKING:
    import ml_collections

    from unified_mm.families.harmon import HarmonFamily


@dataclasses.dataclass(frozen=True)
class ReadoutSettings:
    """The probe's data, length and scoring; the optimiser comes from the stage and config.

    `train_qtypes` restricts the training questions (default: every type, as the main job);
    `token_init_std` is the initial scale of the oracle embeddings (the LLM's RMSNorm makes the
    absolute scale matter little; 0.02, the text embeddings' scale, learns more slowly).
    """

    steps: int = 1000
    batch_size: int = 32
    num_train: int = 20000
    num_questions: int = 300
    eval_every: int = 250
    seed: int = 0
    train_qtypes: tuple[str, ...] = QTYPES
    token_init_std: float = 0.5

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_train", "num_questions", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"readout probe {name} must be >= 1, got {getattr(self, name)}")
        unknown = [t for t in self.train_qtypes if t not in QTYPES]
        if unknown or not self.train_qtypes:
            raise ValueError(
                f"readout probe train_qtypes must be a non-empty subset of {list(QTYPES)}, "
                f"got {list(self.train_qtypes)}"
            )
        if self.token_init_std <= 0:
            raise ValueError(f"readout probe token_init_std must be > 0, got {self.token_init_std}")


def cell_labels(objects: Sequence[ObjectSpec], grid: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per grid cell (row-major, the image rows' order): 1 + the shape index and 1 + the colour
    index of the object centred in it (0: none), and how many objects found their cell taken
    (their marks are lost; the first object keeps the cell)."""
    shape = np.zeros(grid * grid, np.int32)
    colour = np.zeros(grid * grid, np.int32)
    collisions = 0
    for o in objects:
        cell = min(int(o.cy * grid), grid - 1) * grid + min(int(o.cx * grid), grid - 1)
        if shape[cell]:
            collisions += 1
            continue
        shape[cell] = SHAPES.index(o.shape) + 1
        colour[cell] = COLOURS.index(o.colour) + 1
    return shape, colour, collisions


def oracle_rows(tokens: dict, shape: jax.Array, colour: jax.Array) -> jax.Array:
    """[B, cells + buffers, D]: the oracle image rows, buffers last (Harmon's z_enc order)."""
    rows = tokens["shape"][shape] + tokens["colour"][colour] + tokens["cell"][None]
    buffers = jnp.broadcast_to(tokens["buffer"][None], (shape.shape[0], *tokens["buffer"].shape))
    return jnp.concatenate([rows, buffers], axis=1)


@dataclasses.dataclass(frozen=True)
class _Scenes:
    shape: np.ndarray  # [N, cells]
    colour: np.ndarray
    qa: list  # per scene: (question, answer, qtype) triples of the training types
    collisions: int


def _scenes(split: str, indices: Sequence[int], grid: int, seed: int, qtypes) -> _Scenes:
    data = ShapesDataset(split, seed=seed, image_size=32)
    shapes, colours, qa, collisions = [], [], [], 0
    for i in indices:
        _, objects, pairs = data.scene(int(i))
        s, c, lost = cell_labels(objects, grid)
        shapes.append(s)
        colours.append(c)
        qa.append(tuple(p for p in pairs if p[2] in qtypes))
        collisions += lost
    return _Scenes(np.stack(shapes), np.stack(colours), qa, collisions)


class _NoImage:
    """The understanding transform's image step, unused here (the rows are oracle tokens)."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image


def readout_probe(
    config: ml_collections.ConfigDict,
    family: HarmonFamily,
    stage: StageSpec,
    settings: ReadoutSettings = ReadoutSettings(),
    *,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Trains the config's LLM from initialisation on oracle image tokens; returns the curve.

    `family` is the config's Harmon family (tokenizer, model config); `stage` gives the image
    size (grid), learning rate and schedule; `config.optimizer` the AdamW settings.
    """
    model_cfg = family.model_cfg
    tokenizer = family.tokenizer
    grid_h, grid_w = model_cfg.latent_grid(stage.image_size)
    if grid_h != grid_w:
        raise ValueError(f"readout probe needs a square token grid, got {grid_h}x{grid_w}")
    grid, n_buf = grid_h, model_cfg.mar.buffer_size
    image_tokens = grid * grid + n_buf
    width = model_cfg.llm.hidden_size
    from unified_mm.families.harmon import stage_data_config

    data_cfg = stage_data_config(config.data, stage)  # the stage's own data overrides, if any

    # Training scenes whose question pool has a question of the training types.
    train = _scenes("train", range(settings.num_train), grid, settings.seed, settings.train_qtypes)
    usable = np.array([i for i, q in enumerate(train.qa) if q])
    if usable.size == 0:
        raise ValueError(f"no training scene has questions of types {settings.train_qtypes}")
    transform = UnderstandingTransform(
        image=_NoImage(),
        tokenizer=tokenizer,
        max_und_len=int(data_cfg.max_und_len),
        image_tokens=image_tokens,
        qa_turns=int(data_cfg.get("qa_turns", 1)),
        question_weights=question_weights_of(data_cfg),
    )
    blank = np.zeros((1, 1, 3), np.uint8)

    # shapes-VQA's held-out questions, with their scenes' oracle labels.
    questions = shapes_questions(
        settings.num_questions, image_size=32, seed=settings.seed, qtypes=VQA_TYPES
    )
    heldout = _scenes("heldout", [q.index for q in questions], grid, settings.seed, QTYPES)
    answers, prompts = [], []
    for q in questions:
        answer_ids = tokenizer.encode(q.answer)
        if len(answer_ids) != 1:
            raise ValueError(f"readout probe scores one-token answers; {q.answer!r} is not one")
        enc = encode_understanding(
            tokenizer,
            q.question,
            None,
            image_tokens=image_tokens,
            max_len=int(data_cfg.max_und_len),
        )
        answers.append(answer_ids[0])
        prompts.append(enc)
    ev_ids = jnp.asarray(np.stack([p["input_ids"] for p in prompts]))
    ev_mask = jnp.asarray(np.stack([p["attention_mask"] for p in prompts]))
    ev_last = jnp.asarray(np.array([int(p["prompt_len"]) - 1 for p in prompts]))
    ev_answer = np.array(answers)
    ev_types = np.array([q.qtype for q in questions])

    llm = Qwen2(model_cfg.llm, rngs=nnx.Rngs(int(config.seed)))
    graphdef, llm_params, rest = nnx.split(llm, nnx.Param, ...)
    rng = np.random.default_rng(settings.seed)
    std = settings.token_init_std
    tokens = {
        "shape": rng.normal(0, std, (len(SHAPES) + 1, width)),
        "colour": rng.normal(0, std, (len(COLOURS) + 1, width)),
        "cell": rng.normal(0, std, (grid * grid, width)),
        "buffer": rng.normal(0, std, (n_buf, width)),
    }
    params = (llm_params, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tokens))
    optimizer = make_optimizer(config.optimizer, stage, mar_weight_decay_rule)
    opt_state = optimizer.init(params)
    image_token_id = tokenizer.image_token_id

    def hidden_of(p, shape, colour, input_ids, mask):
        model = nnx.merge(graphdef, p[0], rest)
        embeds = splice_image_rows(
            model, input_ids, oracle_rows(p[1], shape, colour), image_token_id
        )
        hidden, _ = model(embeds, attention_mask=mask)
        return model, hidden

    def loss_fn(p, shape, colour, input_ids, mask, labels):
        model, hidden = hidden_of(p, shape, colour, input_ids, mask)
        logits = model.logits(hidden[:, :-1])
        targets = labels[:, 1:]
        valid = targets >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
        return jnp.where(valid, ce, 0.0).sum() / jnp.maximum(valid.sum(), 1)

    @jax.jit
    def train_step(p, s, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def first_answer_token(p, shape, colour):
        model, hidden = hidden_of(p, shape, colour, ev_ids, ev_mask)
        last = jnp.take_along_axis(hidden, ev_last[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.logits(last), axis=-1)

    def score() -> dict:
        predicted = np.asarray(first_answer_token(params, heldout.shape, heldout.colour))
        correct = predicted == ev_answer
        out = {"overall": float(correct.mean())}
        out.update({t: float(correct[ev_types == t].mean()) for t in VQA_TYPES if t in ev_types})
        return out

    curve, start = [], time.time()
    for step in range(1, settings.steps + 1):
        picked = usable[rng.integers(0, usable.size, settings.batch_size)]
        encoded = [transform(Sample(blank, None, train.qa[i]), rng) for i in picked]
        batch = [np.stack([e[k] for e in encoded]) for k in ("input_ids", "attention_mask")]
        labels = np.stack([e["labels"] for e in encoded])
        params, opt_state, loss = train_step(
            params, opt_state, train.shape[picked], train.colour[picked], *batch, labels
        )
        if step % settings.eval_every == 0 or step == settings.steps:
            point = {"step": step, "loss": float(loss), **score()}
            curve.append(point)
            if log is not None:
                per_type = " ".join(f"{t} {point[t]:.2f}" for t in VQA_TYPES if t in point)
                log(
                    f"step {step}: loss {point['loss']:.3f} held-out first-token accuracy "
                    f"{point['overall']:.3f} ({per_type}) {time.time() - start:.0f} s"
                )
    return {
        "curve": curve,
        "final": curve[-1],
        "grid": grid,
        "cell_collisions": {"train": train.collisions, "heldout": heldout.collisions},
        "questions": len(questions),
        "settings": dataclasses.asdict(settings),
        "stage": stage.name,
        "llm_layers": int(model_cfg.llm.num_hidden_layers),
        "seconds": round(time.time() - start, 1),
    }
