#!/usr/bin/env bash
# Cloud TPU launcher (see launch/tpu.py for every action and flag):
#   bash launch/tpu.sh run --name NAME --zone ZONE --topology v5p-64 \
#       --config configs/harmon_1p5b.py --workdir gs://BUCKET/run [--dry-run] [-- trainer flags]
exec python3 "$(dirname "${BASH_SOURCE[0]}")/tpu.py" "$@"
