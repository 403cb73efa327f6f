"""Hugging Face Qwen2 state_dict <-> `Qwen2` parameters (pure dicts), both directions.

The pure-dict layout is that of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`:

    embed_tokens                          [vocab, embed]        <- model.embed_tokens.weight
    layers.input_layernorm.scale          [L, embed]            <- model.layers.{l}.input_layernorm.weight
    layers.self_attn.{q,k,v}_proj.kernel  [L, embed, out]       <- ...self_attn.{q,k,v}_proj.weight.T
    layers.self_attn.{q,k,v}_proj.bias    [L, out]
    layers.self_attn.o_proj.kernel        [L, heads*hd, embed]  <- ...self_attn.o_proj.weight.T
    layers.post_attention_layernorm.scale [L, embed]
    layers.mlp.{gate,up,down}_proj.kernel [L, in, out]          <- ...mlp.*_proj.weight.T
    norm.scale                            [embed]               <- model.norm.weight
    lm_head.kernel                        [embed, vocab]        <- lm_head.weight.T (untied only)

Every value is float32. Non-persistent `rotary_emb.inv_freq` buffers found in old checkpoints are
ignored; anything else that is not consumed is an error.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from unified_mm.models.llm.qwen2 import Qwen2, Qwen2Config

# (pure-dict path inside one layer, HF name inside "layers.{l}.", is a Linear weight to transpose)
_LAYER_ENTRIES: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    (("input_layernorm", "scale"), "input_layernorm.weight", False),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", False),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", False),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", False),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
)


def _hf_layer_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """torch shapes of one layer's tensors."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            raise ValueError(f"Qwen2 params: missing entry {'.'.join(path)}")
        tree = tree[k]
    return tree


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def params_from_hf(
    state_dict: Mapping[str, np.ndarray],
    cfg: Qwen2Config,
    *,
    prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
) -> dict:
    """HF `Qwen2ForCausalLM` state_dict -> nested pure dict of float32 numpy arrays.

    Every key of `state_dict` must be consumed (filter other sub-models out first). All missing,
    unexpected and mis-shaped keys are reported together in one ValueError.
    """
    missing: list[str] = []
    bad_shape: list[str] = []
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if key not in state_dict:
            missing.append(key)
            return None
        used.add(key)
        value = state_dict[key]
        if tuple(value.shape) != shape:
            bad_shape.append(f"{key} {tuple(value.shape)} (expected {shape})")
            return None
        return _f32(value)

    d, v = cfg.hidden_size, cfg.vocab_size
    params: dict = {}
    embed = take(f"{prefix}embed_tokens.weight", (v, d))
    params["embed_tokens"] = embed
    norm = take(f"{prefix}norm.weight", (d,))
    params["norm"] = {"scale": norm}

    shapes = _hf_layer_shapes(cfg)
    for path, name, transpose in _LAYER_ENTRIES:
        per_layer = [
            take(f"{prefix}layers.{i}.{name}", shapes[name]) for i in range(cfg.num_hidden_layers)
        ]
        if any(x is None for x in per_layer):
            continue
        stacked = np.stack([x.T if transpose else x for x in per_layer])
        _set(params, ("layers", *path), np.ascontiguousarray(stacked))

    tied_mismatch = None
    if cfg.tie_word_embeddings:
        if lm_head_key in state_dict:
            head = take(lm_head_key, (v, d))
            if head is not None and embed is not None and not np.array_equal(head, embed):
                diff = float(np.max(np.abs(head - embed)))
                tied_mismatch = (
                    f"{lm_head_key} differs from the tied embedding (max |diff| {diff:.3g})"
                )
    else:
        head = take(lm_head_key, (v, d))
        params["lm_head"] = {"kernel": None if head is None else np.ascontiguousarray(head.T)}

    unexpected = sorted(
        k for k in state_dict if k not in used and not k.endswith("rotary_emb.inv_freq")
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if bad_shape:
        problems.append(f"wrong shapes {bad_shape}")
    if tied_mismatch:
        problems.append(tied_mismatch)
    if problems:
        raise ValueError("Qwen2 HF state_dict does not match the config: " + "; ".join(problems))
    return params


def hf_from_params(
    params: Mapping,
    cfg: Qwen2Config,
    *,
    prefix: str = "model.",
    include_lm_head: bool = True,
    lm_head_key: str = "lm_head.weight",
) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf`: float32 numpy arrays in torch layout (tied head copied)."""
    out: dict[str, np.ndarray] = {}
    embed = _f32(_get(params, ("embed_tokens",)))
    out[f"{prefix}embed_tokens.weight"] = embed
    for path, name, transpose in _LAYER_ENTRIES:
        stacked = _f32(_get(params, ("layers", *path)))
        if stacked.shape[0] != cfg.num_hidden_layers:
            raise ValueError(
                f"Qwen2 params: layers.{'.'.join(path)} has {stacked.shape[0]} layers, "
                f"config says {cfg.num_hidden_layers}"
            )
        for i in range(cfg.num_hidden_layers):
            x = stacked[i]
            out[f"{prefix}layers.{i}.{name}"] = np.ascontiguousarray(x.T if transpose else x)
    out[f"{prefix}norm.weight"] = _f32(_get(params, ("norm", "scale")))
    if include_lm_head:
        if cfg.tie_word_embeddings:
            out[lm_head_key] = embed.copy()
        else:
            out[lm_head_key] = np.ascontiguousarray(_f32(_get(params, ("lm_head", "kernel"))).T)
    return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, str(k))))
        else:
            flat[(*prefix, str(k))] = v
    return flat


def load_params_into(model: Qwen2, params: Mapping) -> None:
    """Writes a pure dict (as from `params_from_hf`) into `model`'s Params, shape-checked."""
    state = nnx.state(model, nnx.Param)
    want = {k: tuple(v.shape) for k, v in _flatten(nnx.to_pure_dict(state)).items()}
    have = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
    problems = []
    missing = sorted(".".join(k) for k in want.keys() - have.keys())
    extra = sorted(".".join(k) for k in have.keys() - want.keys())
    shapes = sorted(
        f"{'.'.join(k)} {have[k]} (expected {want[k]})"
        for k in want.keys() & have.keys()
        if have[k] != want[k]
    )
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if shapes:
        problems.append(f"wrong shapes {shapes}")
    if problems:
        raise ValueError("Qwen2 params do not fit the model: " + "; ".join(problems))
    values = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(params))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)


# ---------------------------------------------------------------------------------------------
# safetensors reading (numpy only, no torch)
# ---------------------------------------------------------------------------------------------

# numpy has no bfloat16, so safetensors' numpy backend refuses such tensors; read those raw.
_RAW_DTYPES: dict[str, Callable[[], Any]] = {
    "BF16": lambda: ml_dtypes.bfloat16,
    "F8_E4M3": lambda: ml_dtypes.float8_e4m3fn,
    "F8_E5M2": lambda: ml_dtypes.float8_e5m2,
}


def _read_one(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    out: dict[str, np.ndarray] = {}
    raw_keys = [k for k, info in header.items() if info["dtype"] in _RAW_DTYPES]
    if len(raw_keys) < len(header):
        with safe_open(str(path), framework="numpy") as f:
            for k in header:
                if k not in raw_keys:
                    out[k] = f.get_tensor(k)
    if raw_keys:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        for k in raw_keys:
            info = header[k]
            begin, end = info["data_offsets"]
            dtype = _RAW_DTYPES[info["dtype"]]()
            out[k] = np.frombuffer(data[begin:end].tobytes(), dtype=dtype).reshape(info["shape"])
    return out


def load_hf_safetensors(path_or_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file, a sharded `*.safetensors.index.json`, or a directory of them."""
    path = pathlib.Path(path_or_dir)
    if path.is_dir():
        indices = sorted(path.glob("*.safetensors.index.json"))
        if len(indices) > 1:
            raise ValueError(f"{path}: several safetensors index files {[p.name for p in indices]}")
        if indices:
            path = indices[0]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{path}: no *.safetensors files")
            return _merge_shards(files)
    if not path.exists():
        raise ValueError(f"safetensors path does not exist: {path}")
    if path.name.endswith(".json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: no 'weight_map' in the safetensors index")
        files = [path.parent / name for name in sorted(set(weight_map.values()))]
        merged = _merge_shards(files)
        absent = sorted(set(weight_map) - set(merged))
        if absent:
            raise ValueError(f"{path}: keys listed in the index but not in the shards: {absent}")
        return merged
    return _read_one(path)


def _merge_shards(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise ValueError(f"safetensors shards not found: {absent}")
    for f in files:
        shard = _read_one(f)
        dup = sorted(set(shard) & set(merged))
        if dup:
            raise ValueError(f"{f}: keys appear in more than one shard: {dup}")
        merged.update(shard)
    return merged
