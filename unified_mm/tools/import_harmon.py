"""Import the official Harmon checkpoints into this project's checkpoint format.

    python -m unified_mm.tools.import_harmon --config configs/harmon_1p5b.py \
        --harmon harmon_1.5b.pth --vae kl16.ckpt --workdir runs/harmon_1p5b_ft

writes ``<workdir>/checkpoints/0`` exactly as the trainer does (params, train counters, meta with
the config), so ``python -m unified_mm.main --config configs/harmon_1p5b.py --workdir
runs/harmon_1p5b_ft`` fine-tunes the released model, and the inference tools and
``unified_mm.evaluate`` read it with ``--checkpoint runs/harmon_1p5b_ft``. ``--llm`` takes Qwen2.5
safetensors instead of a full Harmon file (the MAR side then stays randomly initialised).
Pickle files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_HARMON = flags.DEFINE_string("harmon", "", "Official Harmon state_dict (.pth / .safetensors).")
_VAE = flags.DEFINE_string("vae", "", "kl16.ckpt (ckpt['model']) or its .safetensors.")
_LLM = flags.DEFINE_string("llm", "", "Qwen2.5 safetensors file or directory (LLM only).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory to create.")
flags.mark_flags_as_required(["config", "workdir"])


def import_checkpoint(
    config, workdir: str, *, harmon: str = "", vae: str = "", llm: str = ""
) -> int:
    """Writes step 0 of ``workdir`` from the official files; returns the number of leaves set."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from unified_mm import families
    from unified_mm.parallel.mesh import build_mesh
    from unified_mm.parallel.sharding import rules_from_config
    from unified_mm.train import checkpoint as ckpt
    from unified_mm.train.init import init_params, model_layout, overlay_params

    if not (harmon or llm or vae):
        raise ValueError("give at least one of --harmon, --vae, --llm")
    for path in (harmon, vae, llm):
        if path and not os.path.exists(path):
            raise ValueError(f"{path}: no such file or directory")
    if config.family != "harmon":
        raise ValueError(f"config family is {config.family!r}; this tool imports Harmon weights")
    directory = os.path.join(workdir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"{directory} already holds checkpoints; use a fresh work directory")
    with config.unlocked():
        config.init.harmon_checkpoint = harmon
        config.init.vae_checkpoint = vae
        config.init.llm_safetensors = llm
    family = families.build(config)
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    layout = model_layout(family, mesh, rules)
    pretrained = family.pretrained_params()
    covered = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.State(pretrained))}
    needed = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(layout.abstract_params)}
    if needed <= covered:  # everything comes from the files: skip the (slow) random init
        params = jax.tree.map(
            lambda a, s: jax.device_put(jnp.zeros(a.shape, a.dtype), s),
            layout.abstract_params,
            layout.param_shardings,
        )
    else:
        params = init_params(family, layout, mesh, rules, config.seed)
    params = overlay_params(params, pretrained, layout.param_shardings)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train = {
        "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed + 1)), rep),
        "skipped_steps": jax.device_put(jnp.zeros((), jnp.int32), rep),
    }
    manager = ckpt.make_manager(directory, save_every=1, keep_last=1, asynchronous=False)
    items = dict(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(
            {
                "stage": config.stage_order[0],
                "stage_index": 0,
                "stage_step": 0,
                "global_step": 0,
                "family": config.family,
                "config": config.to_json(),
                "imported_from": {"harmon": harmon, "vae": vae, "llm": llm},
            }
        ),
    )
    if float(config.ema.decay) > 0:
        items["ema"] = ocp.args.StandardSave(nnx.to_pure_dict(params))
    manager.save(0, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()
    return len(jax.tree.leaves(pretrained))


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    try:
        n = import_checkpoint(
            _CONFIG.value, _WORKDIR.value, harmon=_HARMON.value, vae=_VAE.value, llm=_LLM.value
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {n} arrays into {_WORKDIR.value}/checkpoints/0")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
