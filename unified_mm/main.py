"""Train a unified multimodal model through its whole stage schedule.

    python -m unified_mm.main --config configs/shapes_harmon.py --workdir /tmp/run
    python -m unified_mm.main --config configs/harmon_1p5b.py --workdir gs://bucket/run \
        --distributed --config.stages.align.steps=1000

Restarting the same command resumes from the newest valid checkpoint in the work directory.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<exp>.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("UNIFIED_MM_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() first (TPU pods and multi-process runs).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 (local multi-process runs; TPU pods auto-detect)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (local runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (local runs).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Seconds without a heartbeat after which JAX's coordination service declares a process dead "
    "and stops the others (multi-process runs).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv) -> int:
    del argv
    _setup_logging()
    import jax

    if _DISTRIBUTED.value:
        kwargs = {"heartbeat_timeout_seconds": _HEARTBEAT.value}
        if _COORDINATOR.value:
            kwargs.update(
                coordinator_address=_COORDINATOR.value,
                num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value,
            )
        jax.distributed.initialize(**kwargs)
    from unified_mm.train.checkpoint import CheckpointError
    from unified_mm.train.train import main_entry

    try:
        return main_entry(_CONFIG.value, _WORKDIR.value)
    except (ValueError, CheckpointError) as e:  # bad config, input or checkpoints: one line
        logging.getLogger("unified_mm").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
