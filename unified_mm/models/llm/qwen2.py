"""Qwen2 decoder LLM (Flax NNX) with a functional KV cache, used by Harmon and VQRAE.

Numerics follow `transformers`' `Qwen2ForCausalLM` (eager attention): RMSNorm in float32 cast back to
the input dtype before the scale, split-half `rotate_half` RoPE, GQA, q/k/v bias, SwiGLU MLP and a
head tied to the embedding. Layers are stacked on a leading `layers` axis and run with
`jax.lax.scan` (split/merge inside the body), so compile time does not grow with depth.

Attention is causal over the whole sequence; padded keys (attention_mask == 0) are excluded, and the
default position ids are `cumsum(mask) - 1` clamped at 0 (Harmon's rule: pads do not advance
positions). A `KVCache` is a plain pytree: calling the model with a cache returns a new cache and
leaves the old one untouched, so "curtailing" a cache to a prefix means keeping the old object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
_HF_DEFAULT_ROPE_THETA = 10000.0  # transformers' Qwen2Config default when config.json omits it


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 architecture; `dtype` is the compute dtype, parameters are always float32."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"Qwen2Config.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen2Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen2Config.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @classmethod
    def from_hf_dict(cls, d: Mapping, **overrides: Any) -> Qwen2Config:
        """Builds the config from a HF `config.json` dict (or Harmon's fixture "llm" section).

        HF defaults apply to absent keys (`tie_word_embeddings` False, `rope_theta` 1e4,
        `num_key_value_heads` = heads, `head_dim` = hidden / heads). The HF `dtype` entry is
        ignored: the compute dtype is a run-time choice, passed through `overrides`
        (e.g. `dtype="bfloat16"`).
        """
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"Qwen2 config dict is missing keys: {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen2 hidden_act must be 'silu', got {d['hidden_act']!r}")
        if d.get("use_sliding_window", False):
            raise ValueError("Qwen2 use_sliding_window=True is not supported")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        for r in (rope, scaling):
            kind = r.get("rope_type", r.get("type", "default"))
            if kind != "default":
                raise ValueError(f"Qwen2 rope type {kind!r} is not supported (only 'default')")
        theta = d.get("rope_theta", rope.get("rope_theta", _HF_DEFAULT_ROPE_THETA))
        heads = int(d["num_attention_heads"])
        kw: dict[str, Any] = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", cls.rms_norm_eps)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)


class KVCache(flax.struct.PyTreeNode):
    """Per-layer keys/values in fixed slots; a pytree, so it flows through jit / scan / while_loop."""

    keys: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
    values: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
    key_mask: jax.Array  # [B, max_len] bool: slot holds a valid key
    positions: jax.Array  # [B] int32: next position id per row (valid tokens seen so far)
    length: jax.Array  # [] int32: filled slots (same for all rows)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init: Any, shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32))


class _Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] is the transposed torch weight."""

    def __init__(
        self,
        din: int,
        dout: int,
        names: tuple[str, str],
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
    ):
        # HF's _init_weights: normal(initializer_range=0.02) for weights, zeros for biases.
        self.kernel = _param(rngs, nnx.initializers.normal(0.02), (din, dout), names)
        self.bias = (
            _param(rngs, nnx.initializers.zeros_init(), (dout,), names[1:]) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class _RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # HF: normalise in float32, cast back to the input dtype, *then* multiply by the weight.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta ** (arange(0, d, 2) / d), computed in float32 like HF."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, head_dim] for split-half RoPE (frequencies repeated, not interleaved)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(head_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x [B, T, heads, hd]; cos/sin [B, T, hd] already in x.dtype (HF casts them to the input dtype).
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class _Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _Linear(
            d, cfg.num_attention_heads * hd, ("embed", "heads"), use_bias=True, rngs=rngs
        )
        self.k_proj = _Linear(
            d, cfg.num_key_value_heads * hd, ("embed", "kv"), use_bias=True, rngs=rngs
        )
        self.v_proj = _Linear(
            d, cfg.num_key_value_heads * hd, ("embed", "kv"), use_bias=True, rngs=rngs
        )
        self.o_proj = _Linear(
            cfg.num_attention_heads * hd, d, ("heads", "embed"), use_bias=False, rngs=rngs
        )
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        allowed: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        write_at: jax.Array | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x.shape
        hd, nkv = self.head_dim, self.num_kv_heads
        groups = self.num_heads // nkv
        q = self.q_proj(x).reshape(b, t, self.num_heads, hd)
        k = self.k_proj(x).reshape(b, t, nkv, hd)
        v = self.v_proj(x).reshape(b, t, nkv, hd)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            cache_k, cache_v = kv
            start = (0, write_at, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_kv = (cache_k, cache_v)
            k, v = cache_k.astype(x.dtype), cache_v.astype(x.dtype)
        # GQA: query head h uses kv head h // groups (HF repeat_kv), i.e. heads split as (kv, groups).
        q = q.reshape(b, t, nkv, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(hd))
        # A large finite negative (not -inf) keeps fully masked rows (e.g. all-pad rows) NaN-free.
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.num_heads * hd)
        return self.o_proj(out), new_kv


class _MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _Linear(d, f, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.up_proj = _Linear(d, f, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.down_proj = _Linear(f, d, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.self_attn = _Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.mlp = _MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, kv, write_at):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, write_at)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return nn.with_logical_constraint(x, _ACT_AXES), new_kv


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def default_positions(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Harmon's rule: position = (valid tokens before and including this one) - 1, clamped at 0."""
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 1:
        offset = offset[:, None]
    return jnp.maximum(offset + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class Qwen2(nnx.Module):
    """Qwen2 decoder: `__call__` maps input embeddings to the final-normed hidden state."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = _param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"),
        )

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> _DecoderLayer:
            return _DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        _add_layers_axis_name(self.layers)
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _Linear(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs
            )
        )

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype."""
        x = jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.cfg.compute_dtype)
        return nn.with_logical_constraint(x, _ACT_AXES) if x.ndim == 3 else x

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache with `max_len` slots per row (keys stored in the compute dtype)."""
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(
            keys=jnp.zeros(shape, cfg.compute_dtype),
            values=jnp.zeros(shape, cfg.compute_dtype),
            key_mask=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch,), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        inputs_embeds: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder over `inputs_embeds` [B, T, D].

        attention_mask [B, T] (1 = valid key) covers only the T new tokens; with a cache the cached
        keys keep their own validity (`cache.key_mask`). position_ids [B, T] default to
        `cumsum(mask) - 1` clamped at 0, continuing from `cache.positions` when a cache is given.
        Returns the hidden state after the final RMSNorm and the updated cache (None without one).
        """
        cfg = self.cfg
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"Qwen2: inputs_embeds must be [B, T, {cfg.hidden_size}], got {inputs_embeds.shape}"
            )
        b, t, _ = inputs_embeds.shape
        for name, arr in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if arr is not None and tuple(arr.shape) != (b, t):
                raise ValueError(f"Qwen2: {name} must have shape {(b, t)}, got {tuple(arr.shape)}")
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = nn.with_logical_constraint(inputs_embeds.astype(cfg.compute_dtype), _ACT_AXES)

        if cache is None:
            if position_ids is None:
                position_ids = default_positions(mask)
            causal = jnp.tril(jnp.ones((t, t), bool))
            allowed = mask[:, None, :] & causal[None]
            kvs, write_at = None, None
        else:
            _check_cache(cache, b, t)
            write_at = cache.length
            if position_ids is None:
                position_ids = default_positions(mask, cache.positions)
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, write_at))
            q_slot = write_at + jnp.arange(t)
            causal = jnp.arange(cache.max_len)[None, :] <= q_slot[:, None]
            allowed = key_mask[:, None, :] & causal[None]
            kvs = (cache.keys, cache.values)

        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)

        graphdef, layer_state = nnx.split(self.layers)

        def body(h, xs):
            state, kv = xs
            layer = nnx.merge(graphdef, state)
            return layer(h, cos, sin, allowed, kv, write_at)

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, new_kvs = jax.lax.scan(body, x, (layer_state, kvs))
        x = self.norm(x)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=new_kvs[0],
                values=new_kvs[1],
                key_mask=key_mask,
                positions=cache.positions + jnp.sum(mask, axis=1, dtype=jnp.int32),
                length=cache.length + t,
            )
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits; the head is the embedding matrix when embeddings are tied."""
        dtype = self.cfg.compute_dtype
        h = hidden.astype(dtype)
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(dtype)
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def _add_layers_axis_name(stack: nnx.Module) -> None:
    """Prepends "layers" to each stacked Param's logical names where nnx.vmap did not.

    Graph-mode `nnx.vmap(transform_metadata=...)` already adds it; tree mode (FLIP 5310) does not.
    """
    for _, node in nnx.iter_graph(stack):
        if isinstance(node, nnx.Variable):
            names = node.get_metadata().get("out_sharding")
            if names is not None and len(names) == node.ndim - 1:
                node.set_metadata(out_sharding=("layers", *names))


def _check_cache(cache: KVCache, batch: int, t: int) -> None:
    if cache.keys.shape[1] != batch:
        raise ValueError(f"Qwen2: cache batch {cache.keys.shape[1]} != input batch {batch}")
    # The length is only known outside jit; inside jit an overflow would be silently clamped by
    # dynamic_update_slice, so callers size caches as prompt + new tokens.
    try:
        filled = int(cache.length)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if filled + t > cache.max_len:
        raise ValueError(
            f"Qwen2: KV cache overflow: {filled} filled + {t} new > max_len {cache.max_len}"
        )
