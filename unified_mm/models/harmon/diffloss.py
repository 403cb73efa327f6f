"""MAR's diffusion head: SimpleMLPAdaLN and DiffLoss (training loss, CFG forward, sampling).

Also the small building blocks shared with mar.py, vae.py and harmon.py (dense layers and norm
parameters with logical axis names, a float32 LayerNorm, stacked-and-scanned layer helpers), kept
here because mar.py already depends on this file (MAR owns the DiffLoss head, as in the official
parameter tree `mar.diffloss.net.*`).

Numerics (harmon_mar.md 1.3, pitfalls 8, 9, 13): timestep embedding [cos, sin] with 256
frequencies and max_period 10000 fed the ORIGINAL 0..999 step; adaLN chunks (shift, scale, gate);
final LayerNorm without affine parameters; output [eps | v]; CFG on eps only, with the variance
channels kept per half.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.harmon import diffusion as gd

# ----------------------------------------------------------------------------------------------
# Shared building blocks (also used by mar.py, vae.py and harmon.py).

# MAR / DiffLoss initialise every Linear with xavier_uniform weights and zero biases.
_XAVIER = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()


def dense(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    use_bias: bool = True,
    kernel_init=_XAVIER,
    bias_init=_ZEROS,
) -> nnx.Linear:
    """nnx.Linear with fp32 params, compute `dtype` and logical axis names on kernel and bias."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(bias_init, (names[1],)),
        rngs=rngs,
    )


def norm_param(init, dim: int) -> nnx.Param:
    """A float32 norm scale / bias with the ("norm",) logical axis (deterministic init)."""
    return nnx.Param(nnx.with_partitioning(init, ("norm",))(jax.random.key(0), (dim,), jnp.float32))


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm semantics (biased variance of centred values), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, affine: bool = True, dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        if affine:
            self.scale = norm_param(nnx.initializers.ones_init(), dim)
            self.bias = norm_param(nnx.initializers.zeros_init(), dim)
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale.get_value() + self.bias.get_value()
        return y.astype(self.dtype)


def make_stack(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """`depth` copies of a layer with every parameter stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


def shard_rows(x: jax.Array) -> jax.Array:
    """Shards DiffLoss rows (tokens x diffusion_batch_mul) over the batch axes. Without it XLA
    replicated every row tensor on every device: [rows of the global batch, width] per chip."""
    return nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))


def scan_stack(stack: nnx.Module, body: Callable, carry, xs=None, *, remat: bool = False):
    """Run `body(layer, carry, x_i) -> carry` over a stacked module with `jax.lax.scan`
    (split/merge inside the scan body, so compile time is flat in depth)."""
    graphdef, state = nnx.split(stack)

    def step(c, inp):
        layer_state, x_i = inp
        return body(nnx.merge(graphdef, layer_state), c, x_i), None

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)
    carry, _ = jax.lax.scan(step, carry, (state, xs))
    return carry


# ----------------------------------------------------------------------------------------------
# SimpleMLPAdaLN


@dataclasses.dataclass(frozen=True)
class DiffLossConfig:
    token_dim: int = 16  # target channels C (output is 2C)
    cond_dim: int = 768  # z channels (MAR decoder width)
    width: int = 1024
    depth: int = 6
    time_freq_dim: int = 256
    num_sampling_steps: str = "100"
    train_diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    prediction: str = "epsilon"  # or "v" (diffusion.DiffusionSchedule.prediction)
    # None: MAR's unclipped sampler. c: predicted x_0 clipped to [-c, c] while sampling (bounded
    # targets such as pixel-patch tokens; training is unaffected).
    clip_denoised: float | None = None
    remat: bool = False
    dtype: str = "float32"

    @property
    def train_schedule(self) -> gd.DiffusionSchedule:
        return gd.make_schedule(
            "",
            noise_schedule=self.noise_schedule,
            diffusion_steps=self.train_diffusion_steps,
            prediction=self.prediction,
        )

    @property
    def gen_schedule(self) -> gd.DiffusionSchedule:
        return gd.make_schedule(
            str(self.num_sampling_steps),
            noise_schedule=self.noise_schedule,
            diffusion_steps=self.train_diffusion_steps,
            prediction=self.prediction,
        )


def _frequencies(dim: int, max_period: float) -> np.ndarray:
    # The float32 exponent exactly as torch forms it, then a correctly rounded exp: platform
    # independent and within one ulp of torch's vectorised float32 exp.
    half = dim // 2
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    expo = expo / np.float32(half)
    return np.exp(expo.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos, sin] sinusoidal embedding (glide / DiT order) of (possibly fractional) steps."""
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(_frequencies(dim, max_period))[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        init = nnx.initializers.normal(0.02)
        self.freq_dim = cfg.time_freq_dim
        self.linear_1 = dense(
            cfg.time_freq_dim, cfg.width, (None, "cond"), rngs=rngs, dtype=dt, kernel_init=init
        )
        self.linear_2 = dense(
            cfg.width, cfg.width, ("mlp", "cond"), rngs=rngs, dtype=dt, kernel_init=init
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(timestep_embedding(t, self.freq_dim))))


class ResBlock(nnx.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from SiLU(y)."""

    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        w = cfg.width
        zero = nnx.initializers.zeros_init()
        self.in_ln = LayerNorm(w, 1e-6, dtype=dt)
        self.mlp_in = dense(w, w, ("cond", "mlp"), rngs=rngs, dtype=dt)
        self.mlp_out = dense(w, w, ("mlp", "cond"), rngs=rngs, dtype=dt)
        self.adaLN_modulation = dense(
            w, 3 * w, ("cond", "mlp"), rngs=rngs, dtype=dt, kernel_init=zero
        )

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.adaLN_modulation(jax.nn.silu(y)), 3, axis=-1)
        h = self.in_ln(x) * (1 + scale) + shift
        h = self.mlp_out(jax.nn.silu(self.mlp_in(h)))
        return x + gate * h


class FinalLayer(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        w = cfg.width
        zero = nnx.initializers.zeros_init()
        self.norm_final = LayerNorm(w, 1e-6, affine=False, dtype=dt)
        self.linear = dense(
            w, 2 * cfg.token_dim, ("cond", "latent"), rngs=rngs, dtype=dt, kernel_init=zero
        )
        self.adaLN_modulation = dense(
            w, 2 * w, ("cond", "mlp"), rngs=rngs, dtype=dt, kernel_init=zero
        )

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(y)), 2, axis=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nnx.Module):
    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.time_embed = TimestepEmbedder(cfg, rngs=rngs)
        self.cond_embed = dense(cfg.cond_dim, cfg.width, ("embed", "cond"), rngs=rngs, dtype=dt)
        self.input_proj = dense(cfg.token_dim, cfg.width, ("latent", "cond"), rngs=rngs, dtype=dt)
        self.res_blocks = make_stack(lambda r: ResBlock(cfg, rngs=r), cfg.depth, rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """x [N, C] (x_t), t [N] original timesteps, c [N, D] -> [N, 2C] float32 = [eps | v]."""
        h = shard_rows(self.input_proj(x))
        y = shard_rows(self.time_embed(t) + self.cond_embed(c))
        h = scan_stack(
            self.res_blocks, lambda blk, h, _: shard_rows(blk(h, y)), h, remat=self.cfg.remat
        )
        return self.final_layer(h, y).astype(jnp.float32)

    def forward_with_cfg(
        self, x: jax.Array, t: jax.Array, c: jax.Array, cfg_scale: float | jax.Array
    ) -> jax.Array:
        """Rows are [cond; uncond]; only the first half of x is used; guided eps is copied to
        both halves while each half keeps its own variance channels."""
        n = x.shape[0] // 2
        half = x[:n]
        out = self(jnp.concatenate([half, half], axis=0), t, c)
        ch = self.cfg.token_dim
        eps, rest = out[:, :ch], out[:, ch:]
        cond_eps, uncond_eps = eps[:n], eps[n:]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=1)


# ----------------------------------------------------------------------------------------------
# DiffLoss


class DiffLoss(nnx.Module):
    """Per-token diffusion loss and sampler around SimpleMLPAdaLN (`mar.diffloss.net.*`)."""

    def __init__(self, cfg: DiffLossConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg, rngs=rngs)

    def loss_terms(
        self, target: jax.Array, z: jax.Array, t: jax.Array, noise: jax.Array
    ) -> dict[str, jax.Array]:
        """Per-row {loss, mse, vb} for given diffusion steps t [N] and noise [N, C]."""
        s = self.cfg.train_schedule
        return gd.training_losses(s, lambda x, tt: self.net(x, tt, z), target, t, noise)

    def draw_t_noise(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        kt, kn = jax.random.split(key)
        t = jax.random.randint(kt, (n,), 0, self.cfg.train_schedule.num_timesteps, jnp.int32)
        return shard_rows(t), shard_rows(
            jax.random.normal(kn, (n, self.cfg.token_dim), jnp.float32)
        )

    def __call__(
        self,
        target: jax.Array,
        z: jax.Array,
        mask: jax.Array | None = None,
        *,
        key: jax.Array | None = None,
        t: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Masked mean of the per-row loss; t / noise are drawn from `key` unless injected."""
        if t is None or noise is None:
            if key is None:
                raise ValueError("DiffLoss needs either a key or both t and noise")
            t_k, n_k = self.draw_t_noise(key, target.shape[0])
            t = t_k if t is None else t
            noise = n_k if noise is None else noise
        terms = self.loss_terms(target, z, t, noise)
        loss = terms["loss"]
        if mask is not None:
            mask = mask.astype(jnp.float32)
            return (loss * mask).sum() / mask.sum(), terms
        return loss.mean(), terms

    def sample(
        self,
        z: jax.Array,
        init_noise: jax.Array,
        step_noise: jax.Array | Callable[[jax.Array], jax.Array],
        *,
        temperature: float | jax.Array = 1.0,
        cfg: float | jax.Array = 1.0,
        use_cfg: bool = False,
    ) -> jax.Array:
        """DDPM sampling of one token per row of z.

        use_cfg (static): rows are [cond; uncond], init_noise has N/2 rows shared by both halves
        (`cat([n, n])`) and eps is guided with scale `cfg`. Otherwise init_noise has N rows.
        step_noise: the per-step draws, [S, N, C] (index 0 = noisiest step) or k -> [N, C].
        """
        s = self.cfg.gen_schedule
        if use_cfg:
            x_init = jnp.concatenate([init_noise, init_noise], axis=0)

            def model_fn(x, t):
                return self.net.forward_with_cfg(x, t, z, cfg)
        else:
            x_init = init_noise

            def model_fn(x, t):
                return self.net(x, t, z)

        return gd.p_sample_loop(
            s, model_fn, x_init, step_noise, temperature, self.cfg.clip_denoised
        )

    def draw_sample_noise(
        self, key: jax.Array, n: int, *, use_cfg: bool
    ) -> tuple[jax.Array, jax.Array]:
        """(init_noise, step_noise) for `sample` with n rows."""
        k1, k2 = jax.random.split(key)
        c = self.cfg.token_dim
        init = jax.random.normal(k1, (n // 2 if use_cfg else n, c), jnp.float32)
        steps = jax.random.normal(k2, (self.cfg.gen_schedule.num_timesteps, n, c), jnp.float32)
        return init, steps
