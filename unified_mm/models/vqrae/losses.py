"""Loss terms of the VQRAE tokenizer (vqrae_rae.md 2.1, 2.2, 5.4). All reductions are float32 means."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def pixel_loss(recon01: Array, target01: Array, kind: str) -> Array:
    """Pixel reconstruction loss on [0, 1] images (RAE computes its L1 there). kind: l2 | l1."""
    diff = recon01.astype(jnp.float32) - target01.astype(jnp.float32)
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"pixel_loss: kind must be l2|l1, got {kind!r}")


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))) (taming / RAE)."""
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
        + jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    )


def generator_loss(logits_fake: Array) -> Array:
    """-mean D(fake) (RAE's "vanilla" generator loss, hinge-style)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(
    rec_fn: Callable[[Array], Array],
    gan_fn: Callable[[Array], Array],
    last_layer: Array,
    max_weight: float = 1e4,
) -> Array:
    """VQGAN rule ||d rec / d W|| / (||d gan / d W|| + 1e-6), clipped to [0, max], stop-gradient'd.

    `rec_fn` / `gan_fn` map the last layer's weight W to the reconstruction / generator loss; both
    gradients are taken with jax.grad at stop_gradient(W).
    """
    w = jax.lax.stop_gradient(last_layer)
    g_rec = jax.grad(rec_fn)(w)
    g_gan = jax.grad(gan_fn)(w)
    weight = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-6)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def distill_loss(student: Array, teacher: Array) -> Array:
    """Self-distillation ||Z_I - T(X)||^2 as a per-element mean (vqrae_rae.md 2.2; ASSUMPTION on the
    reduction). The teacher side is stop-gradient'd."""
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    return jnp.mean(jnp.square(student.astype(jnp.float32) - t))


def cosine_similarity(a: Array, b: Array, eps: float = 1e-8) -> Array:
    """Mean token-wise cosine similarity between [..., D] feature arrays."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.mean(num / jnp.maximum(den, eps))


def quantize_8bit(x: Array) -> Array:
    """Clamp to [-1, 1] and round to 8 bits, as RAE does to the fakes it shows the discriminator."""
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def token_cross_entropy(
    logits: Array, labels: Array, ignore_index: int = -100
) -> tuple[Array, Array]:
    """Mean CE over the non-ignored labels (float32 log-softmax) -> (loss, number of tokens)."""
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n, 1), n
