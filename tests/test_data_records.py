"""Record sources: conversion-tool round trip, bad records skipped and counted, TFDS source."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from unified_mm.data import records
from unified_mm.data.config import default_data_config
from unified_mm.data.pipeline import make_train_iterator
from unified_mm.data.records import BadRecord
from unified_mm.data.sources import ArrayRecordReader, source_config
from unified_mm.data.stats import BadDataError
from unified_mm.data.tokenizers import WordLevelTokenizer
from unified_mm.tools import images_to_arrayrecord

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tok():
    return WordLevelTokenizer.from_file()


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    img.save(buf, format=fmt)
    return buf.getvalue()


def _config(path: str, **fields):
    cfg = default_data_config()
    cfg.sources = {"mine": source_config("array_record", path=path)}
    cfg.mixtures = {t: {"mine": 1.0} for t in ("t2i", "i2t", "image")}
    cfg.threads = 0
    for k, v in fields.items():
        cfg[k] = v
    return cfg


def test_conversion_tool_round_trip(tmp_path, tok):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    pixels = {f"img{i}.png": RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(6)}
    for name, arr in pixels.items():
        (images / name).write_bytes(_encode(arr, "PNG"))
    (images / "sub" / "photo.jpg").write_bytes(_encode(pixels["img0.png"], "JPEG"))
    gray = RNG.integers(0, 255, (32, 32), dtype=np.uint8)
    (images / "gray.png").write_bytes(_encode(gray, "PNG"))
    rgba = np.dstack([pixels["img1.png"], np.full((32, 32), 255, np.uint8)])
    (images / "rgba.png").write_bytes(_encode(rgba, "PNG"))
    (images / "broken.png").write_bytes(_encode(pixels["img2.png"], "PNG")[:60])
    lines = [{"image": n, "caption": "a red circle"} for n in pixels]
    lines[1]["qa"] = [{"question": "What colour is the circle?", "answer": "red"}]
    lines += [
        {"image": "sub/photo.jpg", "caption": "two blue squares"},
        {"image": "gray.png", "qa": [{"question": "How many stars are there?", "answer": "two"}]},
        {"image": "rgba.png", "caption": "a white star"},
        {"image": "broken.png", "caption": "a red circle"},  # bad_image
        {"image": "missing.png", "caption": "a red circle"},  # missing_image
        {"image": "img0.png"},  # no_text
    ]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out" / "data.array_record"
    summary = images_to_arrayrecord.convert(str(images), str(jsonl), str(out))
    assert summary["written"] == 9 and summary["converted_to_png"] == 1
    assert summary["skipped"] == {"bad_image": 1, "missing_image": 1, "no_text": 1, "bad_line": 1}
    with pytest.raises(ValueError, match="captions.jsonl:10: cannot decode"):
        images_to_arrayrecord.convert(str(images), str(jsonl), str(tmp_path / "s.ar"), strict=True)

    reader = ArrayRecordReader([str(out)], max_pixels=1 << 20)
    samples = [reader.parse(reader[i], RNG) for i in range(len(reader))]
    for i, name in enumerate(pixels):
        np.testing.assert_array_equal(samples[i].image, pixels[name])  # PNG bytes kept losslessly
    assert samples[1].qa == (("What colour is the circle?", "red", ""),)
    jpeg = np.asarray(Image.open(images / "sub" / "photo.jpg").convert("RGB"))
    np.testing.assert_array_equal(samples[6].image, jpeg)  # JPEG stored byte for byte
    np.testing.assert_array_equal(samples[7].image, np.repeat(gray[..., None], 3, 2))
    assert samples[7].caption is None and samples[7].qa[0][1] == "two"
    np.testing.assert_array_equal(samples[8].image, pixels["img1.png"])  # RGBA (opaque) -> RGB

    # Through the pipeline: every record surfaces with its image and text.
    cfg = _config(str(out), null_prompt_prob=0.0)
    it = make_train_iterator(
        cfg, task_batch={"image": 9, "t2i": 2, "i2t": 2}, image_size=32, seed=0, tokenizer=tok
    )
    b = next(it)
    got = {
        tuple(np.rint((x + 1) * 127.5).astype(np.uint8)[:2, :2].ravel())
        for x in b["image"]["image"]
    }
    want = {tuple(s.image[:2, :2].ravel()) for s in samples}
    assert got == want  # one epoch of 9 = all 9 records
    for ids in b["t2i"]["input_ids"]:
        text = tok.decode(ids, skip_special_tokens=True)
        assert text.startswith("user\nGenerate an image: ")
        assert text.split(": ")[1].split("\n")[0] in {
            "a red circle",
            "two blue squares",
            "a white star",
        }
    # The caption-less record can only be skipped by t2i, and is counted as such.
    assert set(it.stats()["mine"]) - {"used", "skipped"} <= {"missing_caption"}

    # CLI, sharded; the source reads the shard set from the --out path, a glob or the directory.
    rc = images_to_arrayrecord.main(
        [
            "--images",
            str(images),
            "--jsonl",
            str(jsonl),
            "--out",
            str(tmp_path / "sh" / "d.array_record"),
            "--shards",
            "2",
        ]
    )
    assert rc == 0 and sorted(os.listdir(tmp_path / "sh")) == [
        "d.array_record-00000-of-00002",
        "d.array_record-00001-of-00002",
    ]
    for path in (tmp_path / "sh" / "d.array_record", tmp_path / "sh" / "*", tmp_path / "sh"):
        cfg = _config(str(path))
        it = make_train_iterator(cfg, task_batch={"image": 9}, image_size=32, seed=0, tokenizer=tok)
        assert next(it)["image"]["image"].shape == (9, 32, 32, 3)


def _bad_records() -> dict[str, bytes]:
    good = RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    png = _encode(good, "PNG")
    head = json.dumps({"image_format": "raw", "shape": [2, 2, 3], "caption": "X"}).encode()
    non_utf8 = head.replace(b'"X"', b'"\xff\xfe red"')
    big = _encode(np.zeros((300, 300, 3), np.uint8), "PNG")
    return {
        "decode_error": records.encode_record(
            png[: len(png) // 2], caption="a red circle", image_format="png"
        ),
        "missing_caption": records.encode_record(png, caption=None, image_format="png"),
        "bad_channels": records.encode_record(
            np.zeros((32, 32, 4), np.uint8), caption="a red circle"
        ),
        "empty_image": records.encode_record(
            np.zeros((0, 32, 3), np.uint8), caption="a red circle"
        ),
        "non_utf8_text": records.MAGIC + len(non_utf8).to_bytes(4, "little") + non_utf8 + bytes(12),
        "oversized_image": records.encode_record(big, caption="a red circle", image_format="png"),
        "malformed_record": b"\x00garbage record",
    }


@pytest.mark.parametrize("reason", list(_bad_records()))
def test_each_bad_record_has_its_reason(reason, tok):
    from unified_mm.data.sources import Sample
    from unified_mm.data.transforms import GenerationTransform, ImageTransform

    reader = ArrayRecordReader.__new__(ArrayRecordReader)
    reader.max_pixels = 200 * 200
    t2i = GenerationTransform(ImageTransform(32, "random"), tok, 32, 0.0)
    with pytest.raises(BadRecord) as err:
        sample = reader.parse(_bad_records()[reason], RNG)
        assert isinstance(sample, Sample)
        t2i(sample, RNG)
    assert err.value.reason == reason
    # RGBA PNGs and two-channel arrays are wrong channel counts too.
    with pytest.raises(BadRecord, match="bad_channels"):
        records.decode_image(_encode(np.zeros((8, 8, 4), np.uint8), "PNG"), 1 << 20)


def _write(path, raws):
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in raws:
        w.write(r)
    w.close()
    return str(path)


def _good(i: int) -> bytes:
    return records.encode_record(
        _encode(np.full((32, 32, 3), 100 + i, np.uint8), "PNG"),
        caption="a red circle",
        image_format="png",
    )


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    bad = _bad_records()
    raws = [_good(i) for i in range(14)] + list(bad.values())
    path = _write(tmp_path / "mixed.array_record", raws)
    cfg = _config(path, max_bad_fraction=1.0, max_image_pixels=200 * 200)
    it = make_train_iterator(cfg, task_batch={"t2i": 7}, image_size=32, seed=0, tokenizer=tok)
    rows = 0
    for _ in range(12):
        b = next(it)["t2i"]
        values = np.rint((b["image"][:, 0, 0, 0] + 1) * 127.5)
        assert ((values >= 100) & (values < 114)).all()  # only good records come out
        rows += len(values)
    stats = it.stats()["mine"]
    assert stats["used"] == rows == 84
    assert {r for r in bad} <= set(stats) and stats["skipped"] == sum(stats[r] for r in bad)
    assert stats["skipped"] > 0.2 * (rows + stats["skipped"])  # 7 of 21 records are bad
    # The counts survive a state round trip.
    it2 = make_train_iterator(cfg, task_batch={"t2i": 7}, image_size=32, seed=0, tokenizer=tok)
    it2.set_state(it.get_state())
    assert it2.stats() == it.stats()


def test_fully_corrupt_source_fails_fast(tmp_path, tok):
    path = _write(tmp_path / "junk.array_record", [b"junk %d" % i for i in range(50)])
    it = make_train_iterator(
        _config(path), task_batch={"t2i": 4}, image_size=32, seed=0, tokenizer=tok
    )
    with pytest.raises(
        BadDataError,
        match=r"data source 'mine' \(array_record .*junk.array_record\): 17 consecutive records failed .*malformed_record: 17",
    ):
        next(it)


def test_bad_fraction_stops_the_run(tmp_path, tok):
    raws = [_good(i) for i in range(10)] + [b"junk %d" % i for i in range(10)]
    path = _write(tmp_path / "half.array_record", raws)
    cfg = _config(path, max_bad_fraction=0.2, min_records_for_check=40)
    it = make_train_iterator(cfg, task_batch={"t2i": 8}, image_size=32, seed=0, tokenizer=tok)
    with pytest.raises(
        BadDataError,
        match=r"data source 'mine'.*failed \(\d+\.\d% > data.max_bad_fraction=0.2\); reasons: malformed_record",
    ):
        for _ in range(20):
            next(it)
    assert it.step <= 6  # stopped within the first steps


_TFDS_BUILDER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                image = np.full((24 + 8 * i, 40, 3), 20 * i + 10, np.uint8)
                yield i, {"image": image, "caption": ["a red circle", "two blue squares"][i % 2]}

    TinyCaptions(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
""")


def test_tfds_source(tmp_path, tok):
    """A TFDS dataset prepared as ArrayRecord (TensorFlow only in the preparing subprocess)."""
    script = tmp_path / "build.py"
    script.write_text(_TFDS_BUILDER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tfds")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = default_data_config()
    cfg.sources = {
        "tiny": source_config(
            "tfds", name="tiny_captions", split="train", data_dir=str(tmp_path / "tfds")
        )
    }
    cfg.mixtures = {"t2i": {"tiny": 1.0}}
    cfg.crop = "center"
    cfg.threads = 0
    it = make_train_iterator(cfg, task_batch={"t2i": 6}, image_size=32, seed=0, tokenizer=tok)
    b = next(it)["t2i"]
    values = sorted(int(v) for v in np.rint((b["image"][:, 16, 16, 0] + 1) * 127.5))
    assert values == [20 * i + 10 for i in range(6)]  # every record once, centre-cropped to 32
    for ids, v in zip(b["input_ids"], np.rint((b["image"][:, 16, 16, 0] + 1) * 127.5)):
        caption = ["a red circle", "two blue squares"][(int(v) - 10) // 20 % 2]
        assert f"Generate an image: {caption}<|im_end|>" in tok.decode(ids)
    assert it.stats() == {"tiny": {"used": 6, "skipped": 0}}
