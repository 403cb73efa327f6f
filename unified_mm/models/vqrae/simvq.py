"""SimVQ quantizer with VQRAE's projections (vqrae_rae.md 1.3, pitfalls 15 and 19).

    z [B,N,d] --proj_in--> z_e [B,N,e] --L2 argmin over C.W (fp32)--> ids, z_q --straight-through-->
    --proj_out--> [B,N,d_out]

C (K x e) is drawn once from N(0, e^-1/2) and stored as a `Codebook` variable (not an nnx.Param, so
optimizers built on nnx.Param never touch it, while checkpoints still carry it). The effective codebook
is C.W with W a learnable Linear(e, e) with bias, as in the SimVQ reference; token ids decode through
C.W, never through raw C. There is no EMA, no code normalisation and no entropy term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unified_mm.models.vqrae.config import SimVQConfig
from unified_mm.models.vqrae.layers import dense

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


class Codebook(nnx.Variable):
    """The frozen random SimVQ codebook C."""


def _torch_linear_init(fan_in: int) -> nnx.Initializer:
    # torch.nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the SimVQ reference uses for W.
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class SimVQ(nnx.Module):
    def __init__(
        self, cfg: SimVQConfig, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32
    ):
        self.cfg = cfg
        k, e = cfg.codebook_size, cfg.code_dim
        # ASSUMPTION: plain linear projections d->e and e->d_out (section 1.3 leaves their form open).
        # proj_in runs in float32 so the lookup input is not rounded to bf16 first.
        self.proj_in = dense(in_dim, e, ("embed", "latent"), rngs=rngs, dtype=jnp.float32)
        self.codebook = Codebook(
            jax.random.normal(rngs.params(), (k, e), jnp.float32) * e**-0.5,
            out_sharding=("codebook", "latent"),
        )
        # W maps the code space onto itself; its input axis carries no name (two "latent" axes on one
        # tensor could not both be sharded).
        init = _torch_linear_init(e)
        self.code_proj = dense(
            e, e, (None, "latent"), rngs=rngs, kernel_init=init, bias_init=init, dtype=jnp.float32
        )
        self.proj_out = dense(e, out_dim, ("latent", "embed"), rngs=rngs, dtype=dtype)

    def effective_codebook(self) -> Array:
        """C.W (+ bias), [K, e] in float32."""
        w = self.code_proj.kernel[...].astype(jnp.float32)
        b = self.code_proj.bias[...].astype(jnp.float32)
        return jnp.dot(self.codebook[...], w, precision=_HI) + b

    def lookup(self, z_e: Array) -> tuple[Array, Array]:
        """Nearest code by L2 distance, computed in float32 (bf16 ties change the ids). -> (ids, z_q)."""
        codes = self.effective_codebook()
        z = z_e.astype(jnp.float32)
        dist = (
            jnp.sum(z * z, axis=-1, keepdims=True)
            + jnp.sum(codes * codes, axis=-1)
            - 2.0 * jnp.einsum("...e,ke->...k", z, codes, precision=_HI)
        )
        ids = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        return ids, jnp.take(codes, ids, axis=0)

    def __call__(self, z: Array) -> tuple[Array, Array, Array, dict[str, Array]]:
        """z [B,N,d] -> (decoder tokens [B,N,d_out], ids [B,N] int32, quant loss, metrics)."""
        cfg = self.cfg
        z_e = self.proj_in(z).astype(jnp.float32)
        ids, z_q = self.lookup(z_e)
        sg = jax.lax.stop_gradient
        commit = jnp.mean(jnp.square(sg(z_q) - z_e))  # trains the encoder side (proj_in, encoder)
        codebook = jnp.mean(jnp.square(z_q - sg(z_e)))  # trains W
        if cfg.legacy_beta_placement:  # SimVQ reference `legacy=True`: beta on the codebook term
            loss = commit + cfg.beta * codebook
        else:  # standard VQ-VAE: beta on the commitment term
            loss = cfg.beta * commit + codebook
        z_st = z_e + sg(z_q - z_e)  # straight-through: identity gradient to z_e
        out = self.proj_out(z_st)
        metrics = {
            "vq/commit_loss": commit,
            "vq/codebook_loss": codebook,
            "vq/perplexity": code_perplexity(ids, cfg.codebook_size),
            "vq/batch_usage": code_usage(ids, cfg.codebook_size),
        }
        return out, ids, loss, metrics

    def codes(self, ids: Array) -> Array:
        """Token ids -> code vectors z_q [..., e] through C.W."""
        return jnp.take(self.effective_codebook(), ids, axis=0)

    def decode_ids(self, ids: Array) -> Array:
        """Token ids -> decoder tokens [..., d_out] (the same path as the forward after the lookup)."""
        return self.proj_out(self.codes(ids))


def code_histogram(ids: Array, codebook_size: int) -> Array:
    return jnp.bincount(ids.reshape(-1), length=codebook_size)


def code_perplexity(ids: Array, codebook_size: int) -> Array:
    """exp(entropy) of the code distribution in `ids` (per batch; the eval-pass value is in metrics)."""
    p = code_histogram(ids, codebook_size).astype(jnp.float32) / ids.size
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def code_usage(ids: Array, codebook_size: int) -> Array:
    """Fraction of the K codes that occur at least once in `ids`."""
    return jnp.mean((code_histogram(ids, codebook_size) > 0).astype(jnp.float32))
