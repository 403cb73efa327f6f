"""Autoregressive decoding for `Qwen2` with the functional KV cache (static shapes, jittable).

`generate` = one prefill over the prompt embeddings into a cache of prompt + max_new_tokens slots,
then a `jax.lax.scan` of one-token steps. Matches `transformers` `generate(do_sample=False,
use_cache=True)` for an unpadded (or left-padded) prompt: rows that emitted EOS keep emitting
`pad_id`, and, as in HF, that pad is still fed back as a valid token so later logits are defined.

Jit it with the model as an argument, e.g.
`nnx.jit(generate, static_argnames=("max_new_tokens", "eos_id", "pad_id", "top_k", "greedy"))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unified_mm.models.llm.qwen2 import KVCache, Qwen2


def prefill(
    model: Qwen2,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    position_ids: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs the prompt into a fresh cache; returns the logits [B, V] at each row's last valid token.

    Taking the last *valid* token (rather than slot T-1) keeps right-padded prompts usable: the
    pads are masked keys and do not advance positions, so decoding continues the valid text.
    """
    b, t, _ = inputs_embeds.shape
    cache = model.init_cache(b, t + max_new_tokens)
    hidden, cache = model(
        inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache
    )
    if attention_mask is None:
        last = jnp.full((b,), t - 1, jnp.int32)
    else:
        last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=1)
    return model.logits(hidden[jnp.arange(b), last]), cache


def _pick(
    logits: jax.Array,
    key: jax.Array | None,
    *,
    greedy: bool,
    temperature: float | jax.Array,
    top_k: int,
) -> jax.Array:
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _check_args(max_new_tokens: int, key: jax.Array | None, top_k: int, greedy: bool) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"decoding: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and key is None:
        raise ValueError("decoding: sampling (greedy=False) needs an explicit jax.random key")
    if top_k < 0:
        raise ValueError(f"decoding: top_k must be >= 0, got {top_k}")


def decode(
    model: Qwen2,
    cache: KVCache,
    first_logits: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    key: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    greedy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Decodes `max_new_tokens` tokens after a prefill; returns (ids [B, N], raw logits [B, N, V]).

    Token i is drawn from `first_logits` (i = 0) or from the logits after feeding token i-1.
    Sampling (greedy=False) uses `fold_in(key, i)` at step i, temperature and optional top-k.
    """
    _check_args(max_new_tokens, key, top_k, greedy)
    graphdef, state = nnx.split(model)

    def pick(logits, done, i):
        step_key = None if greedy else jax.random.fold_in(key, i)
        tok = _pick(logits, step_key, greedy=greedy, temperature=temperature, top_k=top_k)
        tok = jnp.where(done, jnp.int32(pad_id), tok)
        return tok, done | (tok == eos_id)

    def step(carry, i):
        cache, logits, done = carry
        tok, done = pick(logits, done, i)
        m = nnx.merge(graphdef, state)
        hidden, cache = m(m.embed(tok[:, None]), cache=cache)
        return (cache, m.logits(hidden[:, 0]), done), (tok, logits)

    done0 = jnp.zeros(first_logits.shape[:1], bool)
    carry = (cache, first_logits.astype(jnp.float32), done0)
    (_, last_logits, done), (toks, step_logits) = jax.lax.scan(
        step, carry, jnp.arange(max_new_tokens - 1)
    )
    last_tok, _ = pick(last_logits, done, max_new_tokens - 1)
    ids = jnp.concatenate([toks.T, last_tok[:, None]], axis=1)
    logits = jnp.concatenate([jnp.swapaxes(step_logits, 0, 1), last_logits[:, None]], axis=1)
    return ids, logits


def generate(
    model: Qwen2,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    key: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    greedy: bool = True,
    position_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Prefill + decode. Returns (new_ids [B, N], step_logits [B, N, V] float32, unprocessed).

    `position_ids` [B, T] optionally overrides the prompt positions (default cumsum(mask) - 1);
    generated tokens continue at (number of valid prompt tokens) + step.
    """
    _check_args(max_new_tokens, key, top_k, greedy)
    first_logits, cache = prefill(
        model,
        inputs_embeds,
        attention_mask,
        max_new_tokens=max_new_tokens,
        position_ids=position_ids,
    )
    return decode(
        model,
        cache,
        first_logits,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        key=key,
        temperature=temperature,
        top_k=top_k,
        greedy=greedy,
    )
