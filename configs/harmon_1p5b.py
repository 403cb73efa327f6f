"""Harmon-1.5B (arXiv 2503.21979) with the official architecture and the paper's three stages.

Train on a TPU pod (see launch/tpu.sh) after pointing the data sources and tokenizer at real data:

    python -m unified_mm.main --config configs/harmon_1p5b.py --workdir gs://BUCKET/harmon_1p5b \
        --distributed --config.data.tokenizer.path=/path/to/Qwen2.5/tokenizer.json \
        --config.init.harmon_checkpoint=/path/to/harmon_1.5b.pth \
        --config.init.vae_checkpoint=/path/to/kl16.ckpt

    # the same stage table at reduced width on CPU (used by the tests):
    python -m unified_mm.main --config configs/harmon_1p5b.py:smoke --workdir /tmp/harmon_smoke

Arguments (``:key=value,...``): ``smoke``.
"""

from unified_mm.config.args import parse_arg
from unified_mm.config.harmon_paper import harmon_paper_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    return harmon_paper_config("1p5b", arg.smoke)
