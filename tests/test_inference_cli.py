"""CLI smoke tests: text-to-image, image-to-text and reconstruct on a tiny trained checkpoint.

The checkpoint comes from the real trainer (`trained_checkpoints.trained_harmon`: the smoke
Harmon config cut to its `full` stage, `TRAIN_STEPS` steps, EMA on, a cheap end-of-stage
evaluation), trained once per session under pytest's base temp: 57 s on two idle CPU cores,
73-85 s under load, nearly all of it compilation (the whole file: ~80 s idle, 100-115 s loaded).
`test_checkpoint_was_trained` asserts the weights really are trained (step > 0, the i2t loss
falls, weights change between checkpoints, EMA != params), so these tests cannot silently go back
to random weights.

The random-weight checkpoint helpers below (`make_tiny_checkpoint`, `random_params`,
`random_model`) are no longer used here; test_eval_suite.py, test_export.py and
test_eval_reconstruction.py import them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from trained_checkpoints import TRAIN_STEPS, TrainedRun, check_trained, trained_harmon

REPO = pathlib.Path(__file__).resolve().parents[1]
# The random-weight checkpoint of `make_tiny_checkpoint` (imported by other test files).
STEP = 4
EMA_OFFSET = 1e-3


def smoke_config():
    spec = importlib.util.spec_from_file_location(
        "shapes_harmon_cfg", REPO / "configs" / "shapes_harmon.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke")


def random_values(abstract: nnx.Module, seed: int = 0) -> dict:
    """Random values for every variable of an abstract model (the tree the trainer
    checkpoints), drawn with numpy (no per-op XLA compiles): norm scales 1, biases 0, everything
    else N(0, 0.02)."""
    pure = nnx.to_pure_dict(nnx.state(abstract))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, pure)


def random_model(build, seed: int = 0) -> nnx.Module:
    """`build()`'s model with `random_values` (built abstractly, then filled)."""
    abstract = nnx.eval_shape(build)
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, random_values(abstract, seed))
    graphdef = nnx.graphdef(abstract)
    return nnx.merge(graphdef, state)


def random_params(family, seed: int = 0) -> dict:
    return random_values(nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0))), seed)


def make_tiny_checkpoint(workdir: str, *, step: int = STEP, stage: str = "full") -> dict:
    """Saves a smoke-config Harmon as the trainer does; returns {"params", "ema"} pure dicts."""
    from unified_mm import families
    from unified_mm.train import checkpoint as ckpt

    config = smoke_config()
    family = families.build(config)
    params = random_params(family)
    ema = jax.tree.map(lambda x: x + np.float32(EMA_OFFSET), params)
    manager = ckpt.make_manager(
        os.path.join(workdir, "checkpoints"), save_every=1, keep_last=2, asynchronous=False
    )
    ckpt.save(
        manager,
        step,
        params=params,
        opt_state={"count": jnp.zeros((), jnp.int32)},
        ema=ema,
        train={"rng": jnp.zeros((2,), jnp.uint32), "skipped_steps": jnp.zeros((), jnp.int32)},
        data_state=None,
        meta={
            "stage": stage,
            "stage_index": 1,
            "stage_step": 2,
            "global_step": step,
            "family": "harmon",
            "config": config.to_json(),
        },
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return {"params": params, "ema": ema}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    return trained_harmon(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def workdir(trained) -> str:
    return trained.workdir


def test_checkpoint_was_trained(trained):
    measured = check_trained(trained)
    print(f"trained in {trained.train_seconds:.1f} s: {measured}")


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize(
    "module",
    [
        "unified_mm.tools.text_to_image",
        "unified_mm.tools.image_to_text",
        "unified_mm.tools.reconstruct",
        "unified_mm.tools.export",
        "unified_mm.tools.encoder_probe",
        "unified_mm.evaluate",
    ],
)
def test_help(module, capsys):
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "usage:" in out


# ------------------------------------------------------------------------------------------------
# text-to-image


def test_text_to_image_writes_pngs_and_metadata(workdir, tmp_path, capsys):
    from unified_mm.tools import text_to_image

    out = tmp_path / "t2i"
    argv = [
        "--checkpoint",
        workdir,
        "--prompt",
        "a red circle",
        "--prompt",
        "two blue squares",
        "--num-samples",
        "3",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    assert text_to_image.main(argv) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{p:05d}_{k:02d}.png" for p in range(2) for k in range(3)]
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8  # the "full" stage is 32 px
    meta = json.loads((out / "00001_02.json").read_text())
    assert meta["prompt"] == "two blue squares" and meta["sample"] == 2 and meta["seed"] == 5
    assert meta["step"] == TRAIN_STEPS and meta["ema"] is True
    assert {"num_iter", "cfg", "cfg_schedule", "temperature", "image_size"} <= set(meta)
    # same seed -> same images; samples of one prompt differ from each other
    out2 = tmp_path / "t2i_again"
    assert text_to_image.main(argv[:-1] + [str(out2)]) == 0
    again = np.asarray(Image.open(out2 / pngs[0].name))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, np.asarray(Image.open(pngs[1])))


def test_text_to_image_geneval_layout_from_jsonl(workdir, tmp_path):
    from unified_mm.data.shapes import geneval_prompts
    from unified_mm.eval.geneval import geneval_metadata, score_geneval_folder
    from unified_mm.tools import text_to_image

    specs = [geneval_prompts(1)[i] for i in (0, 3)]  # short: the first test's compiled shapes
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(geneval_metadata(s)) + "\n" for s in specs))
    out = tmp_path / "geneval"
    rc = text_to_image.main(
        [
            "--checkpoint",
            workdir,
            "--prompts",
            str(prompts),
            "--num-samples",
            "3",
            "--geneval-layout",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for i, s in enumerate(specs):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == geneval_metadata(s)
        assert sorted(p.name for p in (folder / "samples").glob("*.png")) == [
            "00000.png",
            "00001.png",
            "00002.png",
        ]
        assert (folder / "samples" / "00000.json").is_file()
    summary, results = score_geneval_folder(str(out))
    assert len(results) == 6 and 0.0 <= summary["overall"] <= 1.0


def test_text_to_image_bad_input(workdir, tmp_path, capsys):
    from unified_mm.tools import text_to_image

    out = str(tmp_path / "x")
    assert (
        text_to_image.main(
            ["--checkpoint", str(tmp_path / "nope"), "--prompt", "a red circle", "--out", out]
        )
        == 2
    )
    assert "does not exist" in _err(capsys)
    assert text_to_image.main(["--checkpoint", workdir, "--out", out]) == 2
    assert "no prompts" in _err(capsys)
    assert (
        text_to_image.main(["--checkpoint", workdir, "--prompt", "a purple dog", "--out", out]) == 2
    )
    err = _err(capsys)
    assert "vocabulary" in err and "dog" in err and "\n" not in err
    long = " and ".join(["a red circle"] * 12)
    assert text_to_image.main(["--checkpoint", workdir, "--prompt", long, "--out", out]) == 2
    assert "max_text_len" in _err(capsys)
    assert (
        text_to_image.main(
            [
                "--checkpoint",
                workdir,
                "--prompt",
                "a red circle",
                "--image-size",
                "36",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "stride" in _err(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "x"}')
    assert text_to_image.main(["--checkpoint", workdir, "--prompts", str(bad), "--out", out]) == 2
    assert "list" in _err(capsys)


# ------------------------------------------------------------------------------------------------
# image-to-text


def _write_image(path, colour=(220, 30, 30)) -> str:
    from unified_mm.data.shapes_render import ObjectSpec, render_objects

    img = render_objects([ObjectSpec("circle", "red", 0.5, 0.5, 0.5)], 48)
    Image.fromarray(img).save(path)
    return str(path)


def test_image_to_text_greedy_and_sampled(workdir, tmp_path, capsys):
    from unified_mm.tools import image_to_text

    a = _write_image(tmp_path / "a.png")
    b = _write_image(tmp_path / "b.png")
    out = tmp_path / "answers.jsonl"
    argv = [
        "--checkpoint",
        workdir,
        "--image",
        a,
        "--image",
        b,
        "--prompt",
        "What colour is the circle?",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
    ]
    assert image_to_text.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith(a + "\t")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == [a, b] and recs[0]["greedy"] is True
    assert recs[0]["answer"] == recs[1]["answer"]  # same image, greedy: same answer
    assert image_to_text.main(argv + ["--sample", "--top-k", "5", "--seed", "1"]) == 0
    sampled = [json.loads(line) for line in out.read_text().splitlines()]
    assert sampled[0]["greedy"] is False and sampled[0]["seed"] == 1


def test_image_to_text_bad_input(workdir, tmp_path, capsys):
    from unified_mm.tools import image_to_text

    assert image_to_text.main(["--checkpoint", workdir, "--image", str(tmp_path / "none.png")]) == 2
    assert "does not exist" in _err(capsys)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    assert image_to_text.main(["--checkpoint", workdir, "--image", str(junk)]) == 2
    assert "not an image" in _err(capsys)


# ------------------------------------------------------------------------------------------------
# encoder probe


def test_encoder_probe_on_trained_and_initial_weights(workdir, tmp_path, capsys):
    from unified_mm.tools import encoder_probe

    small = ["--num-train", "48", "--num-test", "24", "--steps", "20"]
    out = tmp_path / "probe.json"
    assert encoder_probe.main(["--checkpoint", workdir, *small, "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("shape probe (linear, ema, 32 px): held-out count ")
    assert "| train split count " in line and "| majority count " in line
    report = json.loads(out.read_text())
    assert report["weights"] == "ema" and report["step"] == TRAIN_STEPS
    assert report["settings"]["num_train"] == 48
    assert encoder_probe.main(["--checkpoint", workdir, *small, "--at-init", "--no-ema"]) == 0
    assert capsys.readouterr().out.startswith("shape probe (linear, init, 32 px)")
    supervised = [*small, "--supervised", "--attributes", "shape", "colour", "--out", str(out)]
    assert encoder_probe.main(["--checkpoint", workdir, *supervised]) == 0
    assert capsys.readouterr().out.startswith("shape probe (supervised, ema, 32 px)")
    report = json.loads(out.read_text())
    assert report["mode"] == "supervised" and report["settings"]["steps"] == 20
    assert report["settings"]["attributes"] == ["shape", "colour"]
    assert report["settings"]["batch_size"] == 32  # the supervised defaults fill what is not given
    saved = tmp_path / "official"
    argv = [*small, "--supervised", "--at-init", "--save-official", str(saved)]
    assert encoder_probe.main(["--checkpoint", workdir, *argv]) == 0
    capsys.readouterr()
    from unified_mm.models.harmon import convert

    official = convert.load_torch_file(saved / "harmon_official.safetensors")
    assert any(k.startswith("mar.encoder_blocks.") for k in official)


def test_encoder_probe_bad_input(workdir, tmp_path, capsys):
    from unified_mm.tools import encoder_probe

    assert encoder_probe.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in _err(capsys)
    assert encoder_probe.main(["--checkpoint", workdir, "--num-train", "0"]) == 2
    assert "num_train must be >= 1" in _err(capsys)
    assert encoder_probe.main(["--checkpoint", workdir, "--save-official", str(tmp_path)]) == 2
    assert "--save-official needs --supervised" in _err(capsys)


# ------------------------------------------------------------------------------------------------
# reconstruct (VQRAE)


def test_reconstruct_refuses_harmon(workdir, tmp_path, capsys):
    from unified_mm.tools import reconstruct

    img = _write_image(tmp_path / "a.png")
    assert reconstruct.main(["--checkpoint", workdir, "--image", img, "--out", str(tmp_path)]) == 2
    assert "needs a VQRAE checkpoint" in _err(capsys)
