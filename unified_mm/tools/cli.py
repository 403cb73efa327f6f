"""What the command-line tools share: the checkpoint arguments and the one-line error exit."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """--checkpoint (work directory or export), --step, --no-ema."""
    ap.add_argument("--checkpoint", required=True, help="training work directory or export dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")


_FAMILY_NAMES = {"harmon": "Harmon", "vqrae": "VQRAE"}


def load_checkpoint_of(args: argparse.Namespace, family: str, what: str):
    """The model behind --checkpoint / --step / --no-ema (a `train.load.LoadedModel`), refusing a
    missing path or another family's checkpoint in one line ("{what} needs a ... checkpoint")."""
    from unified_mm.train.load import load_model

    if not os.path.exists(args.checkpoint):
        raise ValueError(f"checkpoint path {args.checkpoint} does not exist")
    loaded = load_model(args.checkpoint, step=args.step, prefer_ema=not args.no_ema)
    if loaded.config.family != family:
        raise ValueError(
            f"{what} needs a {_FAMILY_NAMES.get(family, family)} checkpoint, "
            f"got family {loaded.config.family!r}"
        )
    return loaded


def evaluation_image_size(loaded) -> int:
    """The resolution a checkpoint is evaluated at: `eval.image_size`, else its stage's."""
    from unified_mm.eval.suite import checkpoint_stage, eval_image_size

    stage = checkpoint_stage(loaded.config, loaded.meta)
    return int(eval_image_size(loaded.config.get("eval"), stage.image_size))


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """Parses `argv` and runs; bad input ends with one `error: ...` line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def emit_report(report: dict, out: str | None) -> None:
    """Prints the JSON report and, with `out`, also writes it there (folders created)."""
    import json

    print(json.dumps(report, indent=1))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
