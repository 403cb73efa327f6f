#!/usr/bin/env bash
# The main job (README command 1): trains the default CPU config (a small Harmon on the embedded
# shapes data) through all three stages, then evaluates. Outputs land in the work directory:
# checkpoints/, TensorBoard events, samples/, eval/ and report.json.
#   bash launch/main.sh [WORKDIR] [extra flags for unified_mm.main]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
WORKDIR="${1:-runs/shapes_harmon}"
shift || true
exec python -m unified_mm.main --config configs/shapes_harmon.py --workdir "$WORKDIR" "$@"
