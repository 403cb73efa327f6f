"""Masked-autoregressive sampling (Harmon text-to-image, MAR class-conditional) and image-to-text.

One jittable function per task with static shapes and no Python loop over AR steps at run time:
the AR steps are a `jax.lax.scan`, the DDPM steps inside each a `jax.lax.fori_loop`.

Static schedule: the cosine mask schedule depends only on (L, num_iter), so the number of tokens
predicted at each step is known when tracing. Each step gathers the predicted positions of every
row (ascending position order, padded to the largest per-step count K) and samples them with the
DiffLoss head; writes go back through a mask over all L positions.

CFG (harmon_mar.md 2.5, pitfall 6): rows are [cond; null]; orders, masks and the canvas of the null
half are copies of the cond half; the initial DDPM noise is shared `cat([n, n])`; guidance acts on
eps. Temperature scales only the per-step DDPM noise.

Injection point: `ARDraws` holds the random orders, the initial noise per AR step [num_iter, B, K, C]
and the per-step DDPM noise [num_iter, S, R, K, C] (R = 2B with CFG, else B), in the layout of the
padded prediction slots; the parity tests fill it with the official recorded draws. Without it,
everything is drawn from `key`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unified_mm.models.harmon.diffloss import DiffLoss
from unified_mm.models.harmon.mar import MAR, cosine_mask_schedule, mask_by_order, sample_orders
from unified_mm.models.llm.decoding import generate

if TYPE_CHECKING:
    from unified_mm.models.harmon.harmon import Harmon


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """AR sampler settings (Harmon defaults: 64 steps, constant cfg 3.0, temperature 1.0).

    segments: the AR steps are run as this many consecutive scans, each compiled for its own
    static bounds (visible tokens, predicted tokens per step). 1 compiles one step body padded to
    the largest bounds; more segments trade compile time for less padded compute (at 64 steps and
    1024 tokens, 4 segments halve the encoder / LLM rows).
    """

    num_iter: int = 64
    cfg: float = 3.0
    cfg_schedule: str = "constant"  # or "linear" (MAR default)
    temperature: float = 1.0
    image_shape: tuple[int, int] | None = None  # latent grid (m, n); None: the learned grid
    segments: int = 1

    def __post_init__(self):
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(
                f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}"
            )
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if not 1 <= self.segments <= self.num_iter:
            raise ValueError(
                f"segments must be in [1, num_iter={self.num_iter}], got {self.segments}"
            )

    @property
    def use_cfg(self) -> bool:
        return self.cfg != 1.0


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first AR step
    stop: int  # one past the last AR step
    max_visible: int  # static visible-token bound of the encoder in these steps
    max_pred: int  # static prediction slots per row in these steps


@dataclasses.dataclass(frozen=True)
class ARPlan:
    """Static per-step quantities of the AR loop (they depend only on L and the settings)."""

    seq_len: int
    counts: np.ndarray  # [num_iter + 1] masked tokens entering each step (then 0)
    pred_counts: np.ndarray  # [num_iter] tokens predicted per row at each step
    cfg_values: np.ndarray  # [num_iter] float32 guidance scale per step
    segments: tuple[Segment, ...]

    @property
    def max_pred(self) -> int:
        """K: prediction slots per row (the ARDraws noise layout)."""
        return max(seg.max_pred for seg in self.segments)

    @property
    def max_visible(self) -> int:
        return max(seg.max_visible for seg in self.segments)

    @classmethod
    def make(cls, seq_len: int, s: SampleSettings) -> ARPlan:
        counts, mask_lens = cosine_mask_schedule(seq_len, s.num_iter)
        pred = (counts[:-1] - counts[1:]).astype(np.int32)
        if s.cfg_schedule == "linear":
            # Official float32 tensor arithmetic: 1 + (cfg - 1) * (L - mask_len) / L.
            ml = mask_lens.astype(np.float32)
            span = (np.float32(seq_len) - ml) / np.float32(seq_len)
            cfgs = np.float32(1) + np.float32(s.cfg - 1) * span
        else:
            cfgs = np.full((s.num_iter,), s.cfg, np.float32)
        segments = []
        for steps in np.array_split(np.arange(s.num_iter), s.segments):
            a, z = int(steps[0]), int(steps[-1]) + 1
            # Visible tokens grow with the step: the last step of a segment sees the most.
            segments.append(
                Segment(a, z, seq_len - int(counts[z - 1]), max(int(pred[a:z].max()), 1))
            )
        return cls(seq_len, counts, pred, cfgs.astype(np.float32), tuple(segments))


class ARDraws(struct.PyTreeNode):
    """Pre-drawn randomness of one AR sampling call: the injection point (parity tests).

    Noise is laid out in prediction slots: row r, slot j = the j-th predicted position of that
    row in ascending order (slots past the step's count are ignored).
    """

    orders: jax.Array  # [B, L] int32, cond rows
    init_noise: jax.Array  # [num_iter, B or R, K, C]: B rows with CFG (shared by halves), else R
    step_noise: jax.Array  # [num_iter, S, R, K, C]


def draw_ar_draws(
    key: jax.Array, batch: int, plan: ARPlan, s: SampleSettings, token_dim: int, ddpm_steps: int
) -> ARDraws:
    """Materialised draws (memory num_iter x S x R x K x C floats; the key path of the samplers
    draws the same kinds of noise step by step instead)."""
    k1, k2, k3 = jax.random.split(key, 3)
    rows = 2 * batch if s.use_cfg else batch
    k = plan.max_pred
    return ARDraws(
        orders=sample_orders(k1, batch, plan.seq_len),
        init_noise=jax.random.normal(k2, (s.num_iter, batch, k, token_dim), jnp.float32),
        step_noise=jax.random.normal(k3, (s.num_iter, ddpm_steps, rows, k, token_dim), jnp.float32),
    )


class _Noise:
    """Per-AR-step noise from injected ARDraws, or drawn lazily from a key (no big arrays)."""

    def __init__(
        self, draws: ARDraws | None, key: jax.Array | None, init_rows: int, rows: int, c: int
    ):
        self.draws, self.init_rows, self.rows, self.c = draws, init_rows, rows, c
        if draws is None:
            self.k_init, self.k_step = jax.random.split(key)

    def init(self, i, k: int) -> jax.Array:
        if self.draws is not None:
            return self.draws.init_noise[i][:, :k].reshape(-1, self.c)
        return jax.random.normal(jax.random.fold_in(self.k_init, i), (self.init_rows * k, self.c))

    def steps(self, i, k: int):
        if self.draws is not None:
            arr = self.draws.step_noise[i][:, :, :k]
            return arr.reshape(arr.shape[0], self.rows * k, self.c)
        key = jax.random.fold_in(self.k_step, i)
        return lambda j: jax.random.normal(jax.random.fold_in(key, j), (self.rows * k, self.c))


# z_fn(tokens [R, L, C], mask [R, L], max_visible) -> (z [R, L, D], aux dict of trace arrays)
ZFn = Callable[[jax.Array, jax.Array, int], tuple[jax.Array, dict[str, jax.Array]]]


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def ar_loop(
    z_fn: ZFn,
    diffloss: DiffLoss,
    orders: jax.Array,
    noise: _Noise,
    plan: ARPlan,
    s: SampleSettings,
    *,
    token_dim: int,
    buffer_size: int,
    trace: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """The AR canvas loop shared by Harmon and MAR. Returns (tokens [R, L, C], trace or None);
    the trace stacks per-step arrays on a leading num_iter axis (padded to the largest bounds)."""
    b, ll = orders.shape
    rows = 2 * b if s.use_cfg else b
    counts = jnp.asarray(plan.counts)
    cfg_values = jnp.asarray(plan.cfg_values)
    orders = orders.astype(jnp.int32)

    def both(x):  # cond-half array -> all rows (the null half copies the cond half)
        return jnp.concatenate([x, x], axis=0) if s.use_cfg else x

    def make_step(seg: Segment):
        k = seg.max_pred

        def step(carry, i):
            tokens, mask = carry
            z, aux = z_fn(tokens, both(mask), seg.max_visible)
            mask_next = mask_by_order(orders, counts[i + 1])
            pred = jnp.logical_and(mask > 0, mask_next == 0)  # last step: every remaining one
            # Slots: the predicted positions of each row in ascending order, padded to k.
            slot_pos = jnp.argsort(jnp.logical_not(pred).astype(jnp.int32), axis=1, stable=True)
            zsel = jnp.take_along_axis(z, both(slot_pos[:, :k])[..., None], axis=1)  # [R, k, D]
            sampled = diffloss.sample(
                zsel.reshape(rows * k, -1),
                noise.init(i, k),
                noise.steps(i, k),
                temperature=s.temperature,
                cfg=cfg_values[i],
                use_cfg=s.use_cfg,
            ).reshape(rows, k, token_dim)
            # Write back with a gather: predicted position p reads slot rank(p) of its row.
            slot_of = jnp.clip(jnp.cumsum(pred, axis=1) - 1, 0, k - 1)
            new = jnp.take_along_axis(sampled[:b], slot_of[..., None], axis=1)
            cond_tokens = jnp.where(pred[..., None], new.astype(tokens.dtype), tokens[:b])
            out = {}
            if trace:
                kk, nv = plan.max_pred, buffer_size + plan.max_visible
                out = {
                    "z": z,
                    "mask_in": both(mask),
                    "tokens_in": tokens,
                    "pred": pred,
                    "slot_valid": jnp.arange(kk)[None, :] < pred.sum(axis=1, keepdims=True),
                    "dl_z": _pad_axis(zsel, 1, kk),
                    "sampled": _pad_axis(sampled, 1, kk),
                    "cfg": cfg_values[i],
                    "x_enc": _pad_axis(aux["x_enc"], 1, nv),
                    "x_enc_valid": _pad_axis(aux["x_enc_valid"], 1, nv),
                }
            return (both(cond_tokens), mask_next), out

        return step

    carry = (jnp.zeros((rows, ll, token_dim), jnp.float32), jnp.ones((b, ll), jnp.float32))
    traces = []
    for seg in plan.segments:  # a few static segments, each one lax.scan
        carry, ys = jax.lax.scan(make_step(seg), carry, jnp.arange(seg.start, seg.stop))
        traces.append(ys)
    ys = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *traces) if trace else None
    return carry[0], ys


def _orders_and_noise(draws, key, batch, s, token_dim, seq_len):
    rows = 2 * batch if s.use_cfg else batch
    init_rows = batch if s.use_cfg else rows
    if draws is not None:
        return draws.orders, _Noise(draws, None, init_rows, rows, token_dim)
    if key is None:
        raise ValueError("sampling needs either draws (injected) or a jax.random key")
    k_ord, k_noise = jax.random.split(key)
    return sample_orders(k_ord, batch, seq_len), _Noise(None, k_noise, init_rows, rows, token_dim)


def sample_t2i(
    model: Harmon,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    settings: SampleSettings,
    key: jax.Array | None = None,
    draws: ARDraws | None = None,
    trace: bool = False,
) -> dict[str, jax.Array]:
    """Harmon.sample: input_ids / attention_mask [R, T] right-padded, rows [cond; null] when
    settings.cfg != 1. Returns {"images": [B, H, W, 3] cond half, "tokens": [R, h, w, C]}, plus
    "trace" (per-step arrays stacked on a leading num_iter axis) when trace=True.
    """
    cfg = model.cfg
    s = settings
    m, n = s.image_shape or (cfg.mar.seq_h, cfg.mar.seq_w)
    ll = m * n
    rows = input_ids.shape[0]
    if s.use_cfg and rows % 2:
        raise ValueError(f"CFG sampling needs [cond; null] rows, got an odd batch of {rows}")
    b = rows // 2 if s.use_cfg else rows
    plan = ARPlan.make(ll, s)
    c = cfg.mar.token_embed_dim
    orders, noise = _orders_and_noise(draws, key, b, s, c, ll)

    # Prefill the text once (attention_mask=None, positions 0..T-1 like the official call), then
    # mark the right padding invalid: every AR step attends to [text mask, image rows].
    t_len = input_ids.shape[1]
    n_img = cfg.mar.buffer_size + plan.max_visible  # cache slots for the largest segment
    cache = model.llm.init_cache(rows, t_len + n_img)
    _, cache = model.llm(model.llm.embed(input_ids), cache=cache)
    text_mask = attention_mask.astype(bool)
    cache = cache.replace(key_mask=cache.key_mask.at[:, :t_len].set(text_mask))

    def z_fn(tokens, mask, max_visible):
        # Each step reuses the prefilled cache and drops the new entries (= curtail_cache).
        x_enc, valid = model.forward_mae_encoder(
            tokens.reshape(rows, m, n, c),
            mask,
            attention_mask=text_mask,
            cache=cache,
            max_visible=max_visible,
        )
        z = model.forward_mae_decoder(x_enc, mask, image_shape=(m, n))
        return z, {"x_enc": x_enc, "x_enc_valid": valid}

    tokens, ys = ar_loop(
        z_fn,
        model.mar.diffloss,
        orders,
        noise,
        plan,
        s,
        token_dim=c,
        buffer_size=cfg.mar.buffer_size,
        trace=trace,
    )
    tokens = tokens.reshape(rows, m, n, c)
    out = {"images": model.decode(tokens[:b]), "tokens": tokens}
    if trace:
        out["trace"] = ys
    return out


def sample_mar(
    mar: MAR,
    labels: jax.Array | None,
    *,
    settings: SampleSettings,
    key: jax.Array | None = None,
    draws: ARDraws | None = None,
    trace: bool = False,
) -> dict[str, jax.Array]:
    """LTH14 MAR.sample_tokens (class-conditional, learned grid): class_emb(labels) in the
    buffers of the cond rows, fake_latent in the null rows. labels [B] or None (unconditional,
    needs the batch size through `draws`). Returns {"tokens": [B, h, w, C]} (+ "trace")."""
    cfg = mar.cfg
    s = settings
    m, n = s.image_shape or (cfg.seq_h, cfg.seq_w)
    ll = m * n
    plan = ARPlan.make(ll, s)
    c = cfg.token_embed_dim
    if labels is None and draws is None:
        raise ValueError("unconditional sample_mar needs draws (they carry the batch size)")
    b = labels.shape[0] if labels is not None else draws.orders.shape[0]
    orders, noise = _orders_and_noise(draws, key, b, s, c, ll)
    cond = mar.class_emb(labels) if labels is not None else mar.null_buffer_embeds(b)
    bufs = jnp.concatenate([cond, mar.null_buffer_embeds(b)], axis=0) if s.use_cfg else cond

    def z_fn(tokens, mask, max_visible):
        x_enc, valid = mar.forward_mae_encoder(
            tokens, mask, bufs, image_shape=(m, n), max_visible=max_visible
        )
        return mar.forward_mae_decoder(x_enc, mask, image_shape=(m, n)), {
            "x_enc": x_enc,
            "x_enc_valid": valid,
        }

    tokens, ys = ar_loop(
        z_fn,
        mar.diffloss,
        orders,
        noise,
        plan,
        s,
        token_dim=c,
        buffer_size=cfg.buffer_size,
        trace=trace,
    )
    out = {"tokens": tokens[:b].reshape(b, m, n, c)}
    if trace:
        out["trace"] = ys
    return out


def image_to_text(
    model: Harmon,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """scripts/image2text.py: VAE -> MAR encoder (all tokens visible) -> proj_in -> splice into
    the placeholder span -> Qwen2 decoding. Returns (new ids [B, N], step logits [B, N, V])."""
    embeds = model.understanding_embeds(images, input_ids)
    return generate(
        model.llm,
        embeds,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_id=model.cfg.eos_token_id,
        pad_id=model.cfg.pad_token_id,
        key=key,
        temperature=temperature,
        top_k=top_k,
        greedy=greedy,
    )
