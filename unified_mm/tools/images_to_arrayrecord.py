"""Convert a folder of images plus a JSONL of captions / question-answer pairs into ArrayRecord.

    python -m unified_mm.tools.images_to_arrayrecord --images DIR --jsonl captions.jsonl \\
        --out OUT/data.array_record [--shards N]

Each JSONL line: {"image": "relative/path.jpg", "caption": "...",
                  "qa": [{"question": "...", "answer": "..."}]}   (caption or qa, or both)

Records use the format of unified_mm.data.records (read by the "array_record" source kind).
JPEG, PNG and WebP files in RGB or grayscale are stored byte for byte; other images (RGBA,
palette, CMYK, BMP, TIFF, ...) are converted to RGB (alpha composited on white) and stored as
PNG. Lines whose image is missing or unreadable, or that carry no text, are skipped, counted and
reported; --strict turns the first such line into an error. With --shards N > 1 the files are
OUT-00000-of-0000N ... (the source path OUT, a directory or a glob reads them all).

Point a config at the result with:
    data.sources.mine = sources.source_config("array_record", path="OUT/data.array_record")
    data.mixtures.t2i.mine = 1.0
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

_STORE_AS_IS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _prepare_image(path: str) -> tuple[bytes, str, bool]:
    """(bytes, format, converted) for one image file; raises _Skip("bad_image") if unusable."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise _Skip("bad_image", f"cannot decode: {type(e).__name__}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise _Skip("bad_image", "zero-size image")
    fmt = _STORE_AS_IS.get(img.format or "")
    if fmt and img.mode in ("RGB", "L"):
        return data, fmt, False
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png", True


def _shard_paths(out: str, shards: int) -> list[str]:
    if shards == 1:
        return [out]
    return [f"{out}-{i:05d}-of-{shards:05d}" for i in range(shards)]


def _line_to_record(line: str, images_dir: str) -> tuple[bytes, bool]:
    """(record, converted) for one JSONL line; raises _Skip(reason, message)."""
    from unified_mm.data import records

    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Skip("bad_line", f"not JSON: {e}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise _Skip("bad_line", 'needs an "image" path string')
    caption = entry.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise _Skip("bad_line", "caption is not a string")
    caption = caption.strip() if caption else None
    qa = entry.get("qa") or []
    if not caption and not qa:
        raise _Skip("no_text", "no caption and no qa")
    image_path = os.path.join(images_dir, entry["image"])
    if not os.path.isfile(image_path):
        raise _Skip("missing_image", f"image {entry['image']} not found")
    data, fmt, converted = _prepare_image(image_path)
    try:
        record = records.encode_record(
            data, caption=caption, qa=qa, image_format=fmt, meta={"file": entry["image"]}
        )
    except ValueError as e:  # malformed qa items
        raise _Skip("bad_line", str(e)) from None
    return record, converted


def convert(
    images_dir: str,
    jsonl_path: str,
    out: str,
    *,
    shards: int = 1,
    strict: bool = False,
) -> dict[str, Any]:
    """Writes the ArrayRecord file(s); returns a summary with counts per skip reason."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    if not os.path.isdir(images_dir):
        raise ValueError(f"--images {images_dir} is not a directory")
    if not os.path.isfile(jsonl_path):
        raise ValueError(f"--jsonl {jsonl_path} does not exist")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = _shard_paths(out, shards)
    # group_size:1 keeps random access cheap (one record per chunk group).
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    skipped: collections.Counter[str] = collections.Counter()
    written = converted = 0
    try:
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record, was_converted = _line_to_record(line, images_dir)
                except _Skip as e:
                    if strict:
                        raise ValueError(f"{jsonl_path}:{lineno}: {e}") from None
                    skipped[e.reason] += 1
                    continue
                writers[written % shards].write(record)
                written += 1
                converted += was_converted
    finally:
        for w in writers:
            w.close()
    return {
        "written": written,
        "converted_to_png": converted,
        "skipped": dict(skipped),
        "files": paths,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.images_to_arrayrecord",
        description="Convert a folder of images plus a JSONL of captions / QA into ArrayRecord "
        "files for the 'array_record' data source.",
    )
    parser.add_argument(
        "--images", required=True, help="folder the JSONL image paths are relative to"
    )
    parser.add_argument(
        "--jsonl",
        required=True,
        help='one JSON object per line: {"image": path, "caption": str, "qa": [{"question", "answer"}]}',
    )
    parser.add_argument("--out", required=True, help="output file, e.g. OUT/data.array_record")
    parser.add_argument("--shards", type=int, default=1, help="number of output files (default 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unusable line")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.images, args.jsonl, args.out, shards=args.shards, strict=args.strict)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    print(
        f"wrote {summary['written']} records to {len(summary['files'])} file(s) "
        f"({summary['converted_to_png']} converted to PNG); skipped: {skipped}"
    )
    return 0 if summary["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
