"""Gaussian diffusion of the MAR DiffLoss head (iDDPM / ADM / DiT lineage), as pure functions.

Schedules are computed in float64 numpy exactly like the official `GaussianDiffusion.__init__`
and `SpacedDiffusion` (harmon_mar.md 1.3): cosine alpha-bar, betas clipped at 0.999, respacing
with Python's half-to-even `round`, respaced betas recomputed from alphas_cumprod, the network
fed the ORIGINAL timestep through `timestep_map`. Per-call coefficients are float64 -> float32
casts of those tables (the official `_extract_into_tensor(...).float()`), and the diffusion state,
noise and losses stay float32 whatever the compute dtype of the network.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# model_fn(x_t [N, C] float32, t_net [N] int32) -> [N, 2C] float32 ([eps | v]).
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """iDDPM cosine schedule: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def linear_betas(num_steps: int) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Timesteps kept by respacing "100" / "10,15,20" / "ddimN" (official `space_timesteps`)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python round: half to even, as upstream
            cur += stride
        start += size
    return set(steps)


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """float64 tables of one (possibly respaced) diffusion; `timestep_map` gives network steps."""

    timestep_map: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    # What the network's first C channels predict: "epsilon" (MAR / guided-diffusion) or "v"
    # (Salimans & Ho 2022: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0).
    prediction: str = "epsilon"

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def table(self, name: str) -> jax.Array:
        """float32 device copy of a table (what `_extract_into_tensor(...).float()` reads)."""
        return jnp.asarray(np.asarray(getattr(self, name)).astype(np.float32))


PREDICTIONS = ("epsilon", "v")


def _schedule_from_betas(
    betas: np.ndarray, timestep_map: np.ndarray, prediction: str = "epsilon"
) -> DiffusionSchedule:
    betas = np.asarray(betas, dtype=np.float64)
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("diffusion betas must lie in (0, 1]")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = (
        np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
    )
    return DiffusionSchedule(
        timestep_map=np.asarray(timestep_map, dtype=np.int32),
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        prediction=prediction,
    )


@functools.lru_cache(maxsize=32)
def make_schedule(
    respacing: str = "",
    *,
    noise_schedule: str = "cosine",
    diffusion_steps: int = 1000,
    prediction: str = "epsilon",
) -> DiffusionSchedule:
    """`create_diffusion(timestep_respacing=respacing, noise_schedule=...)` tables (cached);
    `prediction` "v" makes the network predict v instead of epsilon ("epsilon" is MAR)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r} ({' or '.join(PREDICTIONS)})")
    if noise_schedule == "cosine":
        base = cosine_betas(diffusion_steps)
    elif noise_schedule == "linear":
        base = linear_betas(diffusion_steps)
    else:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r} (cosine or linear)")
    use = space_timesteps(diffusion_steps, respacing or [diffusion_steps])
    base_ac = np.cumprod(1.0 - base, axis=0)
    last, new_betas, tmap = 1.0, [], []
    for i, a in enumerate(base_ac):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            tmap.append(i)
    return _schedule_from_betas(np.array(new_betas), np.array(tmap), prediction)


def _at(s: DiffusionSchedule, name: str, t: jax.Array) -> jax.Array:
    return s.table(name)[t][:, None]


def q_sample(s: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    return (
        _at(s, "sqrt_alphas_cumprod", t) * x0 + _at(s, "sqrt_one_minus_alphas_cumprod", t) * noise
    )


def epsilon_from_output(
    s: DiffusionSchedule, pred: jax.Array, x_t: jax.Array, t: jax.Array
) -> jax.Array:
    """The epsilon a network output means: itself, or sqrt(1 - ab) x_t + sqrt(ab) v. Affine in
    the output with the same x_t for both CFG halves, so guiding v guides epsilon identically."""
    if s.prediction == "epsilon":
        return pred
    return (
        _at(s, "sqrt_one_minus_alphas_cumprod", t) * x_t + _at(s, "sqrt_alphas_cumprod", t) * pred
    )


def q_posterior(s: DiffusionSchedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = _at(s, "posterior_mean_coef1", t) * x0 + _at(s, "posterior_mean_coef2", t) * xt
    return mean, _at(s, "posterior_log_variance_clipped", t)


def p_mean_variance(
    s: DiffusionSchedule,
    model_out: jax.Array,
    x: jax.Array,
    t: jax.Array,
    clip_denoised: float | None = None,
) -> dict[str, jax.Array]:
    """Learned-range variance + epsilon prediction.

    clip_denoised: None is MAR's `clip_denoised=False` (latents are unbounded); a value c clips
    the predicted x_0 to [-c, c] before the posterior mean, guided-diffusion's option for
    bounded (pixel) data.
    """
    c = x.shape[-1]
    eps, var_values = epsilon_from_output(s, model_out[:, :c], x, t), model_out[:, c:]
    min_log = _at(s, "posterior_log_variance_clipped", t)
    max_log = _at(s, "log_betas", t)
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    pred_x0 = (
        _at(s, "sqrt_recip_alphas_cumprod", t) * x - _at(s, "sqrt_recipm1_alphas_cumprod", t) * eps
    )
    if clip_denoised is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_denoised, clip_denoised)
    mean = _at(s, "posterior_mean_coef1", t) * pred_x0 + _at(s, "posterior_mean_coef2", t) * x
    return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0}


def p_sample(
    s: DiffusionSchedule,
    model_out: jax.Array,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    temperature: float | jax.Array = 1.0,
    clip_denoised: float | None = None,
) -> dict[str, jax.Array]:
    """x_{t-1} = mean + [t != 0] exp(log_var / 2) * noise * temperature (temperature scales
    only this per-step noise, harmon_mar.md pitfall 7)."""
    out = p_mean_variance(s, model_out, x, t, clip_denoised)
    nonzero = (t != 0).astype(jnp.float32)[:, None]
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
    return {**out, "sample": sample}


def p_sample_loop(
    s: DiffusionSchedule,
    model_fn: ModelFn,
    init_noise: jax.Array,
    step_noise: jax.Array | Callable[[jax.Array], jax.Array],
    temperature: float | jax.Array = 1.0,
    clip_denoised: float | None = None,
) -> jax.Array:
    """Ancestral sampler over all respaced steps, as one `lax.fori_loop`.

    init_noise [N, C] is x_T. step_noise holds the per-step draws in the order the official loop
    makes them (index 0 = the first, noisiest step; the t = 0 draw is multiplied by zero): an
    array [S, N, C] (the injection point of the parity tests) or a function k -> [N, C].
    """
    n_steps = s.num_timesteps
    if not callable(step_noise) and step_noise.shape[0] != n_steps:
        raise ValueError(f"step_noise has {step_noise.shape[0]} steps, the schedule {n_steps}")
    tmap = jnp.asarray(s.timestep_map)
    n = init_noise.shape[0]

    def body(k, x):
        i = n_steps - 1 - k
        t = jnp.full((n,), i, jnp.int32)
        out = model_fn(x, tmap[t]).astype(jnp.float32)
        noise = step_noise(k) if callable(step_noise) else step_noise[k]
        return p_sample(s, out, x, t, noise, temperature, clip_denoised)["sample"]

    return jax.lax.fori_loop(0, n_steps, body, init_noise.astype(jnp.float32))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of 1/255-wide bins (an image-space assumption MAR applies to latents)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def training_losses(
    s: DiffusionSchedule, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array
) -> dict[str, jax.Array]:
    """Per-row `mse + vb` (loss type MSE with learned-range variance).

    mse compares the first C output channels with epsilon (or with v when s.prediction is "v").
    vb is the KL(q || p) in bits (or the discretised NLL at t = 0), computed with a
    stop-gradient prediction so it trains only the variance channels.
    """
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(s, x0, t, noise)
    out = model_fn(x_t, jnp.asarray(s.timestep_map)[t]).astype(jnp.float32)
    c = x0.shape[-1]
    pred, var_values = out[:, :c], out[:, c:]
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
    true_mean, true_logvar = q_posterior(s, x0, x_t, t)
    p = p_mean_variance(s, frozen, x_t, t)
    ln2 = np.float32(np.log(2.0))
    kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]).mean(axis=-1) / ln2
    nll = -discretized_gaussian_log_likelihood(
        x0, means=p["mean"], log_scales=0.5 * p["log_variance"]
    )
    nll = nll.mean(axis=-1) / ln2
    vb = jnp.where(t == 0, nll, kl)
    if s.prediction == "epsilon":
        target = noise
    else:
        target = (
            _at(s, "sqrt_alphas_cumprod", t) * noise
            - _at(s, "sqrt_one_minus_alphas_cumprod", t) * x0
        )
    mse = jnp.mean((target - pred) ** 2, axis=-1)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
