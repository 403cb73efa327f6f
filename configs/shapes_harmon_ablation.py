"""One-stage ablations of the main job (configs/shapes_harmon.py): the README's ablation rows.

    python -m unified_mm.main --config configs/shapes_harmon_ablation.py:steps=800,t2i=0 \
        --workdir runs/ablation_und_800

The model, data and evaluation are the main job's; the schedule is one stage ("full": everything
but the tokenizer trains) at 32 px with warm-up and cosine decay, and the arguments below change
one thing at a time. The README rows come from these commands (``:`` arguments only):

    steps=400,t2i=0,turns=1,ema=0          one QA turn per sample (Harmon's layout)
    steps=300,t2i=0,ema=0                  6 QA turns packed into the static length
    steps=400,t2i=0,ema=0,lr=5e-3          learning rate (and lr=2e-3)
    steps=800,t2i=0,ema=0                  (and lr=1e-3, llm_depth=4, patch=4)
    steps=2000,i2t=0,geneval=8             generation alone, predicting v
    steps=800,t2i=0,ema=0,init=P           from a shape-taught encoder (and freeze_encoder)
    steps=800,t2i=0,ema=0,colour_cell=4    factorised pixel tokens (occupancy + cell colour)
    steps=1500,i2t=0,geneval=8,colour_cell=4   (and patch=16)
    steps=800,t2i=0,ema=0,colour_cell=4,init=Q,freeze_encoder=true   (and steps=2000;
                                           and without freeze_encoder)
    steps=1500,i2t=0,geneval=8,mask_min=0.0    training mask ratios down to 0 (MAR: 0.7)
    steps=3500,i2t=0,geneval=8,mask_min=0.0 --config.model.mar.diffusion_batch_mul=1
    steps=800,t2i=0,ema=0,stem=16          the hybrid-ViT conv stem (16-32-64 channels)
    count_weight=4                         with tools/readout_probe --stage full: count questions
                                           drawn 4x as often as each other type

P is the `harmon_official.safetensors` that
`python -m unified_mm.tools.encoder_probe --checkpoint W --at-init --supervised --save-official D`
writes for any work directory W of this config (the model at initialisation, its encoder trained
on the per-shape counts). Q is the same with ``--attributes shape colour`` (counts per shape and
per colour) for a work directory W of ``colour_cell=4``.

Arguments (``:key=value,...``): ``smoke`` (a few steps, for tests), ``steps``, ``i2t`` / ``t2i``
(per-task batch; 0 leaves the task out), ``turns`` (QA turns per understanding sample), ``lr``,
``patch`` (pixel patch: 8 gives 4x4 tokens of 192-d, 4 gives 8x8 of 48-d), ``llm_depth``,
``prediction`` (``v`` or ``epsilon``), ``ema`` (decay; 0 evaluates the raw weights), ``geneval``
(held-out prompts per category, two images each), ``vqa`` (held-out questions), ``init`` (a
full model in the official Harmon layout to start from), ``freeze_encoder`` (the MAR encoder
does not train), ``colour_cell`` (0: RGB patches; c > 0: the pixel tokenizer's factorised
layout, each pixel's occupancy plus the mean colour of every c x c cell, 64 + 12 dims at c = 4),
``count_weight`` (relative weight of count questions among a record's question types,
``data.question_weights``; 1 draws the types uniformly), ``mask_min`` (MAR's `mask_ratio_min`:
the training mask ratio is drawn from N(1, 0.25^2) truncated to [mask_min, 1]; 0.7 is MAR's
value, 0 lets training see up to every token) and
``stem`` (0: MAR's linear token embedding; c > 0: the MAR encoder embeds tokens through the conv
stem of models/harmon/conv_stem.py, log2(patch) 3x3 conv + max-pool stages of c, 2c, ...
channels).
"""

import importlib.util
import os

import ml_collections

from unified_mm.config.args import parse_arg
from unified_mm.config.base import stage
from unified_mm.models.harmon.conv_stem import conv_stem_pools
from unified_mm.models.harmon.vae import PixelTokenizerConfig

IMAGE_SIZE = 32


def _main_job_config(arg: str) -> ml_collections.ConfigDict:
    # configs/ is not a package: load the sibling file by path.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_harmon.py")
    spec = importlib.util.spec_from_file_location("shapes_harmon_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg,
        smoke=False,
        steps=800,
        i2t=32,
        t2i=32,
        turns=6,
        lr=2e-3,
        patch=8,
        llm_depth=2,
        prediction="v",
        ema=0.99,
        geneval=1,
        vqa=300,
        init="",
        freeze_encoder=False,
        colour_cell=0,
        mask_min=0.7,
        stem=0,
        count_weight=1.0,
    )
    if a.i2t <= 0 and a.t2i <= 0:
        raise ValueError("shapes_harmon_ablation: i2t and t2i are both 0; nothing would train")
    if a.geneval < 1:
        raise ValueError(
            f"shapes_harmon_ablation: geneval={a.geneval}; at least 1 prompt per category"
        )
    if IMAGE_SIZE % a.patch:
        raise ValueError(f"shapes_harmon_ablation: patch={a.patch} does not divide {IMAGE_SIZE}")
    if not a.count_weight > 0:
        raise ValueError(f"shapes_harmon_ablation: count_weight={a.count_weight}; it must be > 0")
    if a.stem < 0:
        raise ValueError(f"shapes_harmon_ablation: stem={a.stem}; 0 (off) or the first channels")
    c = _main_job_config("smoke" if a.smoke else "")

    grid = IMAGE_SIZE // a.patch
    c.model.pixel_patch = a.patch
    c.model.vae.stride = a.patch
    c.model.mar.vae_stride = a.patch
    c.model.mar.seq_h = c.model.mar.seq_w = grid
    c.eval.num_iter = min(c.eval.num_iter, grid * grid)  # one AR step per token at most
    c.model.pixel_colour_cell = a.colour_cell
    token_dim = PixelTokenizerConfig(patch=a.patch, colour_cell=a.colour_cell).token_dim
    c.model.mar.vae_embed_dim = c.model.mar.token_embed_dim = token_dim
    c.model.mar.diffusion_prediction = a.prediction
    c.model.mar.mask_ratio_min = a.mask_min
    # One pooling conv stage per halving of the patch, channels doubling from `stem`.
    stages = conv_stem_pools(a.patch) if a.stem else 0
    c.model.mar.conv_stem = tuple(a.stem * 2**i for i in range(stages))
    c.model.mar.conv_stem_patch = a.patch
    c.model.llm.num_hidden_layers = a.llm_depth
    c.data.qa_turns = a.turns
    if a.count_weight != 1.0:
        c.data.question_weights.count = a.count_weight

    if a.init:
        # A full model in the official layout, e.g. from tools/encoder_probe --save-official.
        c.init = ml_collections.ConfigDict(
            dict(harmon_checkpoint=a.init, vae_checkpoint="", llm_safetensors="")
        )
    trainable = ("mar_encoder", "mar_decoder", "diffloss", "projectors", "llm")
    if a.freeze_encoder:
        trainable = trainable[1:]
    task_batch = {task: n for task, n in (("i2t", a.i2t), ("t2i", a.t2i)) if n > 0}
    c.stage_order = ("full",)
    c.stages = ml_collections.ConfigDict(
        {
            "full": stage(
                steps=2 if a.smoke else a.steps,
                trainable=trainable,
                image_size=IMAGE_SIZE,
                task_batch=task_batch,
                lr=a.lr,
                warmup_steps=1 if a.smoke else 30,
                schedule="cosine",
                min_lr_ratio=0.1,
            )
        }
    )
    c.ema.decay = 0.0 if a.smoke else a.ema
    c.eval.geneval_prompts_per_category = a.geneval
    c.eval.vqa_questions = 8 if a.smoke else a.vqa
    c.eval.preview_prompts = () if a.smoke else c.eval.preview_prompts
    return c
