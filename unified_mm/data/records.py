"""The image-text record: one format for the ArrayRecord writer tool and the pipeline's reader,
plus the checked image decoding every source goes through.

Record layout (bytes)::

    b"UMR1" | uint32 little-endian header length N | N bytes of UTF-8 JSON header | image payload

Header: {"caption": str | null, "qa": [[question, answer], ...], "image_format": "png" | "jpeg" |
"webp" | "raw", "shape": [h, w, c] (raw only), "meta": {...} (free, e.g. the source file)}.
The payload is the encoded image file, or for "raw" the uint8 pixels in C order.

Every failure is a `BadRecord` carrying one of `REASONS`; the pipeline skips the record, counts
it per source and reason, and stops when too many fail (pipeline.py).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"UMR1"
_HEADER_LEN = struct.Struct("<I")
ENCODED_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
IMAGE_FORMATS: tuple[str, ...] = (*ENCODED_FORMATS, "raw")

# Fixed order: the per-batch accounting arrays are indexed by it.
REASONS: tuple[str, ...] = (
    "read_error",  # the source raised while reading the record
    "malformed_record",  # bad magic / header / field types
    "non_utf8_text",  # caption or question-answer bytes are not UTF-8
    "missing_caption",  # the task needs text the record lacks
    "decode_error",  # the image bytes do not decode (truncated, not an image)
    "empty_image",  # zero-size image or empty payload
    "bad_channels",  # not RGB or grayscale
    "oversized_image",  # more pixels than data.max_image_pixels
    "transform_error",  # anything else raised while building the example
)
# PIL modes accepted and converted to RGB; everything else (RGBA, LA, CMYK, I;16...) is a wrong
# channel count. Grayscale is accepted because it is common in web data and unambiguous.
_ACCEPTED_MODES = frozenset({"RGB", "L", "P"})


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _qa_pairs(qa: Any) -> list[list[str]]:
    out = []
    for item in qa or ():
        if isinstance(item, dict):
            q, a = item.get("question"), item.get("answer")
        elif isinstance(item, list | tuple) and len(item) == 2:
            q, a = item
        else:
            raise ValueError(f"question-answer item {item!r} is neither a dict nor a pair")
        if not isinstance(q, str) or not isinstance(a, str) or not q or not a:
            raise ValueError(f"question-answer item {item!r} needs non-empty strings")
        out.append([q, a])
    return out


def encode_record(
    image: bytes | np.ndarray,
    *,
    caption: str | None,
    qa: Sequence[Any] = (),
    image_format: str | None = None,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """Serialises one record. `image` is encoded file bytes (give `image_format`) or a uint8
    HWC array (stored raw). Tests build malformed records with it on purpose, so the only
    validation here is of types."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"raw images must be uint8, got {image.dtype}")
        header: dict[str, Any] = {"image_format": "raw", "shape": list(image.shape)}
        payload = np.ascontiguousarray(image).tobytes()
    else:
        if image_format not in ENCODED_FORMATS:
            raise ValueError(f"image_format must be one of {ENCODED_FORMATS}, got {image_format!r}")
        header = {"image_format": image_format}
        payload = bytes(image)
    header["caption"] = caption
    header["qa"] = _qa_pairs(qa)
    if meta:
        header["meta"] = meta
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload


def decode_record(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a record; raises BadRecord."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise BadRecord("malformed_record", f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) < 8 or raw[:4] != MAGIC:
        raise BadRecord("malformed_record", "bad magic (not written by images_to_arrayrecord?)")
    (n,) = _HEADER_LEN.unpack_from(raw, 4)
    if 8 + n > len(raw):
        raise BadRecord("malformed_record", f"header length {n} exceeds the record")
    try:
        text = raw[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("non_utf8_text", str(e)) from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("malformed_record", f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadRecord("malformed_record", "header is not a JSON object")
    caption = header.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadRecord("malformed_record", "caption is not a string")
    try:
        header["qa"] = _qa_pairs(header.get("qa"))
    except ValueError as e:
        raise BadRecord("malformed_record", str(e)) from None
    if header.get("image_format") not in IMAGE_FORMATS:
        raise BadRecord("malformed_record", f"unknown image_format {header.get('image_format')!r}")
    return header, raw[8 + n :]


def text_field(value: Any) -> str | None:
    """A caption/question from any source: str, UTF-8 bytes, numpy scalar; None if absent."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise BadRecord("malformed_record", f"text field has shape {value.shape}")
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("non_utf8_text", str(e)) from None
    if not isinstance(value, str):
        raise BadRecord("malformed_record", f"text field is {type(value).__name__}")
    value = value.strip()
    return value or None


def check_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """Validates a decoded array and returns it as uint8 [H, W, 3]."""
    if not isinstance(image, np.ndarray):
        raise BadRecord("malformed_record", f"image is {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise BadRecord("bad_channels", f"image has shape {image.shape}")
    h, w, c = image.shape
    if h == 0 or w == 0:
        raise BadRecord("empty_image", f"image has shape {image.shape}")
    if h * w > max_pixels:
        raise BadRecord("oversized_image", f"{w}x{h} exceeds {max_pixels} pixels")
    if c == 1:
        image = np.repeat(image, 3, axis=2)
    elif c != 3:
        raise BadRecord("bad_channels", f"image has {c} channels")
    if image.dtype != np.uint8:
        raise BadRecord("malformed_record", f"image dtype {image.dtype} is not uint8")
    return image


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3]; size is checked before the pixels are decoded."""
    from PIL import Image

    if not data:
        raise BadRecord("empty_image", "empty image payload")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as e:
        raise BadRecord("oversized_image", str(e)) from None
    except Exception as e:  # PIL raises many types for bad headers
        raise BadRecord("decode_error", f"{type(e).__name__}: {e}") from None
    if w == 0 or h == 0:
        raise BadRecord("empty_image", f"image is {w}x{h}")
    if w * h > max_pixels:
        raise BadRecord("oversized_image", f"{w}x{h} exceeds {max_pixels} pixels")
    if img.mode not in _ACCEPTED_MODES:
        raise BadRecord("bad_channels", f"image mode {img.mode} ({len(img.getbands())} channels)")
    try:
        img.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES stays False)
        if img.mode == "P" and "transparency" in img.info:
            raise BadRecord("bad_channels", "palette image with transparency")
        arr = np.asarray(img.convert("RGB"))
    except BadRecord:
        raise
    except Exception as e:
        raise BadRecord("decode_error", f"{type(e).__name__}: {e}") from None
    return check_pixels(arr, max_pixels)


def raw_image(header: dict[str, Any], payload: bytes, max_pixels: int) -> np.ndarray:
    """The pixels of a record, whatever its image_format."""
    if header["image_format"] != "raw":
        return decode_image(payload, max_pixels)
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or not 2 <= len(shape) <= 3
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise BadRecord("malformed_record", f"raw image shape {shape!r}")
    if int(np.prod(shape)) != len(payload):
        if len(payload) == 0:
            raise BadRecord("empty_image", "empty image payload")
        raise BadRecord("decode_error", f"raw payload has {len(payload)} bytes for shape {shape}")
    return check_pixels(np.frombuffer(payload, np.uint8).reshape(shape), max_pixels)
