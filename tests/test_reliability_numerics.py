"""Reliability 5: a NaN or Inf in the loss or the gradients never reaches a checkpoint.

The step is skipped (parameters, EMA and optimizer state unchanged) and counted; after
``max_consecutive_bad_steps`` consecutive bad steps the run stops with a message naming the step
and the offending loss term, also when that step is not a logging step.
"""

import numpy as np
import pytest
from reliability_helpers import checkpoint_listing, flat, raw_metric_rows, restore_items
from toy_family import toy_config

from unified_mm.train.train import main_entry, train_and_evaluate

ITEMS = ("params", "ema", "opt_state")


def _config(**faults):
    c = toy_config(steps=(4, 4))
    c.checkpoint.every_steps = 1
    c.checkpoint.keep_last = 20
    c.max_consecutive_bad_steps = 3
    for k, v in faults.items():
        c.faults[k] = v
    return c


def _all_finite(workdir) -> dict[int, dict]:
    """Every checkpoint's params, EMA and optimizer state; asserts they are all finite."""
    out = {}
    for step in checkpoint_listing(workdir)[0]:
        items = restore_items(workdir, step, ITEMS)
        for item in ITEMS:
            for k, v in flat(items[item]).items():
                if np.issubdtype(v.dtype, np.floating):
                    assert np.isfinite(v).all(), (step, item, k)
        out[step] = items
    return out


def _same(a: dict, b: dict, items=ITEMS) -> bool:
    return all(
        flat(a[i]).keys() == flat(b[i]).keys()
        and all(np.array_equal(x, y) for x, y in zip(flat(a[i]).values(), flat(b[i]).values()))
        for i in items
    )


def test_nan_loss_and_inf_gradients_are_skipped_and_counted(tmp_path):
    # 0-based step indices: the step that produces checkpoint/row k has index k - 1.
    config = _config(nan_loss_steps=(2,), inf_grad_steps=(5,))
    report = train_and_evaluate(config, str(tmp_path))
    assert report["global_step"] == 8  # isolated bad steps do not stop the run
    rows = {r["step"]: r for r in raw_metric_rows(str(tmp_path))}
    assert [s for s, r in rows.items() if r["finite"] == 0.0] == [3, 6]
    assert np.isnan(rows[3]["loss"]) and np.isfinite(rows[6]["loss"])
    assert np.isinf(rows[6]["grad_norm"])
    assert [rows[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert rows[4]["bad_steps"] == 0  # a good step resets the consecutive count
    ckpts = _all_finite(str(tmp_path))
    assert sorted(ckpts) == list(range(1, 9))
    # The skipped steps left params, EMA and optimizer state exactly as they were ...
    assert _same(ckpts[2], ckpts[3]) and _same(ckpts[5], ckpts[6])
    # ... while good steps changed them (in stage 2 both groups train).
    assert not _same(ckpts[6], ckpts[7])
    print(
        f"\nnumerical faults: NaN loss at step 3 and Inf gradients at step 6 skipped "
        f"(state bit-identical before/after), skipped_steps={rows[8]['skipped_steps']:.0f}, "
        f"{len(ckpts)} checkpoints all finite"
    )


@pytest.mark.parametrize(
    "faults, culprit",
    [
        ({"nan_input_steps": (3, 4, 5, 6)}, "loss, loss/t2i"),
        ({"inf_grad_steps": (3, 4, 5, 6)}, "none (non-finite gradients, grad_norm=inf)"),
    ],
)
def test_consecutive_bad_steps_stop_the_run(tmp_path, capsys, faults, culprit):
    config = _config(**faults)
    config.log_every_steps = 50  # the stop must not wait for a logging step
    # The command-line entry point: exit status 3 and one line naming the step and the term
    # (train_and_evaluate raises TrainingStopped with the same text).
    rc = main_entry(config, str(tmp_path))
    err_lines = capsys.readouterr().err.strip().splitlines()
    want = (
        "error: stopping at step 6: 3 consecutive non-finite steps (limit 3), each skipped; "
        f"offending loss term(s): {culprit}"
    )
    assert rc == 3 and err_lines == [want], err_lines
    ckpts = _all_finite(str(tmp_path))
    assert max(ckpts) <= 7, sorted(ckpts)  # stopped one step after the limit at most
    # Nothing bad was applied after step 3 (the optimizer state is new in stage 2: a fresh one).
    assert _same(ckpts[3], ckpts[max(ckpts)], ("params", "ema"))
    assert _same(ckpts[5], ckpts[max(ckpts)])
    print(f"\n{want}")
