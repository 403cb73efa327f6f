"""The evaluation suite of a VQRAE model: reconstruction after the tokenizer stages, and
shapes-GenEval / shapes-VQA once the unified model has been trained.

Report keys: step, stage, image_size, reconstruction {psnr, ssim, codebook_utilisation,
code_perplexity, images}, teacher_cosine (stage-2 distillation similarity, when a teacher exists),
and after an ``objective: unified`` stage: detector_accuracy, geneval, vqa, geneval_valid, seconds.
Settings from ``config.eval``: recon_images, geneval_prompts_per_category,
geneval_images_per_prompt, vqa_questions, temperature, top_k, cfg, image_size (0: the stage's).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.data import templates
from unified_mm.data.shapes import ShapesDataset, geneval_prompts
from unified_mm.eval import geneval, vqa
from unified_mm.eval.harmon_inference import prepare_images, understanding_prompts
from unified_mm.eval.reconstruction import evaluate_reconstruction
from unified_mm.eval.shapes_detector import validate_detector
from unified_mm.eval.suite import MIN_DETECTOR_ACCURACY, eval_image_size
from unified_mm.models.vqrae.losses import cosine_similarity

log = logging.getLogger("unified_mm")
_BATCH = 32


@functools.lru_cache(maxsize=8)
def _jitted(graphdef):
    def reconstruct(state, images):
        return nnx.merge(graphdef, state).tokenizer.reconstruct(images)

    def teacher_cosine(state, images):
        tok = nnx.merge(graphdef, state).tokenizer
        pixels = tok.preprocess(images)
        return cosine_similarity(tok.encoder(pixels), tok.teacher(pixels))

    def sample(state, ids, mask, null_ids, null_mask, key, temperature, cfg_scale, top_k):
        model = nnx.merge(graphdef, state)
        images, _ = model.sample_t2i(
            ids,
            mask,
            null_ids,
            null_mask,
            key,
            temperature=temperature,
            top_k=top_k,
            cfg_scale=cfg_scale,
        )
        return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)

    def answer(state, images, ids, mask, max_new_tokens):
        model = nnx.merge(graphdef, state)
        tok = model.cfg
        new, _ = model.generate_i2t(
            images, ids, mask, max_new_tokens=max_new_tokens, eos_id=_EOS[0], pad_id=_PAD[0]
        )
        del tok
        return new

    return (
        jax.jit(reconstruct),
        jax.jit(teacher_cosine),
        jax.jit(sample, static_argnames=("top_k",)),
        jax.jit(answer, static_argnames=("max_new_tokens",)),
    )


_EOS = [0]
_PAD = [0]


def _pad(rows, length, pad_id):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _batches(items, size):
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        n = len(chunk)
        if n < size:  # one compiled shape
            chunk = list(chunk) + [chunk[-1]] * (size - n)
        yield n, chunk


def evaluate_vqrae(model, family, stage, *, workdir: str | None, step: int) -> dict:
    ev = family.config.get("eval", None)
    image_size = eval_image_size(ev, stage.image_size)
    graphdef, state = nnx.split(model)
    reconstruct, teacher_cos, sample, answer = _jitted(graphdef)
    t0 = time.perf_counter()
    report: dict = {"step": int(step), "stage": stage.name, "image_size": image_size}

    n_rec = int(ev.get("recon_images", 256)) if ev is not None else 256
    ds = ShapesDataset("heldout", seed=0, image_size=image_size)
    pixels = np.stack([ds[i].image for i in range(n_rec)]).astype(np.float32) / 127.5 - 1.0
    batches = [pixels[i : i + _BATCH] for i in range(0, n_rec - n_rec % _BATCH, _BATCH)]
    rec = evaluate_reconstruction(
        lambda x: reconstruct(state, x),
        batches,
        codebook_size=family.tokenizer_cfg.quantizer.codebook_size,
    )
    report["reconstruction"] = {k: v for k, v in rec.items() if not isinstance(v, np.ndarray)}
    if model.tokenizer.teacher is not None and stage.options.get("distill"):
        cos = [float(teacher_cos(state, jnp.asarray(b))) for b in batches]
        report["teacher_cosine"] = float(np.mean(cos))

    if stage.options.get("objective") == "unified":
        report.update(
            _generation_and_understanding(
                model, family, state, sample, answer, ev, image_size, step
            )
        )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "evaluation at step %d (%s): %s",
        step,
        stage.name,
        {k: v for k, v in report.items() if k not in ("detector",)},
    )
    return report


def _generation_and_understanding(model, family, state, sample, answer, ev, image_size, step):
    tok = family.tokenizer
    _EOS[0], _PAD[0] = tok.eos_id, tok.pad_id
    out: dict = {}
    det = validate_detector(image_size, num_images=100)
    out["detector_accuracy"] = det["accuracy"]
    out["geneval_valid"] = bool(det["accuracy"] >= MIN_DETECTOR_ACCURACY)

    per_cat = int(ev.get("geneval_prompts_per_category", 4))
    per_prompt = int(ev.get("geneval_images_per_prompt", 2))
    specs = geneval_prompts(per_cat, split="heldout", seed=0)
    prompts = [
        tok.encode(templates.generation_text(s.caption)) for s in specs for _ in range(per_prompt)
    ]
    null = tok.encode(templates.generation_text(None))
    length = max(max(map(len, prompts)), len(null))
    null_ids, null_mask = _pad([null], length, tok.pad_id)
    images = []
    key = jax.random.key(step)
    for c, (n, chunk) in enumerate(_batches(prompts, _BATCH)):
        ids, mask = _pad(chunk, length, tok.pad_id)
        imgs = sample(
            state,
            ids,
            mask,
            null_ids[0],
            null_mask[0],
            jax.random.fold_in(key, c),
            float(ev.get("temperature", 1.0)),
            float(ev.get("cfg", 1.0)),
            top_k=int(ev.get("top_k", 0)),
        )
        images.append(np.asarray(imgs)[:n])
    images = np.concatenate(images)
    out["geneval"], _ = geneval.score_generations(specs, images, images_per_prompt=per_prompt)

    g = family.tokenizer_cfg.encoder.grid

    def answer_fn(imgs, questions, max_new_tokens):
        rows = understanding_prompts(tok, questions, image_tokens=g * g)
        px = prepare_images(imgs, image_size)
        length = max(map(len, rows))
        texts = []
        for start in range(0, len(rows), _BATCH):
            n = min(_BATCH, len(rows) - start)
            chunk = rows[start : start + n] + [rows[start]] * (_BATCH - n)
            pchunk = np.concatenate(
                [px[start : start + n], np.repeat(px[start : start + 1], _BATCH - n, 0)]
            )
            ids, mask = _pad(chunk, length, tok.pad_id)
            new = np.asarray(answer(state, pchunk, ids, mask, max_new_tokens=int(max_new_tokens)))
            for row in new[:n]:
                row = [int(t) for t in row if t not in (tok.eos_id, tok.pad_id)]
                texts.append(tok.decode(row, skip_special_tokens=True).strip())
        return texts

    out["vqa"], _ = vqa.evaluate_vqa(
        answer_fn, tok, num_questions=int(ev.get("vqa_questions", 100)), image_size=image_size
    )
    return out
