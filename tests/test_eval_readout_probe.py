"""The LLM readout probe on oracle image tokens (eval/readout_probe.py, tools/readout_probe)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_inference_cli import REPO, smoke_config

from unified_mm.data.shapes_render import COLOURS, SHAPES, ObjectSpec
from unified_mm.eval import readout_probe as rp
from unified_mm.families.harmon import HarmonFamily
from unified_mm.tools import readout_probe as tool
from unified_mm.train.stages import stages_from_config

SMOKE = f"{REPO / 'configs' / 'shapes_harmon.py'}:smoke"


def test_cell_labels_mark_the_cell_of_each_object_centre():
    objects = (
        ObjectSpec("circle", "red", 0.2, 0.10, 0.10),  # cell (0, 0)
        ObjectSpec("star", "blue", 0.2, 0.90, 0.60),  # row 2, column 3
        ObjectSpec("square", "green", 0.2, 0.99, 0.99),  # the last cell (edges clamp)
        ObjectSpec("cross", "white", 0.2, 0.20, 0.05),  # also cell (0, 0): taken
    )
    shape, colour, collisions = rp.cell_labels(objects, 4)
    assert shape.shape == colour.shape == (16,)
    assert (shape[0], colour[0]) == (SHAPES.index("circle") + 1, COLOURS.index("red") + 1)
    assert (shape[2 * 4 + 3], colour[2 * 4 + 3]) == (
        SHAPES.index("star") + 1,
        COLOURS.index("blue") + 1,
    )
    assert shape[15] == SHAPES.index("square") + 1
    assert collisions == 1 and np.count_nonzero(shape) == 3 == np.count_nonzero(colour)


def test_oracle_rows_put_cells_first_and_buffers_last():
    width, cells, buffers = 4, 16, 2
    tokens = {
        "shape": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width),
        "colour": 100 * jnp.ones((2, width)),
        "cell": jnp.zeros((cells, width)).at[5].set(1000.0),
        "buffer": -jnp.ones((buffers, width)),
    }
    shape = jnp.zeros((1, cells), jnp.int32).at[0, 5].set(2)
    colour = jnp.zeros((1, cells), jnp.int32)
    rows = np.asarray(rp.oracle_rows(tokens, shape, colour))
    assert rows.shape == (1, cells + buffers, width)
    np.testing.assert_array_equal(rows[0, 5], np.arange(8, 12) + 100 + 1000)
    np.testing.assert_array_equal(rows[0, 0], np.arange(width) + 100)  # the 'none' rows
    np.testing.assert_array_equal(rows[0, cells:], -np.ones((buffers, width)))


def test_probe_learns_colour_from_oracle_tokens_on_the_smoke_config():
    config = smoke_config()
    family = HarmonFamily(config)
    stage = dataclasses.replace(stages_from_config(config)[1], steps=240, lr=3e-3)
    settings = rp.ReadoutSettings(
        steps=240,
        batch_size=32,
        num_train=1000,
        num_questions=100,
        eval_every=120,
        train_qtypes=("colour",),
    )
    report = rp.readout_probe(config, family, stage, settings)  # ~30 s on 2 CPU cores
    assert [p["step"] for p in report["curve"]] == [120, 240]
    assert report["grid"] == 4 and report["questions"] == 100
    first, last = report["curve"]
    assert last["loss"] < first["loss"]
    # 8 colours: chance is 1/8 (measured: 0.80). The colour sits in the named shape's token.
    assert last["colour"] > 0.5, report
    # Only colour questions were trained: the other types' answers are never produced.
    assert last["count"] == last["exist"] == 0.0
    assert set(last) >= {"overall", "colour", "count", "exist", "shape", "position"}


def test_command_line_writes_the_curve(tmp_path, capsys):
    out = tmp_path / "readout.json"
    argv = ["--config", SMOKE, "--steps", "2", "--eval-every", "1", "--questions", "10"]
    assert tool.main([*argv, "--num-train", "50", "--llm-depth", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [p["step"] for p in report["curve"]] == [1, 2]
    assert report["stage"] == "full" and report["llm_layers"] == 1 and report["questions"] == 10
    assert "step 2: loss" in capsys.readouterr().out


def test_bad_settings_and_arguments_are_refused_in_one_line(capsys):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        rp.ReadoutSettings(steps=0)
    with pytest.raises(ValueError, match="train_qtypes"):
        rp.ReadoutSettings(train_qtypes=("colour", "size"))
    for argv, message in (
        (["--config", SMOKE, "--stage", "nope"], "unknown stage 'nope'"),
        (["--config", SMOKE, "--llm-depth", "0"], "--llm-depth must be >= 1"),
        (["--config", "configs/missing.py"], "does not exist"),
        (["--config", f"{REPO / 'configs' / 'shapes_vqrae.py'}:smoke"], "needs a Harmon config"),
    ):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
