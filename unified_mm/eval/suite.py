"""The evaluation suite of a Harmon model: one JSON report per call.

Run by the trainer after each stage (`HarmonFamily.evaluate`) and by `python -m unified_mm.evaluate`.

Report keys (`REPORT_KEYS`):
  step, stage, image_size     where and at which resolution the model was evaluated
  detector_accuracy           strict per-image accuracy of the shapes detector on rendered
                              ground truth at `image_size` (must be >= 0.99 for GenEval to mean
                              anything; `geneval_valid` says whether it is)
  detector                    the detector validation in detail (shapes_detector.validate_detector)
  geneval                     shapes-GenEval per category and "overall" (mean of categories)
  geneval_ground_truth        the same scoring on rendered ground-truth scenes of the prompts
  geneval_settings            prompts, samples per prompt and sampler settings used
  t2i_conditioning            whether generation uses its prompt and visible tokens
                              (eval/conditioning.py: text_gap, context_gap; ~0 = ignored)
  vqa                         shapes-VQA exact match per question type, "overall", "mean_per_type"
  vqa_train_split             the same on fresh train-split images (only when asked for)
  fid                         {"fid", "images"} or {"skipped": reason}
  seconds                     wall time per part

Settings come from `config.eval`: geneval_prompts_per_category, geneval_images_per_prompt,
vqa_questions, image_size (0: the stage's), num_iter, cfg, cfg_schedule, temperature, and the
optional num_diffusion_steps, fid_inception_path, detector_images (default 200), seed (default 0),
batch_size (default 64), conditioning_pairs (default 32; < 2 skips the probe),
vqa_train_split_questions (default 0: off; else the VQA also on fresh train-split images,
`vqa_train_split`). Sample grids and per-item results go to `<workdir>/eval/`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from unified_mm.data.shapes import CATEGORIES, QTYPES, ShapesDataset, geneval_prompts
from unified_mm.eval import fid as fid_lib
from unified_mm.eval import geneval, vqa
from unified_mm.eval import harmon_inference as inf
from unified_mm.eval.conditioning import t2i_conditioning_probe
from unified_mm.eval.shapes_detector import validate_detector

log = logging.getLogger("unified_mm")

REPORT_KEYS = (
    "step",
    "stage",
    "image_size",
    "detector_accuracy",
    "detector",
    "geneval",
    "geneval_ground_truth",
    "geneval_valid",
    "geneval_settings",
    "t2i_conditioning",
    "vqa",
    "fid",
    "seconds",
)
MIN_DETECTOR_ACCURACY = 0.99


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def shapes_antialias(config: Any) -> int:
    """Antialiasing of the config's shapes source (what the model was trained on), else 1."""
    data = config.get("data", None) if hasattr(config, "get") else None
    sources = data.get("sources", None) if data is not None else None
    for src in sources.values() if sources is not None else ():
        if _get(src, "kind", "") == "shapes":
            return int(_get(src, "antialias", 1) or 1)
    return 1


def eval_image_size(eval_cfg: Any, stage_image_size: int) -> int:
    size = int(_get(eval_cfg, "image_size", 0) or 0)
    return size if size > 0 else int(stage_image_size)


def evaluate_harmon(
    model,
    family,
    stage,
    *,
    workdir: str | None,
    step: int,
    eval_cfg: Any = None,
) -> dict:
    """Runs detector validation, shapes-GenEval, shapes-VQA and (optionally) FID on `model`."""
    ev = eval_cfg if eval_cfg is not None else family.config.get("eval", None)
    image_size = eval_image_size(ev, stage.image_size)
    seed = int(_get(ev, "seed", 0))
    batch = int(_get(ev, "batch_size", inf.DEFAULT_BATCH))
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    report: dict = {"step": int(step), "stage": stage.name, "image_size": image_size}

    # -- the detector first: its accuracy says whether the GenEval numbers mean anything
    t = time.perf_counter()
    det = validate_detector(
        image_size,
        num_images=int(_get(ev, "detector_images", 200)),
        antialias=shapes_antialias(family.config),
    )
    report["detector_accuracy"] = det["accuracy"]
    report["detector"] = det
    seconds["detector"] = time.perf_counter() - t

    # -- shapes-GenEval
    t = time.perf_counter()
    per_cat = int(_get(ev, "geneval_prompts_per_category", 10))
    per_prompt = int(_get(ev, "geneval_images_per_prompt", 4))
    specs = geneval_prompts(per_cat, split="heldout", seed=seed)
    opts = inf.sampling_options(ev) if ev is not None else {}
    images = inf.text_to_image(
        model,
        family.tokenizer,
        [s.caption for s in specs for _ in range(per_prompt)],
        image_size=image_size,
        key=jax.random.key(seed),
        batch_size=batch,
        **opts,
        # no max_text_len / max_prompt_len check here: dataset prompts fit the trained lengths
        # (the CLIs check user prompts), and an evaluation must not stop a training run.
    )
    summary, results = geneval.score_generations(specs, images, images_per_prompt=per_prompt)
    report["geneval"] = summary
    report["geneval_ground_truth"] = geneval.ground_truth_score(specs, image_size, seeds=1)
    report["geneval_valid"] = bool(det["accuracy"] >= MIN_DETECTOR_ACCURACY)
    if not report["geneval_valid"]:
        log.warning(
            "detector accuracy %.4f < %.2f at %d px: the GenEval scores are not meaningful",
            det["accuracy"],
            MIN_DETECTOR_ACCURACY,
            image_size,
        )
    report["geneval_settings"] = {
        "prompts_per_category": per_cat,
        "images_per_prompt": per_prompt,
        "split": "heldout",
        **opts,
    }
    seconds["geneval"] = time.perf_counter() - t

    # -- does generation use its prompt and its visible tokens? (paired loss probe)
    t = time.perf_counter()
    pairs = int(_get(ev, "conditioning_pairs", 32))
    if pairs >= 2:
        data = ShapesDataset("heldout", seed=seed, image_size=image_size)
        examples = [data[i] for i in range(pairs)]
        report["t2i_conditioning"] = t2i_conditioning_probe(
            model,
            family.tokenizer,
            np.stack([e.image for e in examples]),
            [e.caption for e in examples],
            max_text_len=int(family.config.data.max_text_len),
            key=jax.random.key(seed + 1),
        )
    seconds["conditioning"] = time.perf_counter() - t

    # -- shapes-VQA
    t = time.perf_counter()

    def answer(imgs, questions, max_new_tokens):
        return inf.image_to_text(
            model,
            family.tokenizer,
            imgs,
            questions,
            image_size=image_size,
            max_new_tokens=max_new_tokens,
            batch_size=batch,
        )

    vqa_summary, vqa_records = vqa.evaluate_vqa(
        answer,
        family.tokenizer,
        num_questions=int(_get(ev, "vqa_questions", 100)),
        image_size=image_size,
        seed=seed,
    )
    report["vqa"] = vqa_summary
    # Captioning ("Describe the image.") is scored on its own, not inside the VQA score.
    caption_summary, _ = vqa.evaluate_vqa(
        answer,
        family.tokenizer,
        num_questions=max(1, int(_get(ev, "vqa_questions", 100)) // len(vqa.VQA_TYPES)),
        image_size=image_size,
        seed=seed,
        qtypes=vqa.CAPTION_TYPES,
    )
    report["captioning"] = {
        "exact_match": caption_summary["overall"],
        "questions": caption_summary["questions"],
    }
    train_split = int(_get(ev, "vqa_train_split_questions", 0) or 0)
    if train_split > 0:
        # The same question types on fresh train-split images: a model that scores here and not on
        # held-out images learned the task but not the held-out (shape, colour) pairs.
        report["vqa_train_split"], _ = vqa.evaluate_vqa(
            answer,
            family.tokenizer,
            num_questions=train_split,
            image_size=image_size,
            seed=seed,
            split="train",
        )
    seconds["vqa"] = time.perf_counter() - t

    # -- FID (only with a user-given Inception file)
    t = time.perf_counter()
    fid_path = str(_get(ev, "fid_inception_path", "") or "")
    real = _ground_truth_images(specs, per_prompt, image_size) if fid_path else None
    report["fid"] = fid_lib.maybe_fid(fid_path, real, images)
    if "skipped" in report["fid"]:
        log.info("FID skipped: %s", report["fid"]["skipped"])
    seconds["fid"] = time.perf_counter() - t

    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    if workdir and jax.process_index() == 0:
        write_artifacts(workdir, stage.name, step, images, per_prompt, results, vqa_records)
    log.info("%s", format_table(report))
    return report


def _ground_truth_images(specs, per_prompt: int, image_size: int) -> np.ndarray:
    from unified_mm.data.shapes import scene_for_prompt
    from unified_mm.data.shapes_render import render_objects

    return np.stack(
        [
            render_objects(scene_for_prompt(s, seed=k, split="heldout"), image_size)
            for s in specs
            for k in range(per_prompt)
        ]
    )


def write_artifacts(
    workdir: str,
    stage_name: str,
    step: int,
    images: np.ndarray,
    per_prompt: int,
    geneval_results: list[dict],
    vqa_records: list[dict],
) -> str:
    """Sample grid (one row per prompt) and per-item JSONL results under <workdir>/eval/."""
    from PIL import Image

    from unified_mm.train.samples import image_grid

    folder = os.path.join(workdir, "eval")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{stage_name}_step{step}")
    Image.fromarray(image_grid(images, columns=per_prompt)).save(f"{stem}_geneval.png")
    for suffix, rows in (("geneval", geneval_results), ("vqa", vqa_records)):
        with open(f"{stem}_{suffix}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return stem


_SHORT = {
    "single_object": "single",
    "two_object": "two",
    "counting": "count",
    "colors": "colors",
    "position": "position",
    "color_attr": "attr",
}


def format_table(report: dict) -> str:
    """A few aligned lines for the log."""
    g, q = report.get("geneval", {}), report.get("vqa", {})
    lines = [
        f"evaluation at step {report['step']} ({report['stage']}, {report['image_size']} px)",
        f"  detector accuracy  {report['detector_accuracy']:.4f}"
        + ("" if report.get("geneval_valid", True) else "  (< 0.99: GenEval NOT meaningful)"),
        "  shapes-GenEval     overall {:.3f} | ".format(g.get("overall", float("nan")))
        + " ".join(f"{_SHORT[c]} {g[c]:.2f}" for c in CATEGORIES if c in g),
    ]
    if "t2i_conditioning" in report:
        c = report["t2i_conditioning"]
        # + 0.0 turns a rounded -0.0 into 0.0
        text, context = (round(c[k], 3) + 0.0 for k in ("text_gap", "context_gap"))
        lines.append(
            f"  t2i conditioning   text gap {text:+.1%} | context gap {context:+.1%} "
            f"(loss {c['loss']:.4f}; ~0: condition ignored)"
        )
    lines += [
        "  shapes-VQA         overall {:.3f} | ".format(q.get("overall", float("nan")))
        + " ".join(f"{t} {q[t]:.2f}" for t in QTYPES if t in q),
    ]
    if "vqa_train_split" in report:
        t = report["vqa_train_split"]
        lines.append(
            "  VQA, train split   overall {:.3f} | ".format(t["overall"])
            + " ".join(f"{k} {t[k]:.2f}" for k in QTYPES if k in t)
        )
    if "captioning" in report:
        lines.append(
            "  caption exact match {:.3f} ({} held-out images)".format(
                report["captioning"]["exact_match"], report["captioning"]["questions"]
            )
        )
    f = report.get("fid", {})
    lines.append(
        f"  FID                {f['fid']:.2f} ({f['images']} images)"
        if "fid" in f
        else f"  FID                skipped: {f.get('skipped', 'n/a')}"
    )
    lines.append(f"  seconds            {report.get('seconds', {})}")
    return "\n".join(lines)


def checkpoint_stage(config, meta: dict):
    """The StageSpec a checkpoint was saved in (meta["stage"]), else the config's last stage."""
    from unified_mm.train.stages import stages_from_config

    stages = stages_from_config(config)
    name = meta.get("stage")
    for s in stages:
        if s.name == name:
            return s
    return stages[-1]


def apply_overrides(eval_cfg: Any, overrides: dict) -> Any:
    """A copy of `config.eval` with the non-None `overrides` set (new keys allowed)."""
    import ml_collections

    base = eval_cfg.to_dict() if hasattr(eval_cfg, "to_dict") else dict(eval_cfg or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ml_collections.ConfigDict(base)
