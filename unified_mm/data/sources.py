"""Data sources: a typed registry from `data.sources.<name>` config entries to random-access readers.

Kinds (`SOURCE_KINDS`): "shapes" (procedural, shapes.py), "tfds" (any TFDS dataset prepared
as ArrayRecord, read with `tfds.data_source`, no TensorFlow needed), "array_record" (files
written by `python -m unified_mm.tools.images_to_arrayrecord`, records.py format).

A reader is picklable (Grain workers receive it), has `__len__`, `__getitem__(i) -> raw record`
(cheap where possible) and `parse(raw, rng) -> Sample` (decode and check; raises BadRecord).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from unified_mm.data import records, shapes
from unified_mm.data.records import BadRecord


@dataclasses.dataclass(frozen=True)
class Sample:
    """A decoded record: RGB uint8 [H, W, 3]; qa holds (question, answer, qtype) triples."""

    image: np.ndarray
    caption: str | None
    qa: tuple[tuple[str, str, str], ...] = ()


# ----------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class ShapesSourceSpec:
    """The embedded shapes dataset, rendered directly at the pipeline's image size."""

    kind: ClassVar[str] = "shapes"
    split: str = "train"
    antialias: int = 1
    # Six weights in shapes.CATEGORIES order; empty means uniform.
    category_weights: tuple[float, ...] = ()

    def validate(self, *, check_files: bool = True) -> None:
        del check_files
        if self.split not in shapes.SPLITS:
            raise ValueError(
                f"shapes split {self.split!r} is unknown; known: {', '.join(shapes.SPLITS)}"
            )
        if self.antialias < 1:
            raise ValueError(f"shapes antialias must be >= 1, got {self.antialias}")
        if self.category_weights:
            shapes.check_category_weights(self.category_weights)

    def describe(self) -> str:
        return f"shapes split={self.split}"

    def open(self, *, image_size: int, max_pixels: int, seed: int) -> ShapesReader:
        del max_pixels
        return ShapesReader(
            shapes.ShapesDataset(
                self.split,
                seed=seed,
                image_size=image_size,
                antialias=self.antialias,
                category_weights=self.category_weights or None,
            )
        )


class ShapesReader:
    def __init__(self, dataset: shapes.ShapesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        return int(index)  # rendering happens in parse, in the worker thread

    def parse(self, raw: int, rng: np.random.Generator) -> Sample:
        del rng
        ex = self.dataset[raw]
        return Sample(ex.image, ex.caption, ex.qa)


# ------------------------------------------------------------------------------------- tfds


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    """Feature at a '/'-separated path in a TFDS example (nested FeaturesDict); None if absent."""
    value: Any = example
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _nested(key: str, leaf: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split("/")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = leaf
    return out


@dataclasses.dataclass(frozen=True)
class TfdsSourceSpec:
    """A TFDS dataset prepared with file_format="array_record"; feature names come from here."""

    kind: ClassVar[str] = "tfds"
    name: str = ""
    split: str = "train"
    data_dir: str = ""
    image_key: str = "image"
    caption_key: str = "caption"
    # Optional understanding pairs (e.g. VQA); a sequence feature gives one pair per example.
    question_key: str = ""
    answer_key: str = ""

    def validate(self, *, check_files: bool = True) -> None:
        if not self.name:
            raise ValueError("tfds source needs a dataset name (data.sources.<name>.name)")
        if check_files:
            root = os.path.expanduser(
                self.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            )
            base = self.name.split(":")[0].split("/")[0]
            if not os.path.isdir(os.path.join(root, base)):
                raise ValueError(f"tfds dataset {self.name!r} is not prepared under {root}")

    def describe(self) -> str:
        return f"tfds {self.name} split={self.split}"

    def open(self, *, image_size: int, max_pixels: int, seed: int) -> TfdsReader:
        del image_size, seed
        return TfdsReader(self, max_pixels)


class TfdsReader:
    def __init__(self, spec: TfdsSourceSpec, max_pixels: int):
        import tensorflow_datasets as tfds

        self.spec = spec
        self.max_pixels = max_pixels
        # Keep the encoded bytes: we check the size before decoding and count failures.
        decoders = _nested(spec.image_key, tfds.decode.SkipDecoding())
        try:
            self._source = tfds.data_source(
                spec.name,
                split=spec.split,
                data_dir=spec.data_dir or None,
                download=False,
                decoders=decoders,
            )
        except Exception as e:
            raise ValueError(
                f"cannot open tfds source {spec.name!r} split {spec.split!r}: {e}"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        return self._source[index]

    def parse(self, raw: Any, rng: np.random.Generator) -> Sample:
        if not isinstance(raw, Mapping):
            raise BadRecord("malformed_record", f"tfds example is {type(raw).__name__}")
        image = _lookup(raw, self.spec.image_key)
        if image is None:
            raise BadRecord("malformed_record", f"no feature {self.spec.image_key!r}")
        if isinstance(image, bytes | np.bytes_):
            pixels = records.decode_image(bytes(image), self.max_pixels)
        else:
            pixels = records.check_pixels(np.asarray(image), self.max_pixels)
        caption = _pick_text(_lookup(raw, self.spec.caption_key), rng)
        qa: tuple[tuple[str, str, str], ...] = ()
        if self.spec.question_key and self.spec.answer_key:
            qs = _lookup(raw, self.spec.question_key)
            ans = _lookup(raw, self.spec.answer_key)
            if qs is not None and ans is not None:
                qs_l, ans_l = _as_list(qs), _as_list(ans)
                if len(qs_l) != len(ans_l):
                    raise BadRecord("malformed_record", "question and answer counts differ")
                pairs = [
                    (records.text_field(q), records.text_field(a)) for q, a in zip(qs_l, ans_l)
                ]
                qa = tuple((q, a, "") for q, a in pairs if q and a)
        return Sample(pixels, caption, qa)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return list(value)
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _pick_text(value: Any, rng: np.random.Generator) -> str | None:
    """A caption from a scalar or a sequence feature (several captions per image)."""
    if value is None:
        return None
    items = _as_list(value)
    if not items:
        return None
    return records.text_field(items[int(rng.random() * len(items))])


# ----------------------------------------------------------------------------- array_record


def resolve_array_record_paths(path: str) -> list[str]:
    """A file, a directory (every *.array_record* file in it) or a glob pattern; sorted."""
    path = os.path.expanduser(path)
    if any(ch in path for ch in "*?["):
        found = glob.glob(path)
    elif os.path.isdir(path):
        found = glob.glob(os.path.join(path, "*.array_record*"))
    elif os.path.isfile(path):
        found = [path]
    else:
        # `--shards N` writes path-00000-of-0000N.
        found = glob.glob(glob.escape(path) + "-*-of-*")
    return sorted(p for p in found if os.path.isfile(p))


@dataclasses.dataclass(frozen=True)
class ArrayRecordSourceSpec:
    """ArrayRecord files in the records.py format (written by tools/images_to_arrayrecord.py)."""

    kind: ClassVar[str] = "array_record"
    path: str = ""

    def validate(self, *, check_files: bool = True) -> None:
        if not self.path:
            raise ValueError("array_record source needs a path (data.sources.<name>.path)")
        if check_files and not resolve_array_record_paths(self.path):
            raise ValueError(f"array_record path {self.path!r} matches no file")

    def describe(self) -> str:
        return f"array_record {self.path}"

    def open(self, *, image_size: int, max_pixels: int, seed: int) -> ArrayRecordReader:
        del image_size, seed
        return ArrayRecordReader(resolve_array_record_paths(self.path), max_pixels)


class ArrayRecordReader:
    def __init__(self, paths: list[str], max_pixels: int):
        import grain

        if not paths:
            raise ValueError("array_record source has no files")
        self.paths = paths
        self.max_pixels = max_pixels
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self._source[index]

    def parse(self, raw: bytes, rng: np.random.Generator) -> Sample:
        del rng
        header, payload = records.decode_record(raw)
        pixels = records.raw_image(header, payload, self.max_pixels)
        caption = header.get("caption")
        caption = (caption.strip() or None) if isinstance(caption, str) else None
        qa = tuple((q, a, "") for q, a in header["qa"])
        return Sample(pixels, caption, qa)


# --------------------------------------------------------------------------------- registry

SourceSpec = ShapesSourceSpec | TfdsSourceSpec | ArrayRecordSourceSpec
SOURCE_KINDS: dict[str, type] = {
    cls.kind: cls for cls in (ShapesSourceSpec, TfdsSourceSpec, ArrayRecordSourceSpec)
}
# Fields every source entry may carry besides its kind's own.
COMMON_SOURCE_FIELDS = ("kind",)


def source_spec(name: str, cfg: Mapping[str, Any] | Any) -> SourceSpec:
    """The typed spec of config entry `data.sources.<name>`; one-line ValueError if invalid."""
    entry = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    kind = entry.pop("kind", None)
    if kind not in SOURCE_KINDS:
        raise ValueError(
            f"data.sources.{name}: unknown source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}"
        )
    cls = SOURCE_KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise ValueError(
            f"data.sources.{name}: unknown field(s) {unknown} for kind {kind!r}; "
            f"known: {', '.join(sorted(fields))}"
        )
    values = {}
    for key, value in entry.items():
        default = fields[key].default
        if isinstance(default, tuple):
            value = tuple(float(v) for v in value)
        elif isinstance(default, bool | int | str) and not isinstance(value, type(default)):
            raise ValueError(
                f"data.sources.{name}.{key} must be {type(default).__name__}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def source_config(kind: str, **fields: Any) -> dict[str, Any]:
    """A plain-dict config entry with every field of `kind` at its default, then `fields`."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}")
    entry: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(SOURCE_KINDS[kind]):
        entry[f.name] = f.default
    unknown = sorted(set(fields) - set(entry))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for source kind {kind!r}")
    entry.update(fields)
    return entry
