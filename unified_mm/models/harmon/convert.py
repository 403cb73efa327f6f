"""Official Harmon / MAR / KL-16 checkpoints <-> our parameters (pure dicts), both directions.

Official layout (harmon_mar.md 2.8): one Harmon state_dict with keys `llm.*`, `mar.*`,
`proj_in.*`, `proj_out.*` (the `.pth` files, `HarmonDev.state_dict()` drops `vae.*`) and the VAE
state_dict of `kl16.ckpt["model"]`. Our layout is `nnx.to_pure_dict(nnx.state(harmon, nnx.Param))`:
top-level `vae`, `mar`, `llm`, `proj_in`, `proj_out`.

Rules: Linear kernel = W.T; Conv OIHW -> HWIO; LayerNorm / GroupNorm weight -> scale; stacked
layers (`encoder_blocks`, `decoder_blocks`, `diffloss.net.res_blocks`) get one torch key per layer;
`fake_latent` [1, D], `mask_token` [1, 1, D] and positional embeddings [1, N, D] lose their unit
axes. qkv rows keep the (3, heads, head_dim) order and the DiffLoss output its [eps | v] order, so
they copy as is. `llm.*` goes through `qwen2_convert` with prefix "llm.model." and the tied head
"llm.lm_head.weight". The float32 round trip official -> ours -> official is bit-exact.
"""

from __future__ import annotations

import functools
import pathlib
import pickle
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.harmon.harmon import Harmon, HarmonConfig
from unified_mm.models.llm import qwen2_convert

LLM_PREFIX = "llm.model."
LM_HEAD_KEY = "llm.lm_head.weight"
_STACKS = ("encoder_blocks", "decoder_blocks", "res_blocks")
# Sub-paths whose names differ from the torch module tree (nn.Sequential indices).
_RENAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("time_embed", "linear_1"), ("time_embed", "mlp", "0")),
    (("time_embed", "linear_2"), ("time_embed", "mlp", "2")),
    (("mlp_in",), ("mlp", "0")),
    (("mlp_out",), ("mlp", "2")),
    (("adaLN_modulation",), ("adaLN_modulation", "1")),
    (("proj_in", "linear_1"), ("proj_in", "0")),
    (("proj_in", "linear_2"), ("proj_in", "2")),
    (("proj_out", "linear_1"), ("proj_out", "0")),
    (("proj_out", "linear_2"), ("proj_out", "2")),
)
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Parameters stored without the torch unit axes: our shape (D,) / (N, D) -> torch shape.
_UNIT_AXES = {
    "fake_latent": lambda s: (1, *s),
    "mask_token": lambda s: (1, 1, *s),
    "encoder_pos_embed_learned": lambda s: (1, *s),
    "decoder_pos_embed_learned": lambda s: (1, *s),
    "diffusion_pos_embed_learned": lambda s: (1, *s),
}


# ----------------------------------------------------------------------------------------------
# Reading files


def load_torch_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A checkpoint as {name: float32-or-native numpy array}.

    `.pth` / `.pt` / `.ckpt` are read with `torch.load(map_location="cpu", weights_only=True)`
    (a file that needs arbitrary unpickling is refused); `ckpt["model"]` is unwrapped (kl16.ckpt).
    `.safetensors` files are read without torch.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint file does not exist: {path}")
    if path.suffix == ".safetensors":
        return qwen2_convert.load_hf_safetensors(path)
    if path.suffix not in (".pth", ".pt", ".ckpt", ".bin"):
        raise ValueError(f"unsupported checkpoint suffix {path.suffix!r} in {path}")
    try:
        import torch
    except ImportError as e:  # the converter lives in the 'convert' extra
        raise ValueError("reading .pth/.ckpt files needs torch: pip install -e '.[convert]'") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it needs arbitrary unpickling (weights_only=True failed: "
            f"{str(e).splitlines()[0]})"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach()
        if v.dtype == torch.bfloat16:
            v = v.float()  # numpy has no bfloat16; the widening is exact
        out[str(k)] = v.numpy().copy()
    return out


# ----------------------------------------------------------------------------------------------
# Path mapping


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    flat: dict[tuple, object] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _rename(path: tuple[str, ...]) -> tuple[str, ...]:
    out = list(path)
    for src, dst in _RENAMES:
        n = len(src)
        i = 0
        while i + n <= len(out):
            if tuple(out[i : i + n]) == src:
                out[i : i + n] = list(dst)
                i += len(dst)
            else:
                i += 1
    return tuple(out)


def _torch_name(path: tuple) -> tuple[str, str | None]:
    """(torch key with '{i}' for a stacked layer index, stack name or None)."""
    parts = [str(p) for p in path[:-1]]
    leaf = str(path[-1])
    stack = next((s for s in _STACKS if s in parts), None)
    if stack is not None:
        parts.insert(parts.index(stack) + 1, "{i}")
    parts = list(_rename(tuple(parts)))
    return ".".join([*parts, _LEAF.get(leaf, leaf)]), stack


def _to_torch(ours: np.ndarray, path: tuple) -> np.ndarray:
    leaf = str(path[-1])
    if leaf == "kernel":
        return np.ascontiguousarray(ours.transpose(3, 2, 0, 1) if ours.ndim == 4 else ours.T)
    if leaf in _UNIT_AXES:
        return ours.reshape(_UNIT_AXES[leaf](ours.shape))
    return ours


def _from_torch(w: np.ndarray, path: tuple, our_shape: tuple) -> np.ndarray:
    leaf = str(path[-1])
    if leaf == "kernel":
        w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    return np.ascontiguousarray(np.asarray(w, np.float32).reshape(our_shape))


def _expected_torch_shape(path: tuple, our_shape: tuple) -> tuple:
    leaf = str(path[-1])
    if leaf == "kernel":
        return (
            (our_shape[3], our_shape[2], our_shape[0], our_shape[1])
            if len(our_shape) == 4
            else tuple(reversed(our_shape))
        )
    if leaf in _UNIT_AXES:
        return _UNIT_AXES[leaf](our_shape)
    return tuple(our_shape)


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: HarmonConfig) -> dict:
    """Pure dict of ShapeDtypeStructs of a Harmon model built from `cfg` (nothing allocated)."""
    model = nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _entries(tree: Mapping, top: str):
    """(our path, torch key template, stack name, our per-layer shape) for one sub-tree."""
    for path, leaf in _flatten(tree[top]).items():
        name, stack = _torch_name((top, *path) if top != "vae" else path)
        shape = tuple(leaf.shape[1:]) if stack else tuple(leaf.shape)
        yield (top, *path), name, stack, shape, (leaf.shape[0] if stack else 0)


# ----------------------------------------------------------------------------------------------
# official -> ours


class _Report:
    """Collects every problem so that one ValueError names them all."""

    def __init__(self):
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.bad: list[str] = []
        self.other: list[str] = []

    def raise_if_any(self, what: str) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing keys {self.missing}")
        if self.unexpected:
            problems.append(f"unexpected keys {self.unexpected}")
        if self.bad:
            problems.append(f"wrong shapes {self.bad}")
        problems += self.other
        if problems:
            raise ValueError(f"{what} does not match the config: " + "; ".join(problems))


def _import_subtree(
    abstract: Mapping, top: str, src: Mapping, report: _Report, label: str = ""
) -> tuple[dict, set[str]]:
    """Our arrays of sub-tree `top` read from torch dict `src`; returns (tree, keys used)."""
    out: dict = {}
    used: set[str] = set()
    for path, name, stack, shape, depth in _entries(abstract, top):
        names = [name.format(i=i) for i in range(depth)] if stack else [name]
        want = _expected_torch_shape(path, shape)
        arrays = []
        for key in names:
            if key not in src:
                report.missing.append(label + key)
                continue
            used.add(key)
            w = np.asarray(src[key])
            if tuple(w.shape) != want:
                report.bad.append(f"{label}{key} {tuple(w.shape)} (expected {want})")
                continue
            arrays.append(_from_torch(w, path, shape))
        if len(arrays) == len(names):
            _set(out, path[1:], np.stack(arrays) if stack else arrays[0])
    return out, used


def vae_params_from_official(vae_state_dict: Mapping[str, np.ndarray], cfg: HarmonConfig) -> dict:
    """kl16.ckpt["model"] (AutoencoderKL state_dict) -> our `vae` sub-tree (pure dict)."""
    abstract = abstract_params(cfg)
    if "vae" not in abstract:
        raise ValueError("the config uses the pixel tokenizer: it has no VAE parameters to load")
    report = _Report()
    tree, used = _import_subtree(abstract, "vae", vae_state_dict, report, "vae:")
    report.unexpected += [f"vae:{k}" for k in sorted(set(vae_state_dict) - used)]
    report.raise_if_any("VAE checkpoint")
    return tree


def harmon_params_from_official(
    state_dict: Mapping[str, np.ndarray],
    vae_state_dict: Mapping[str, np.ndarray] | None,
    cfg: HarmonConfig,
) -> dict:
    """Official Harmon state_dict (+ kl16 VAE state_dict) -> our pure dict of float32 arrays.

    Missing, unexpected and mis-shaped keys of both dicts are reported in one ValueError. A VAE
    dict is required iff the config uses the KL-16 VAE (not the pixel tokenizer). `vae.*` keys
    inside `state_dict` (HF-format exports) are accepted in place of `vae_state_dict`.
    `mar.class_emb.weight` (unused by Harmon) is required like in the official module tree.
    """
    abstract = abstract_params(cfg)
    report = _Report()
    out: dict = {}
    sd = dict(state_dict)
    vae_sd = dict(vae_state_dict) if vae_state_dict is not None else None
    if vae_sd is None and any(k.startswith("vae.") for k in sd):
        vae_sd = {k[4:]: sd.pop(k) for k in list(sd) if k.startswith("vae.")}

    used: set[str] = set()
    for top in ("mar", "proj_in", "proj_out"):
        out[top], u = _import_subtree(abstract, top, sd, report)
        used |= u
    if "vae" in abstract:
        if vae_sd is None:
            report.missing.append("the VAE state_dict (kl16.ckpt['model'])")
        else:
            out["vae"], u = _import_subtree(abstract, "vae", vae_sd, report, "vae:")
            report.unexpected += [f"vae:{k}" for k in sorted(set(vae_sd) - u)]
    elif vae_sd:
        report.other.append("a VAE state_dict was given but the config uses the pixel tokenizer")

    llm_sd = {k: v for k, v in sd.items() if k.startswith("llm.")}
    report.unexpected += sorted(k for k in sd if k not in used and not k.startswith("llm."))
    try:
        out["llm"] = qwen2_convert.params_from_hf(
            llm_sd, cfg.llm, prefix=LLM_PREFIX, lm_head_key=LM_HEAD_KEY
        )
    except ValueError as e:
        report.other.append(str(e))
    report.raise_if_any("Harmon checkpoint")
    return out


# ----------------------------------------------------------------------------------------------
# ours -> official


def official_from_harmon_params(
    params: Mapping, cfg: HarmonConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Our pure dict -> (Harmon state_dict with the official key set, VAE state_dict).

    The VAE dict is empty when the config uses the pixel tokenizer. `mar.class_emb.weight` and
    the tied `llm.lm_head.weight` are always written, as the official modules hold them.
    """
    abstract = abstract_params(cfg)
    harmon_sd: dict[str, np.ndarray] = {}
    vae_sd: dict[str, np.ndarray] = {}
    have = {tuple(str(p) for p in k): v for k, v in _flatten(params).items()}
    problems = []
    for top in ("mar", "proj_in", "proj_out", "vae"):
        if top not in abstract:
            continue
        dst = vae_sd if top == "vae" else harmon_sd
        for path, name, stack, shape, depth in _entries(abstract, top):
            key = tuple(str(p) for p in path)
            if key not in have:
                problems.append(f"missing {'.'.join(key)}")
                continue
            value = np.asarray(have[key], np.float32)
            full = (depth, *shape) if stack else shape
            if tuple(value.shape) != tuple(full):
                problems.append(f"{'.'.join(key)} {value.shape} (expected {full})")
                continue
            if stack:
                for i in range(depth):
                    dst[name.format(i=i)] = _to_torch(value[i], path)
            else:
                dst[name] = _to_torch(value, path)
    if problems:
        raise ValueError("Harmon params do not match the config: " + "; ".join(problems))
    llm = params["llm"] if "llm" in params else {}
    harmon_sd.update(
        qwen2_convert.hf_from_params(
            jax.tree.map(np.asarray, dict(llm)),
            cfg.llm,
            prefix=LLM_PREFIX,
            include_lm_head=True,
            lm_head_key=LM_HEAD_KEY,
        )
    )
    return harmon_sd, vae_sd


def model_from_params(cfg: HarmonConfig, params: Mapping) -> Harmon:
    """A Harmon model holding `params`, built abstractly (no random initialisation is run)."""
    model = nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0)))
    load_params_into(model, params)
    return model


def load_params_into(model: Harmon, params: Mapping) -> None:
    """Writes a pure dict into the model's Params (shape-checked, one ValueError on mismatch)."""
    state = nnx.state(model, nnx.Param)
    want = {
        tuple(map(str, k)): tuple(v.shape) for k, v in _flatten(nnx.to_pure_dict(state)).items()
    }
    have = {tuple(map(str, k)): tuple(np.shape(v)) for k, v in _flatten(params).items()}
    problems = []
    if want.keys() - have.keys():
        problems.append(f"missing {sorted('.'.join(k) for k in want.keys() - have.keys())}")
    if have.keys() - want.keys():
        problems.append(f"unexpected {sorted('.'.join(k) for k in have.keys() - want.keys())}")
    shapes = [
        f"{'.'.join(k)} {have[k]} (expected {want[k]})"
        for k in want.keys() & have.keys()
        if have[k] != want[k]
    ]
    if shapes:
        problems.append(f"wrong shapes {sorted(shapes)}")
    if problems:
        raise ValueError("params do not fit the Harmon model: " + "; ".join(problems))
    nnx.replace_by_pure_dict(
        state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(params))
    )
    nnx.update(model, state)


def load_official(
    harmon_path: str | pathlib.Path,
    vae_path: str | pathlib.Path | None,
    cfg: HarmonConfig,
) -> Harmon:
    """Builds a Harmon model and loads official checkpoint files into it."""
    sd = load_torch_file(harmon_path)
    vae_sd = load_torch_file(vae_path) if vae_path is not None else None
    return model_from_params(cfg, harmon_params_from_official(sd, vae_sd, cfg))
