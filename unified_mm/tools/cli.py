"""What the command-line tools share: the checkpoint arguments and the one-line error exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """--checkpoint (work directory or export), --step, --no-ema."""
    ap.add_argument("--checkpoint", required=True, help="training work directory or export dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")


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
