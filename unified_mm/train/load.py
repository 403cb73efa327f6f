"""Loading a trained model for inference, evaluation and export.

Accepts a training work directory (newest checkpoint, or ``step``) or an exported params
checkpoint (``tools/export.py``), rebuilds the family from the config stored with it and returns a
ready NNX model (EMA weights when the checkpoint has them and ``prefer_ema``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from unified_mm import families
from unified_mm.train.family import ModelFamily


@dataclasses.dataclass
class LoadedModel:
    config: ml_collections.ConfigDict
    family: ModelFamily
    model: nnx.Module
    meta: dict
    used_ema: bool


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def _abstract_params(family: ModelFamily):
    abstract = nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params
    )
    return graphdef, params, nnx.to_pure_dict(target)


def _resolve(path: str, step: int | None) -> tuple[str, int | None, bool]:
    """(checkpoint root, step or None, is_training_workdir)."""
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
        return ckpt_dir, step, True
    if os.path.isdir(os.path.join(path, "params")) and os.path.exists(
        os.path.join(path, "model_card.json")
    ):
        return path, None, False
    raise ValueError(
        f"{path} is neither a training work directory (with checkpoints/) nor an exported "
        "checkpoint (with params/ and model_card.json)"
    )


def load_model(path: str, *, step: int | None = None, prefer_ema: bool = True) -> LoadedModel:
    root, step, is_workdir = _resolve(path, step)
    if is_workdir:
        manager = ocp.CheckpointManager(root)
        try:
            steps = manager.all_steps()
            if not steps:
                raise ValueError(f"{root} holds no checkpoint")
            step = max(steps) if step is None else step
            if step not in steps:
                raise ValueError(f"checkpoint step {step} not in {sorted(steps)}")
            meta = dict(
                manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            )
            config = config_from_json(meta["config"])
            family = families.build(config)
            graphdef, abstract, target = _abstract_params(family)
            has_ema = os.path.isdir(os.path.join(root, str(step), "ema"))
            item = "ema" if (prefer_ema and has_ema) else "params"
            restored = manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
            )[item]
        finally:
            manager.close()
    else:
        with open(os.path.join(root, "model_card.json")) as f:
            meta = json.load(f)
        config = config_from_json(meta["config"])
        family = families.build(config)
        graphdef, abstract, target = _abstract_params(family)
        item = "params"
        restored = ocp.StandardCheckpointer().restore(os.path.join(root, "params"), target)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    meta = dict(meta, step=meta.get("global_step", step))
    return LoadedModel(config, family, model, meta, used_ema=item == "ema")
