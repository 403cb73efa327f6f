"""Params-only export of a checkpoint (EMA weights when present) for inference and evaluation.

    python -m unified_mm.tools.export --checkpoint runs/shapes_harmon --out exports/shapes
    python -m unified_mm.tools.export --checkpoint runs/x --step 1800 --out exp \
        --format orbax,safetensors,official --no-ema

Writes into --out:
  params/                    Orbax StandardCheckpointer of the pure params dict
  model_card.json            config (JSON string under "config", loadable by train/load.py), family,
                             stage, step, EMA or not, data description, the last evaluation metrics
                             found in <workdir>/eval/*.json, files written
  model.safetensors          flattened params, keys joined with "." (this project's naming)
  harmon_official.pth        Harmon only: the official wusize/Harmon state_dict (llm.*, mar.*,
                             proj_in.*, proj_out.*), the layout the import reads (needs torch)
  vae_official.pth           Harmon with the KL-16 VAE: {"model": VAE state_dict} (kl16.ckpt layout)
  *_official.safetensors     the same two dicts as safetensors (no torch needed)

Load the export with `unified_mm.train.load.load_model(out)`, or the official files with
`unified_mm.models.harmon.convert.load_official` / the official scripts.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

FORMATS = ("orbax", "safetensors", "official")
CARD_NAME = "model_card.json"


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested pure dict -> {"a.b.c": array} (numpy, contiguous)."""
    out: dict[str, np.ndarray] = {}
    for k, v in params.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, name))
        else:
            out[name] = np.ascontiguousarray(np.asarray(jax.device_get(v)))
    return out


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    """Inverse of `flatten_params` (digit-only components become int keys, as NNX lists)."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def last_evaluation(workdir: str, max_step: int | None = None) -> dict:
    """The newest `<workdir>/eval/*.json` report (by its "step", at most max_step), or {}."""
    best: tuple[int, dict] | None = None
    for path in glob.glob(os.path.join(workdir, "eval", "*.json")):
        try:
            with open(path) as f:
                rep = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rep, dict):
            continue
        m = re.search(r"_step(\d+)\.json$", path)
        step = rep.get("step", int(m.group(1)) if m else None)
        if step is None or (max_step is not None and int(step) > max_step):
            continue
        if best is None or int(step) > best[0]:
            best = (int(step), dict(rep, source=os.path.relpath(path, workdir)))
    return best[1] if best else {}


def _summary_metrics(report: Mapping) -> dict:
    """The headline numbers of an evaluation report (the card keeps it small)."""
    keep = (
        "step",
        "stage",
        "image_size",
        "detector_accuracy",
        "geneval",
        "vqa",
        "fid",
        "reconstruction",
        "psnr",
        "ssim",
        "codebook_utilisation",
        "code_perplexity",
        "source",
    )
    return {k: report[k] for k in keep if k in report}


def data_description(config) -> dict:
    data = config.get("data", None)
    if data is None:
        return {}
    d = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    return {
        k: d[k]
        for k in ("sources", "mixtures", "max_text_len", "max_und_len", "tokenizer")
        if k in d
    }


def save_params_checkpoint(out_dir: str, params: Mapping) -> str:
    """Orbax StandardCheckpointer of the pure params dict at <out_dir>/params."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(out_dir), "params")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, jax.tree.map(np.asarray, dict(params)))
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def write_model_card(out_dir: str, card: Mapping) -> str:
    path = os.path.join(out_dir, CARD_NAME)
    with open(path, "w") as f:
        json.dump(card, f, indent=1)
    return path


def _save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def _save_torch(path: str, tensors: Mapping[str, np.ndarray], wrap_model: bool) -> bool:
    try:
        import torch
    except ImportError:
        return False
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()}
    torch.save({"model": sd} if wrap_model else sd, path)
    return True


def export_official_harmon(out_dir: str, params: Mapping, model_cfg) -> dict[str, str]:
    """Official-layout files of a Harmon model; returns {kind: path} of what was written."""
    from unified_mm.models.harmon.convert import official_from_harmon_params

    harmon_sd, vae_sd = official_from_harmon_params(params, model_cfg)
    files = {}
    meta = {"format": "wusize/Harmon state_dict", "exporter": "unified_mm"}
    path = os.path.join(out_dir, "harmon_official.safetensors")
    _save_safetensors(path, harmon_sd, meta)
    files["harmon_official.safetensors"] = path
    if vae_sd:
        path = os.path.join(out_dir, "vae_official.safetensors")
        _save_safetensors(path, vae_sd, {"format": "kl16.ckpt['model'] state_dict"})
        files["vae_official.safetensors"] = path
    pth = os.path.join(out_dir, "harmon_official.pth")
    if _save_torch(pth, harmon_sd, wrap_model=False):
        files["harmon_official.pth"] = pth
        if vae_sd:
            vpth = os.path.join(out_dir, "vae_official.pth")
            _save_torch(vpth, vae_sd, wrap_model=True)
            files["vae_official.pth"] = vpth
    else:
        print(
            "note: torch is not installed; wrote the official layout as .safetensors only "
            "(pip install -e '.[convert]' for .pth files)"
        )
    return files


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"unknown export format(s) {unknown or text!r}; known: {', '.join(FORMATS)}"
        )
    return formats


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    *,
    step: int | None = None,
    formats: Sequence[str] = FORMATS,
    prefer_ema: bool = True,
    overwrite: bool = False,
) -> dict:
    """Exports `checkpoint` (work directory or export) to `out_dir`; returns the model card."""
    from flax import nnx

    from unified_mm.train.load import load_model

    if not os.path.exists(checkpoint):
        raise ValueError(f"checkpoint path {checkpoint} does not exist")
    formats = tuple(formats)
    if os.path.abspath(out_dir) == os.path.abspath(checkpoint):
        raise ValueError("--out must differ from --checkpoint")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"output directory {out_dir} is not empty (pass --overwrite)")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    loaded = load_model(checkpoint, step=step, prefer_ema=prefer_ema)
    # Every model variable (Params and frozen buffers such as the SimVQ codebook): the tree the
    # trainer checkpoints and `load_model` restores; no optimizer state.
    nested = jax.tree.map(
        lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(nnx.state(loaded.model))
    )
    params = flatten_params(nested)
    ckpt_step = int(loaded.meta.get("step") or 0)
    if os.path.isfile(os.path.join(checkpoint, CARD_NAME)):
        metrics = dict(loaded.meta.get("metrics", {}))  # re-export keeps the card's metrics
    else:
        metrics = _summary_metrics(last_evaluation(checkpoint, ckpt_step))
    files: dict[str, str] = {}
    if "orbax" in formats:
        files["params"] = save_params_checkpoint(out_dir, nested)
    if "safetensors" in formats:
        path = os.path.join(out_dir, "model.safetensors")
        _save_safetensors(path, params, {"format": "unified_mm", "family": loaded.config.family})
        files["model.safetensors"] = path
    if "official" in formats:
        if loaded.config.family != "harmon":
            raise ValueError(
                f"the official key layout exists for the Harmon family only, not {loaded.config.family!r}"
            )
        files.update(export_official_harmon(out_dir, nested, loaded.family.model_cfg))
    card = {
        "config": loaded.config.to_json(),
        "family": loaded.config.family,
        "stage": loaded.meta.get("stage"),
        "step": ckpt_step,
        "global_step": ckpt_step,
        "ema": bool(loaded.used_ema),
        "source": os.path.abspath(checkpoint),
        "data": data_description(loaded.config),
        "metrics": metrics,
        "parameters": int(sum(v.size for v in params.values())),
        "files": {k: os.path.relpath(v, out_dir) for k, v in files.items()},
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_model_card(out_dir, card)
    return card


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unified_mm.tools.export",
        description="Params-only export (EMA when present): Orbax + model card, safetensors, "
        "and the official wusize/Harmon key layout.",
    )
    ap.add_argument("--checkpoint", required=True, help="training work directory or export dir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument(
        "--format", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}"
    )
    ap.add_argument("--no-ema", action="store_true", help="export the raw params, not the EMA")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        card = export_checkpoint(
            args.checkpoint,
            args.out,
            step=args.step,
            formats=parse_formats(args.format),
            prefer_ema=not args.no_ema,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {card['family']} step {card['step']} ({'EMA' if card['ema'] else 'raw'} params, "
        f"{card['parameters'] / 1e6:.2f}M) to {args.out}: {', '.join(card['files'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
