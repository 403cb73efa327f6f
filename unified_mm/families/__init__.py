"""Model families: the adapters that plug each model into the trainer (see train/family.py)."""

from __future__ import annotations

import ml_collections

from unified_mm.train.family import ModelFamily


def _harmon():
    from unified_mm.families.harmon import HarmonFamily

    return HarmonFamily


def _vqrae():
    from unified_mm.families.vqrae import VQRAEFamily

    return VQRAEFamily


# Imported lazily so a Harmon run never imports VQRAE code and vice versa.
FAMILIES = {"harmon": _harmon, "vqrae": _vqrae}


def build(config: ml_collections.ConfigDict) -> ModelFamily:
    name = config.family
    if name not in FAMILIES:
        raise ValueError(f"config.family {name!r} is unknown; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]()(config)
