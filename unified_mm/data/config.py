"""The `config.data` section: defaults, per-stage overrides and validation.

Fields (all validated by `validate_data_config`):

  sources           ConfigDict name -> source entry {kind: "shapes" | "tfds" | "array_record", ...}
                    (fields per kind: sources.py; build entries with `sources.source_config`)
  mixtures          ConfigDict task -> {source name: weight}; tasks are "t2i", "i2t", "image".
                    Only tasks with a positive per-step count (task_batch) need a mixture.
  max_text_len      static length Lt of generation prompts (t2i input_ids)
  max_und_len       static length Lu of understanding samples (image span included)
  image_tokens      copies of the image token in understanding inputs (latent tokens + buffer)
  null_prompt_prob  probability of replacing a generation caption by the null prompt (CFG)
  crop              square crop of t2i / image tasks: "center" | "random" | "pad"
  und_crop          square crop of i2t: "pad" (Harmon's expand2square) by default
  caption_question  question of understanding samples built from caption-only records
  qa_turns          question-answer turns per understanding sample (1: Harmon's layout; more
                    pack follow-up questions about the same image into the static length)
  question_weights  ConfigDict question type -> relative weight > 0 of drawing that type for an
                    understanding turn, among the types a record has (unlisted: 1; empty: the
                    types are drawn uniformly)
  workers           Grain worker processes (0: in-process threads only)
  threads           Grain read threads per process
  prefetch          steps buffered per process (float32 images: 64 x 512 px is 200 MB a step)
  max_bad_fraction  a source whose failed fraction exceeds this stops the run (BadDataError)
  min_records_for_check  attempts of a source before max_bad_fraction is judged
  max_retries       replacement records tried for a bad one before the run stops
  max_image_pixels  larger images are skipped as "oversized_image" (checked before decoding)
  tokenizer         {kind: "shapes_word" | "hf", path, image_token, pad_token, eos_token}
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from unified_mm.data import templates
from unified_mm.data.shapes_render import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from unified_mm.data.sources import source_config, source_spec
from unified_mm.data.tokenizers import TOKENIZER_KINDS, Tokenizer
from unified_mm.data.transforms import CROPS, generation_prompt_ids, understanding_fixed_len

TASKS: tuple[str, ...] = ("t2i", "i2t", "image")
# Maps whose entries are user-named: overrides may add new keys.
_OPEN_MAPS = ("sources", "mixtures", "question_weights")


def default_data_config() -> ml_collections.ConfigDict:
    """Shapes for every task, word-level tokenizer, Harmon's prompt settings."""
    c = ml_collections.ConfigDict()
    c.sources = ml_collections.ConfigDict({"shapes": source_config("shapes", split="train")})
    c.mixtures = ml_collections.ConfigDict(
        {task: ml_collections.ConfigDict({"shapes": 1.0}) for task in TASKS}
    )
    c.max_text_len = 32
    c.max_und_len = 128
    c.image_tokens = 80  # e.g. 4x4 latent tokens + 64 MAR buffer tokens at 64 px
    c.null_prompt_prob = 0.1
    c.crop = "random"
    c.und_crop = "pad"
    c.caption_question = templates.CAPTION_QUESTION
    c.qa_turns = 1
    c.question_weights = ml_collections.ConfigDict()
    c.workers = 0
    c.threads = 4
    c.prefetch = 4
    c.max_bad_fraction = 0.05
    c.min_records_for_check = 200
    c.max_retries = 16
    c.max_image_pixels = 1 << 25
    c.tokenizer = ml_collections.ConfigDict(
        {
            "kind": "shapes_word",
            "path": "",
            "image_token": templates.IMAGE_PLACEHOLDER,
            "pad_token": templates.ENDOFTEXT,
            "eos_token": templates.IM_END,
        }
    )
    return c


def question_weights_of(data_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
    """`data.question_weights` as the sorted (type, weight) pairs `UnderstandingTransform` takes."""
    weights = data_cfg.get("question_weights") or {}
    return tuple(sorted((str(k), float(v)) for k, v in weights.items()))


def _to_dict(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return value


def with_overrides(
    data_cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None
) -> ml_collections.ConfigDict:
    """A copy of data_cfg with a (nested) per-stage override applied.

    Unknown fields raise, except new entries under `sources` and `mixtures` (user-named).
    An override of a whole `mixtures.<task>` replaces that task's mixture.
    """
    base = _to_dict(data_cfg)
    base = copy.deepcopy(base)

    def merge(dst: dict, src: Mapping, path: str, open_map: bool) -> None:
        for key, value in src.items():
            where = f"{path}.{key}"
            value = _to_dict(value)
            if key not in dst and not open_map:
                raise ValueError(f"{where}: unknown field; known: {', '.join(sorted(dst))}")
            if path == "data.mixtures":
                dst[key] = dict(value)
            elif isinstance(value, Mapping) and isinstance(dst.get(key), dict):
                merge(dst[key], value, where, key in _OPEN_MAPS and path == "data")
            else:
                dst[key] = copy.deepcopy(value)

    merge(base, _to_dict(overrides or {}), "data", False)
    return ml_collections.ConfigDict(base)


def _check_range(cfg: Any, field: str, lo: float, hi: float | None = None) -> None:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"data.{field} must be a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"data.{field} = {value} is outside {bound}")


def validate_data_config(
    data_cfg: ml_collections.ConfigDict,
    *,
    task_batch: Mapping[str, int] | None = None,
    image_size: int | None = None,
    process_count: int = 1,
    tokenizer: Tokenizer | None = None,
    check_files: bool = True,
) -> None:
    """Raises a one-line ValueError naming the first problem; returns None when valid."""
    known = set(default_data_config().keys())
    present = set(data_cfg.keys())
    if missing := sorted(known - present):
        raise ValueError(f"data config lacks field(s) {missing}")
    if unknown := sorted(present - known):
        raise ValueError(
            f"data config has unknown field(s) {unknown}; known: {', '.join(sorted(known))}"
        )
    for field in (
        "max_text_len",
        "max_und_len",
        "image_tokens",
        "prefetch",
        "min_records_for_check",
        "qa_turns",
    ):
        _check_range(data_cfg, field, 1)
    for field in ("workers", "threads", "max_retries"):
        _check_range(data_cfg, field, 0)
    _check_range(data_cfg, "max_image_pixels", 1)
    _check_range(data_cfg, "null_prompt_prob", 0.0, 1.0)
    _check_range(data_cfg, "max_bad_fraction", 0.0, 1.0)
    for field in ("crop", "und_crop"):
        if data_cfg[field] not in CROPS:
            raise ValueError(
                f"data.{field} = {data_cfg[field]!r} is unknown; known: {', '.join(CROPS)}"
            )
    if not isinstance(data_cfg.caption_question, str) or not data_cfg.caption_question.strip():
        raise ValueError("data.caption_question must be a non-empty string")
    for qtype, weight in data_cfg.question_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"data.question_weights.{qtype} must be a number > 0, got {weight!r}")

    tok = data_cfg.tokenizer
    if tok.kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"data.tokenizer.kind {tok.kind!r} is unknown; known: {', '.join(TOKENIZER_KINDS)}"
        )
    if tok.kind == "hf" and not tok.path:
        raise ValueError("data.tokenizer.path must point to a tokenizer.json for kind 'hf'")
    if check_files and tok.path and not os.path.exists(os.path.expanduser(tok.path)):
        raise ValueError(f"data.tokenizer.path {tok.path!r} does not exist")

    specs = {}
    for name, entry in data_cfg.sources.items():
        specs[name] = source_spec(name, entry)
        try:
            specs[name].validate(check_files=check_files)
        except ValueError as e:
            raise ValueError(f"data.sources.{name}: {e}") from None
    for task, mixture in data_cfg.mixtures.items():
        if task not in TASKS:
            raise ValueError(f"data.mixtures.{task}: unknown task; known: {', '.join(TASKS)}")
        for name, weight in mixture.items():
            if name not in specs:
                raise ValueError(
                    f"data.mixtures.{task} names source {name!r}, which data.sources does not define"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
                raise ValueError(f"data.mixtures.{task}.{name} weight must be >= 0, got {weight!r}")

    if image_size is not None and not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if task_batch is not None:
        if unknown := sorted(set(task_batch) - set(TASKS)):
            raise ValueError(f"task_batch has unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        if not any(task_batch.values()):
            raise ValueError(f"task_batch {dict(task_batch)} has no task with a positive count")
        for task, count in task_batch.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"task_batch[{task!r}] must be an int >= 0, got {count!r}")
            if count % process_count:
                raise ValueError(
                    f"task_batch[{task!r}] = {count} is not divisible by process_count {process_count}"
                )
            if count and not any(w > 0 for w in data_cfg.mixtures.get(task, {}).values()):
                raise ValueError(
                    f"task {task!r} has {count} rows per step but no source in data.mixtures.{task}"
                )

    if tokenizer is not None:
        null_len = len(generation_prompt_ids(tokenizer, None, 10**9))
        if data_cfg.max_text_len < null_len + 1:
            raise ValueError(
                f"data.max_text_len {data_cfg.max_text_len} must exceed the null prompt ({null_len} tokens)"
            )
        fixed = understanding_fixed_len(tokenizer, data_cfg.image_tokens)
        if data_cfg.max_und_len < fixed + 2:
            raise ValueError(
                f"data.max_und_len {data_cfg.max_und_len} must exceed template + image_tokens ({fixed} tokens) by >= 2"
            )
    elif data_cfg.max_und_len <= data_cfg.image_tokens:
        raise ValueError(
            f"data.max_und_len {data_cfg.max_und_len} must exceed data.image_tokens {data_cfg.image_tokens}"
        )
