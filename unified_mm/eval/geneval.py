"""shapes-GenEval: GenEval's prompt categories and scoring rules, judged by the shapes detector.

Prompts are `shapes.PromptSpec`s; each becomes GenEval's metadata record (`tag`, `prompt`,
`include` [{class, count, color?, position?}], `exclude`), so the same record can be written in
GenEval's folder layout (`<out>/<index:05d>/metadata.jsonl`, `samples/<k:05d>.png`) and scored by
GenEval's rules here:

* every `include` group needs >= count objects of its class (the shape); with a `color`, >= count
  of them in that colour; with a `position` [relation, target group], every counted object must
  stand in `relation` to every object counted for the target group (GenEval's box rule,
  `shapes_detector.relative_position`);
* an `exclude` {class, count} fails the image when >= count objects of the class are present
  (counting prompts: exactly N);
* one 0/1 score per image; per-category means; overall = mean of the six categories.

One deliberate difference: GenEval's colour and position checks look at the `count` most
confident boxes of a class, because its detector is colour-blind; ours knows every object's
colour, so the objects of the requested colour are the ones counted (ties: best shape fit first).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from unified_mm.data.shapes import CATEGORIES, PromptSpec
from unified_mm.eval.shapes_detector import (
    DEFAULT_DETECTOR,
    Detection,
    DetectorConfig,
    detect_objects,
    relative_position,
)


def geneval_metadata(spec: PromptSpec) -> dict:
    """GenEval's metadata record of a prompt (class = shape name, color = palette name).

    Position prompts list the target (groups[1]) first and give groups[0] the relation to group 0,
    exactly as GenEval's `evaluation_metadata.jsonl`.
    """

    def req(group) -> dict:
        r = {"class": group.shape, "count": int(group.count)}
        if group.colour is not None:
            r["color"] = group.colour
        return r

    meta: dict = {"tag": spec.category, "prompt": spec.caption}
    if spec.category == "position":
        if spec.relation is None or len(spec.groups) != 2:
            raise ValueError(f"position prompt {spec.caption!r} needs two groups and a relation")
        target, subject = req(spec.groups[1]), req(spec.groups[0])
        subject["position"] = [spec.relation, 0]
        meta["include"] = [target, subject]
    else:
        meta["include"] = [req(g) for g in spec.groups]
    if spec.category == "counting":
        g = spec.groups[0]
        meta["exclude"] = [{"class": g.shape, "count": int(g.count) + 1}]
    return meta


def _ordered(objects: Sequence[Detection], colour: str | None) -> list[Detection]:
    return sorted(objects, key=lambda d: (colour is not None and d.colour != colour, -d.iou))


def score_image(metadata: Mapping, detections: Sequence[Detection]) -> tuple[bool, str]:
    """GenEval's rules on one image's detections: (correct, reason when not)."""
    by_class: dict[str, list[Detection]] = collections.defaultdict(list)
    for d in detections:
        by_class[d.shape].append(d)
    correct = True
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count, colour = req["class"], int(req["count"]), req.get("color")
        found = _ordered(by_class.get(cls, []), colour)[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif colour is not None and sum(d.colour == colour for d in found) < count:
            ok = False
            have = collections.Counter(d.colour for d in by_class[cls])
            reasons.append(f"expected {colour} {cls}>={count}, found {dict(have)}")
        if ok and "position" in req:
            relation, target = req["position"][0], int(req["position"][1])
            if target >= len(matched) or matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                for a in found:
                    for b in matched[target]:
                        rels = relative_position(a.box(), b.box())
                        if relation not in rels:
                            ok = False
                            reasons.append(
                                f"expected {cls} {relation} target, found "
                                f"{' and '.join(sorted(rels)) or 'no relation'}"
                            )
                            break
                    if not ok:
                        break
        correct &= ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(by_class.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(by_class[cls])}")
    return correct, "; ".join(reasons)


def summarize(results: Sequence[Mapping]) -> dict:
    """Per-category accuracy (categories present) and their mean as "overall"."""
    per: dict[str, list[bool]] = collections.defaultdict(list)
    for r in results:
        per[r["tag"]].append(bool(r["correct"]))
    out = {c: float(np.mean(per[c])) for c in CATEGORIES if per.get(c)}
    out.update({c: float(np.mean(v)) for c, v in per.items() if c not in out})
    out["overall"] = float(np.mean([out[c] for c in per])) if per else 0.0
    return out


def score_generations(
    specs: Sequence[PromptSpec],
    images: np.ndarray | Sequence[np.ndarray],
    *,
    images_per_prompt: int,
    detector: DetectorConfig = DEFAULT_DETECTOR,
) -> tuple[dict, list[dict]]:
    """Scores images laid out prompt-major ([p0 s0, p0 s1, ..., p1 s0, ...]).

    Returns (summary, per-image results with prompt, tag, sample, correct, reason, detections).
    """
    if len(images) != len(specs) * images_per_prompt:
        raise ValueError(
            f"expected {len(specs)} prompts x {images_per_prompt} images = "
            f"{len(specs) * images_per_prompt} images, got {len(images)}"
        )
    results = []
    for i, image in enumerate(images):
        spec = specs[i // images_per_prompt]
        meta = geneval_metadata(spec)
        found = detect_objects(np.asarray(image), detector)
        ok, reason = score_image(meta, found)
        results.append(
            {
                "prompt": spec.caption,
                "tag": spec.category,
                "sample": i % images_per_prompt,
                "correct": bool(ok),
                "reason": reason,
                "detections": [
                    f"{d.colour} {d.shape} @({d.cx:.2f},{d.cy:.2f}) s{d.size:.2f}" for d in found
                ],
            }
        )
    return summarize(results), results


def ground_truth_score(
    specs: Sequence[PromptSpec], image_size: int, *, seeds: int = 2, split: str = "heldout"
) -> dict:
    """shapes-GenEval of rendered ground-truth scenes for the prompts (the attainable ceiling;
    GenEval's position rule rejects ~0.5% of correctly laid out scenes)."""
    from unified_mm.data.shapes import scene_for_prompt
    from unified_mm.data.shapes_render import render_objects

    images, order = [], []
    for spec in specs:
        for s in range(seeds):
            images.append(render_objects(scene_for_prompt(spec, seed=s, split=split), image_size))
            order.append(spec)
    summary, _ = score_generations(specs, images, images_per_prompt=seeds)
    return summary


# ------------------------------------------------------------------------------------------------
# GenEval's folder layout


def write_geneval_folder(
    out_dir: str, index: int, metadata: Mapping, images: Sequence[np.ndarray]
) -> list[str]:
    """`<out>/<index:05d>/metadata.jsonl` (one JSON line) and `samples/<k:05d>.png`, as GenEval's
    generation scripts write them; returns the image paths."""
    from PIL import Image

    folder = os.path.join(out_dir, f"{index:05d}")
    os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        json.dump(dict(metadata), f)
        f.write("\n")
    paths = []
    for k, image in enumerate(images):
        p = os.path.join(folder, "samples", f"{k:05d}.png")
        Image.fromarray(np.asarray(image)).save(p)
        paths.append(p)
    return paths


def score_geneval_folder(
    path: str, detector: DetectorConfig = DEFAULT_DETECTOR
) -> tuple[dict, list]:
    """Scores a folder in GenEval's layout whose metadata uses shapes classes and colours."""
    from PIL import Image

    if not os.path.isdir(path):
        raise ValueError(f"GenEval folder {path} does not exist")
    results = []
    for name in sorted(os.listdir(path)):
        folder = os.path.join(path, name)
        if not (name.isdigit() and os.path.isdir(folder)):
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as f:
            meta = json.loads(f.readline())
        samples = os.path.join(folder, "samples")
        for img_name in sorted(os.listdir(samples)):
            if not img_name.endswith(".png"):
                continue
            image = np.asarray(Image.open(os.path.join(samples, img_name)).convert("RGB"))
            ok, reason = score_image(meta, detect_objects(image, detector))
            results.append(
                {
                    "prompt": meta.get("prompt", ""),
                    "tag": meta["tag"],
                    "correct": ok,
                    "reason": reason,
                    "file": os.path.join(name, "samples", img_name),
                }
            )
    if not results:
        raise ValueError(f"{path} holds no GenEval samples (<index>/samples/<k>.png)")
    return summarize(results), results
