"""Transformer building blocks shared by the VQRAE encoders, decoder and discriminator.

Pre-LN ViT blocks (SigLIP, DINOv2 with optional LayerScale, MAE-style decoder) stacked on a leading
"layers" axis and run with `jax.lax.scan`; LayerNorm and softmax in float32 (DEVELOPERS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

_XAVIER = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()


class Frozen(nnx.Variable):
    """Pretrained weights that are never trained (LPIPS); optimizers built on nnx.Param skip them."""


def activation(name: str) -> Callable[[Array], Array]:
    if name == "gelu":  # exact erf GELU (DINOv2, RAE decoder)
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":  # SigLIP's gelu_pytorch_tanh
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}; expected gelu|gelu_tanh")


def dtype_of(name: str | jnp.dtype) -> jnp.dtype:
    return jnp.dtype(name)


def dense(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: nnx.Initializer = _XAVIER,
    bias_init: nnx.Initializer = _ZEROS,
) -> nnx.Linear:
    """nnx.Linear whose kernel and bias both carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(bias_init, (names[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """torch-style LayerNorm computed in float32; `affine=False` keeps no scale/bias at all."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        affine: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        if affine:
            self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))
        else:
            self.scale = self.bias = None

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/o projections (the HF layout)."""

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool, rngs: nnx.Rngs, dtype, param_dtype
    ):
        self.num_heads = num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k = dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.v = dense(dim, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.o = dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd)
        k = self.k(x).reshape(b, n, self.num_heads, hd)
        v = self.v(x).reshape(b, n, self.num_heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * hd**-0.5, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return self.o(out)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.fc2(activation(self.act)(self.fc1(x)))


class ViTBlock(nnx.Module):
    """Pre-LN transformer block; `layerscale` (DINOv2) multiplies each branch by a learned vector."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        eps: float,
        act: str,
        qkv_bias: bool = True,
        layerscale: float | None = None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, eps=eps, **kw)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, eps=eps, **kw)
        self.mlp = Mlp(dim, mlp_dim, act, rngs=rngs, **kw)
        if layerscale is not None:
            self.ls1 = nnx.Param(jnp.full((dim,), layerscale, param_dtype), out_sharding=("norm",))
            self.ls2 = nnx.Param(jnp.full((dim,), layerscale, param_dtype), out_sharding=("norm",))
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: Array) -> Array:
        h = self.attn(self.norm1(x))
        if self.ls1 is not None:
            h = h * self.ls1[...].astype(h.dtype)
        x = x + h
        h = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            h = h * self.ls2[...].astype(h.dtype)
        return x + h


_ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


def _constrain(x: Array) -> Array:
    """Keeps [B, N, D] activations sharded over the batch axes between blocks: without it XLA
    gathered the global batch on every chip (VQRAE-SigLIP2 tokenizer, v6e-64, 1 image per chip:
    78.4 GiB of temporaries, 2.9 GiB with it)."""
    return nn.with_logical_constraint(x, _ACT_AXES) if x.ndim == 3 else x


class BlockStack(nnx.Module):
    """`depth` copies of a block with parameters stacked on a leading "layers" axis, run by lax.scan."""

    def __init__(
        self,
        depth: int,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        *,
        rngs: nnx.Rngs,
        remat: bool,
    ):
        self.depth = depth
        self.remat = remat

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r: nnx.Rngs) -> nnx.Module:
            return make_block(r)

        self.blocks = make(rngs)
        # Graph-mode nnx.vmap prepends "layers" to the logical names; tree mode (FLIP 5310) does not.
        for _, node in nnx.iter_graph(self.blocks):
            if isinstance(node, nnx.Variable):
                names = node.get_metadata().get("out_sharding")
                if names is not None and len(names) == node.ndim - 1:
                    node.set_metadata(out_sharding=("layers", *names))

    def __call__(self, x: Array, *, num_layers: int | None = None) -> Array:
        """Runs the first `num_layers` blocks (all by default) so an intermediate layer costs less."""
        n = self.depth if num_layers is None else num_layers
        if not 0 <= n <= self.depth:
            raise ValueError(f"BlockStack: num_layers {n} outside [0, {self.depth}]")
        if n == 0:
            return x
        graphdef, state = nnx.split(self.blocks)
        if n < self.depth:
            state = jax.tree.map(lambda a: a[:n], state)

        def body(h: Array, layer_state) -> tuple[Array, None]:
            return _constrain(nnx.merge(graphdef, layer_state)(h)), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, _constrain(x), state)
        return x

    def outputs(self, x: Array, layers: Sequence[int]) -> list[Array]:
        """Block outputs after each 1-based layer count in `layers` (increasing), e.g. (3, 6, 9, 12)."""
        outs, done = [], 0
        x = _constrain(x)
        for n in layers:
            if n < done:
                raise ValueError(f"BlockStack.outputs: layers must increase, got {tuple(layers)}")
            graphdef, state = nnx.split(self.blocks)
            part = jax.tree.map(lambda a, lo=done, hi=n: a[lo:hi], state)

            def body(h: Array, layer_state, gd=graphdef) -> tuple[Array, None]:
                return _constrain(nnx.merge(gd, layer_state)(h)), None

            if n > done:
                x, _ = jax.lax.scan(body, x, part)
            outs.append(x)
            done = n
        return outs


def patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] in (p, q, c) order, the inverse of `unpatchify`."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: Array, grid: tuple[int, int], patch: int, channels: int = 3) -> Array:
    """[B, h*w, p*p*C] -> [B, h*p, w*p, C]; the patch vector is ordered (p, q, c) as in RAE/MAE."""
    b = tokens.shape[0]
    gh, gw = grid
    if gh * gw != tokens.shape[1] or tokens.shape[2] != patch * patch * channels:
        raise ValueError(
            f"unpatchify: tokens {tokens.shape} do not match grid {grid}, patch {patch}, channels {channels}"
        )
    x = tokens.reshape(b, gh, gw, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * patch, gw * patch, channels)
