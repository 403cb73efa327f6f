"""Linear shape probe of a Harmon checkpoint's visual encoder (see eval/encoder_probe.py).

    python -m unified_mm.tools.encoder_probe --checkpoint runs/shapes_harmon
    python -m unified_mm.tools.encoder_probe --checkpoint runs/shapes_harmon --at-init
    python -m unified_mm.tools.encoder_probe --checkpoint runs/shapes_harmon --at-init --supervised

Fits per-shape count heads on the frozen MAR encoder's features of train-split shapes images and
scores them on held-out images. `--at-init` probes the same architecture freshly initialised
(config seed), the baseline that says how much training added. `--supervised` trains the encoder
and a linear head on the count labels themselves (from the checkpoint's or, with --at-init, the
initial weights): the control that says how fast this encoder learns shape when told it;
`--save-official DIR` then writes the whole model, trained encoder included, in the official
Harmon layout (`harmon_official.safetensors`), which a config's `init.harmon_checkpoint` loads
(configs/shapes_harmon_ablation.py's `init=`). Prints a summary line and the JSON
report (also written to --out).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from unified_mm.tools.cli import (
    add_checkpoint_args,
    emit_report,
    evaluation_image_size,
    load_checkpoint_of,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.encoder_probe",
        description="Linear shape-count probe of a Harmon checkpoint's MAR encoder.",
    )
    add_checkpoint_args(ap)
    ap.add_argument(
        "--at-init", action="store_true", help="probe the freshly initialised model instead"
    )
    ap.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    ap.add_argument(
        "--supervised", action="store_true", help="train the encoder on the labels (control)"
    )
    ap.add_argument(
        "--save-official",
        default=None,
        help="with --supervised: write the trained model in the official layout to this folder",
    )
    ap.add_argument("--num-train", type=int, default=None, help="train-split images")
    ap.add_argument("--num-test", type=int, default=None, help="held-out images")
    ap.add_argument("--steps", type=int, default=None, help="AdamW steps")
    ap.add_argument("--lr", type=float, default=None, help="(peak) learning rate")
    ap.add_argument("--seed", type=int, default=0, help="shapes data seed")
    ap.add_argument(
        "--attributes",
        nargs="+",
        default=["shape"],
        choices=("shape", "colour"),
        help="count objects per value of these (default: shape; 'shape colour' adds colours)",
    )
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    return ap


def run(args: argparse.Namespace) -> dict:
    from flax import nnx

    from unified_mm.eval import encoder_probe

    given = {
        "num_train": args.num_train,
        "num_test": args.num_test,
        "steps": args.steps,
        "lr": args.lr,
    }
    settings_type = (
        encoder_probe.SupervisedSettings if args.supervised else encoder_probe.ProbeSettings
    )
    settings = settings_type(
        seed=args.seed,
        attributes=tuple(args.attributes),
        **{k: v for k, v in given.items() if v is not None},
    )
    if args.save_official and not args.supervised:
        raise ValueError("--save-official needs --supervised (the linear probe trains no weights)")
    loaded = load_checkpoint_of(args, "harmon", "the encoder probe")
    size = int(args.image_size or evaluation_image_size(loaded))
    model = loaded.model
    if args.at_init:
        model = loaded.family.build_model(nnx.Rngs(int(loaded.config.seed)))
    if args.supervised:
        report = encoder_probe.supervised_shape_probe(
            model,
            size,
            settings,
            trainable=loaded.family.param_groups()["mar_encoder"],
            update_model=bool(args.save_official),
        )
    else:
        report = encoder_probe.shape_probe(model, size, settings)
    if args.save_official:
        import jax
        import numpy as np

        from unified_mm.tools.export import export_official_harmon

        os.makedirs(args.save_official, exist_ok=True)
        state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        report["saved"] = export_official_harmon(args.save_official, state, loaded.family.model_cfg)
    report.update(
        checkpoint=args.checkpoint,
        step=int(loaded.meta.get("step") or 0),
        weights="init" if args.at_init else ("ema" if loaded.used_ema else "params"),
        mode="supervised" if args.supervised else "linear",
    )

    def scores(name: str) -> str:
        r = report[name]
        return (
            f"count {r['count_accuracy']:.3f} presence {r['presence_accuracy']:.3f} "
            f"all-exact {r['all_exact']:.3f}"
        )

    print(
        f"shape probe ({report['mode']}, {report['weights']}, {size} px): held-out "
        f"{scores('probe')} | train split {scores('probe_train_split')} | majority "
        f"{scores('majority')}"
    )
    emit_report(report, args.out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
