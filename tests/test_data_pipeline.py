"""Grain pipeline: batch contract, determinism, resume, per-process sharding, workers, config."""

import io
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from unified_mm.data import records
from unified_mm.data.config import (
    default_data_config,
    question_weights_of,
    validate_data_config,
    with_overrides,
)
from unified_mm.data.pipeline import make_eval_examples, make_train_iterator
from unified_mm.data.sources import source_config
from unified_mm.data.tokenizers import WordLevelTokenizer

CAPTIONS = ["a red circle", "two blue squares", "a green star above a white cross", "three stars"]


@pytest.fixture(scope="module")
def tok():
    return WordLevelTokenizer.from_file()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_id_records(path, n: int) -> str:
    """n records whose 32 px image has the constant value 5 * id + 10 (the id is recoverable)."""
    w = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(n):
        w.write(
            records.encode_record(_png(5 * i + 10), caption=CAPTIONS[i % 4], image_format="png")
        )
    w.close()
    return str(path)


def ids_of(images: np.ndarray) -> list[int]:
    values = np.rint((images[:, 0, 0, 0] + 1) * 127.5).astype(int)
    return [(v - 10) // 5 for v in values]


def id_config(path, **overrides):
    cfg = default_data_config()
    cfg.sources.ids = source_config("array_record", path=path)
    for task in ("t2i", "i2t", "image"):
        cfg.mixtures[task] = {"ids": 1.0}
    cfg.threads = 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_batch_contract(tok):
    cfg = default_data_config()
    cfg.image_tokens = 20
    cfg.max_und_len = 64
    it = make_train_iterator(
        cfg,
        task_batch={"t2i": 6, "i2t": 4, "image": 2},
        image_size=32,
        seed=0,
        process_index=1,
        process_count=2,
        tokenizer=tok,
    )
    b = next(it)
    assert set(b) == {"t2i", "i2t", "image"}
    assert set(b["t2i"]) == {"image", "input_ids", "attention_mask"}
    assert set(b["i2t"]) == {"image", "input_ids", "attention_mask", "labels"}
    assert set(b["image"]) == {"image"}
    assert b["t2i"]["image"].shape == (3, 32, 32, 3) and b["t2i"]["image"].dtype == np.float32
    assert (
        b["t2i"]["input_ids"].shape == (3, cfg.max_text_len)
        and b["t2i"]["input_ids"].dtype == np.int32
    )
    assert b["i2t"]["labels"].shape == (2, 64) and b["image"]["image"].shape == (1, 32, 32, 3)
    for task in b.values():
        assert -1.0 <= task["image"].min() and task["image"].max() <= 1.0
    assert ((b["i2t"]["input_ids"] == tok.image_token_id).sum(1) == 20).all()
    assert it.stats() == {"shapes": {"used": 6, "skipped": 0}}
    it.close()
    # Tasks with 0 rows are absent.
    it = make_train_iterator(
        cfg, task_batch={"t2i": 2, "i2t": 0}, image_size=32, seed=0, tokenizer=tok
    )
    assert set(next(it)) == {"t2i"}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for task in x:
            for key in x[task]:
                np.testing.assert_array_equal(x[task][key], y[task][key])


def test_determinism_threads_and_seed(tok):
    cfg = default_data_config()
    kw = dict(task_batch={"t2i": 4, "i2t": 2}, image_size=32, tokenizer=tok)
    cfg.threads = 0
    a = _take(make_train_iterator(cfg, seed=1, **kw), 3)
    cfg.threads = 3
    b = _take(make_train_iterator(cfg, seed=1, **kw), 3)
    _assert_same(a, b)
    c = next(make_train_iterator(cfg, seed=2, **kw))
    assert not np.array_equal(a[0]["t2i"]["image"], c["t2i"]["image"])


def test_resume_mid_epoch_exact(tmp_path, tok):
    import orbax.checkpoint as ocp

    path = write_id_records(tmp_path / "ids.array_record", 10)
    cfg = id_config(path)
    kw = dict(task_batch={"image": 4, "t2i": 2}, image_size=32, seed=3, tokenizer=tok)
    it = make_train_iterator(cfg, **kw)
    _take(it, 2)  # 8 of 10 image records: mid-epoch
    state = it.get_state()
    assert state["step"] == 2
    following = _take(it, 4)  # crosses into the next epoch
    # Same run restored from the state (also with threads), and through Orbax JSON.
    cfg.threads = 2
    it2 = make_train_iterator(cfg, **kw)
    next(it2)  # consumed batches before restore do not matter
    it2.set_state(state)
    _assert_same(following, _take(it2, 4))
    assert it2.stats()["ids"]["used"] == it.stats()["ids"]["used"]
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(state)))
    mngr.wait_until_finished()
    restored = mngr.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    mngr.close()
    it3 = make_train_iterator(cfg, **kw)
    it3.set_state(restored)
    _assert_same(following, _take(it3, 4))
    # Epochs are complete permutations: the 10 first image rows hold all 10 records... minus the
    # 2 of step 2 that belong to the next epoch; every epoch order differs.
    it4 = make_train_iterator(cfg, **kw)
    rows = [r for b in _take(it4, 5) for r in ids_of(b["image"]["image"])]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert rows[:10] != rows[10:20]
    with pytest.raises(ValueError, match="not a data iterator state"):
        it4.set_state({"step": 3})


def test_processes_shard_the_global_batch(tmp_path, tok):
    path = write_id_records(tmp_path / "ids.array_record", 40)
    cfg = id_config(path)
    kw = dict(task_batch={"image": 8}, image_size=32, seed=5, tokenizer=tok)
    single = [ids_of(b["image"]["image"]) for b in _take(make_train_iterator(cfg, **kw), 5)]
    per_proc = [
        [
            ids_of(b["image"]["image"])
            for b in _take(make_train_iterator(cfg, process_index=p, process_count=2, **kw), 5)
        ]
        for p in range(2)
    ]
    seen = []
    for step in range(5):
        p0, p1 = per_proc[0][step], per_proc[1][step]
        assert len(p0) == len(p1) == 4 and not set(p0) & set(p1)
        # Concatenated in process order they are exactly the single-process global batch.
        assert p0 + p1 == single[step]
        seen += p0 + p1
    assert sorted(seen) == list(range(40))  # one epoch, every record exactly once
    with pytest.raises(ValueError, match="not divisible by process_count"):
        make_train_iterator(
            cfg, task_batch={"image": 6}, image_size=32, seed=0, process_count=4, tokenizer=tok
        )
    with pytest.raises(ValueError, match="process_index 2 is outside"):
        make_train_iterator(cfg, process_index=2, process_count=2, **kw)


def test_worker_processes_give_the_same_batches(tok):
    cfg = default_data_config()
    kw = dict(task_batch={"t2i": 4, "i2t": 2}, image_size=32, seed=4, tokenizer=tok)
    cfg.threads = 0
    ref = _take(make_train_iterator(cfg, **kw), 4)
    cfg.workers = 2
    t = time.time()
    it = make_train_iterator(cfg, **kw)
    try:
        got = _take(it, 4)
        state = it.get_state()
    finally:
        it.close()
    print(f"2 grain workers: first 4 batches in {time.time() - t:.1f} s")
    _assert_same(ref, got)
    assert state["step"] == 4 and it.stats()["shapes"]["used"] == 24


def test_mixture_weights(tmp_path, tok):
    cfg = id_config(write_id_records(tmp_path / "ids.array_record", 10))
    cfg.mixtures.image = {"ids": 1.0, "shapes": 3.0}
    it = make_train_iterator(cfg, task_batch={"image": 64}, image_size=32, seed=0, tokenizer=tok)
    _take(it, 16)  # 1024 positions = one mixing block: the proportions are exact
    stats = it.stats()
    assert (stats["shapes"]["used"], stats["ids"]["used"]) == (768, 256)


def test_config_validation_errors(tmp_path, tok):
    def check(mutate, match, **kw):
        cfg = default_data_config()
        mutate(cfg)
        with pytest.raises(ValueError, match=match):
            validate_data_config(cfg, tokenizer=tok, **kw)

    validate_data_config(default_data_config(), task_batch={"t2i": 4}, image_size=64, tokenizer=tok)
    check(
        lambda c: c.sources.__setitem__("x", {"kind": "webdataset"}),
        "unknown source kind 'webdataset'",
    )
    check(
        lambda c: c.sources.__setitem__(
            "x", source_config("array_record", path=str(tmp_path / "nope"))
        ),
        "matches no file",
    )
    check(
        lambda c: c.sources.__setitem__("x", {"kind": "array_record", "pth": "a"}),
        r"unknown field\(s\) \['pth'\]",
    )
    check(
        lambda c: c.sources.__setitem__(
            "x", source_config("tfds", name="coco", data_dir=str(tmp_path))
        ),
        "is not prepared",
    )
    check(
        lambda c: c.mixtures.t2i.__setitem__("missing", 1.0), "which data.sources does not define"
    )
    check(lambda c: c.mixtures.__setitem__("vqa", {"shapes": 1.0}), "unknown task")
    check(
        lambda c: None, "not divisible by process_count 2", task_batch={"t2i": 3}, process_count=2
    )
    check(lambda c: None, "outside 32..512", image_size=16)
    check(lambda c: None, "outside 32..512", image_size=1024)
    check(lambda c: None, "no task with a positive count", task_batch={"t2i": 0})
    check(lambda c: None, "unknown task", task_batch={"vqa": 2})
    check(lambda c: c.__setitem__("null_prompt_prob", 1.5), "null_prompt_prob = 1.5 is outside")
    check(lambda c: c.__setitem__("crop", "zoom"), "crop = 'zoom' is unknown")
    check(lambda c: c.__setitem__("max_text_len", 5), "must exceed the null prompt")
    check(lambda c: c.__setitem__("max_und_len", 60), "must exceed template")
    check(lambda c: c.tokenizer.__setitem__("kind", "spm"), "tokenizer.kind 'spm' is unknown")
    check(lambda c: c.tokenizer.__setitem__("kind", "hf"), "must point to a tokenizer.json")
    check(lambda c: c.sources.shapes.__setitem__("split", "val"), "shapes split 'val' is unknown")
    check(
        lambda c: c.question_weights.__setitem__("count", 0.0),
        "data.question_weights.count must be a number > 0",
    )
    cfg = default_data_config()
    cfg.mixtures.t2i = {}
    with pytest.raises(ValueError, match="no source in data.mixtures.t2i"):
        validate_data_config(cfg, task_batch={"t2i": 2})
    # Per-stage overrides: nested, new source names allowed, typos not.
    over = with_overrides(
        default_data_config(),
        {
            "max_text_len": 40,
            "sources": {"extra": source_config("shapes", split="heldout")},
            "mixtures": {"t2i": {"extra": 1.0}},
            "question_weights": {"count": 3.0},
        },
    )
    assert question_weights_of(over) == (("count", 3.0),)
    assert (
        over.max_text_len == 40
        and dict(over.mixtures.t2i) == {"extra": 1.0}
        and "shapes" in over.sources
    )
    with pytest.raises(ValueError, match="data.max_txt_len: unknown field"):
        with_overrides(default_data_config(), {"max_txt_len": 40})
    with pytest.raises(ValueError, match="data config has unknown field"):
        cfg = default_data_config()
        cfg.extra_field = 1
        validate_data_config(cfg)


def test_eval_examples(tok):
    cfg = default_data_config()
    ev = make_eval_examples(cfg, num=6, image_size=32, tokenizer=tok)
    ev2 = make_eval_examples(cfg, num=6, image_size=32, tokenizer=tok)
    np.testing.assert_array_equal(ev.i2t_input_ids, ev2.i2t_input_ids)
    assert ev.image.shape == (6, 32, 32, 3) and ev.t2i_input_ids.shape == (6, cfg.max_text_len)
    assert ev.null_input_ids.shape == (cfg.max_text_len,) and ev.i2t_input_ids.shape == (
        6,
        cfg.max_und_len,
    )
    for i, ex in enumerate(ev.examples):
        assert ex.prompt.category and (ev.questions[i], ev.answers[i], ev.qtypes[i]) in ex.qa
        n = ev.i2t_prompt_len[i]
        assert int(ev.i2t_attention_mask[i].sum()) == n
        assert tok.decode(ev.i2t_input_ids[i, :n]).endswith(
            ev.questions[i] + "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert ex.caption in tok.decode(ev.t2i_input_ids[i])
