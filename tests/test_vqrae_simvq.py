"""SimVQ quantizer against a NumPy reference computation (vqrae_rae.md 1.3, pitfall 15)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unified_mm.models.vqrae.config import SimVQConfig
from unified_mm.models.vqrae.metrics import CodeUsage
from unified_mm.models.vqrae.simvq import Codebook, SimVQ, code_perplexity, code_usage

D_IN, D_OUT, K, E = 6, 5, 16, 8


def _rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))  # rbg init compiles faster than threefry


def _reference(z, w_in, b_in, c, w, b, beta, legacy):
    """SimVQ forward in float64 NumPy: z_e = z W_in + b; codes = C W + b; argmin L2; losses."""
    z_e = z.astype(np.float64) @ w_in + b_in
    codes = c.astype(np.float64) @ w + b
    dist = (z_e**2).sum(-1, keepdims=True) + (codes**2).sum(-1) - 2 * z_e @ codes.T
    ids = dist.argmin(-1)
    z_q = codes[ids]
    commit = codebook = np.mean((z_q - z_e) ** 2)
    loss = commit + beta * codebook if legacy else beta * commit + codebook
    return ids, z_e, z_q, loss


@pytest.fixture(scope="module")
def data():
    z = np.random.default_rng(0).normal(size=(3, 7, D_IN)).astype(np.float32)
    return z


def _params(q: SimVQ):
    f = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    return (
        f(q.proj_in.kernel),
        f(q.proj_in.bias),
        f(q.codebook),
        f(q.code_proj.kernel),
        f(q.code_proj.bias),
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_simvq_matches_numpy(data, legacy):
    cfg = SimVQConfig(codebook_size=K, code_dim=E, beta=0.25, legacy_beta_placement=legacy)
    q = SimVQ(cfg, D_IN, D_OUT, rngs=_rngs(1))
    # Non-zero biases so that a missing bias term would show.
    q.proj_in.bias.set_value(jnp.linspace(-0.3, 0.3, E))
    out, ids, loss, metrics = q(jnp.asarray(data))
    r_ids, _, r_zq, r_loss = _reference(data, *_params(q), 0.25, legacy)
    np.testing.assert_array_equal(np.asarray(ids), r_ids)
    assert ids.dtype == jnp.int32 and ids.shape == (3, 7)
    # The decoder input is proj_out(z_q) in the forward value.
    w_out, b_out = np.asarray(q.proj_out.kernel[...]), np.asarray(q.proj_out.bias[...])
    np.testing.assert_allclose(np.asarray(out), r_zq @ w_out + b_out, atol=1e-5)
    np.testing.assert_allclose(float(loss), r_loss, rtol=1e-5)
    # The two terms are equal in value (1.25 x MSE either way); the placement is checked through the
    # gradients in the next test.
    assert float(metrics["vq/commit_loss"]) == pytest.approx(float(metrics["vq/codebook_loss"]))


@pytest.mark.parametrize("legacy", [False, True])
def test_simvq_beta_placement_in_gradients(data, legacy):
    cfg = SimVQConfig(codebook_size=K, code_dim=E, beta=0.25, legacy_beta_placement=legacy)
    q = SimVQ(cfg, D_IN, D_OUT, rngs=_rngs(1))
    z_e = q.proj_in(jnp.asarray(data))
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)

    def loss_of(p):
        return nnx.merge(graphdef, p, rest)(jnp.asarray(data))[2]

    g = jax.grad(loss_of)(params)
    ids, z_q = q.lookup(z_e)
    diff = np.asarray(z_q - z_e, np.float64)
    n = diff.size
    # d/dW of codebook_weight * mean((C[ids] W + b - sg(z_e))^2): only the chosen rows contribute.
    cb_w = 0.25 if legacy else 1.0
    onehot = np.eye(K)[np.asarray(ids).reshape(-1)]
    c = np.asarray(q.codebook[...], np.float64)
    ref_gw = cb_w * 2.0 / n * (onehot @ c).T @ diff.reshape(-1, E)
    np.testing.assert_allclose(
        np.asarray(g["code_proj"]["kernel"][...]), ref_gw, rtol=1e-4, atol=1e-7
    )
    # d/dz_e of commit_weight * mean((sg(z_q) - z_e)^2), pushed through proj_in's bias.
    cm_w = 1.0 if legacy else 0.25
    ref_gb = cm_w * 2.0 / n * (-diff).reshape(-1, E).sum(0)
    np.testing.assert_allclose(np.asarray(g["proj_in"]["bias"][...]), ref_gb, rtol=1e-4, atol=1e-7)
    assert "codebook" not in g  # C is a frozen Codebook variable, not a Param
    assert isinstance(q.codebook, Codebook)


def test_straight_through_gradient_is_identity(data):
    q = SimVQ(SimVQConfig(codebook_size=K, code_dim=E), D_IN, D_OUT, rngs=_rngs(2))
    x = jnp.asarray(data)
    cot = jax.random.normal(jax.random.key(0), (3, 7, D_OUT))

    # Gradient of <out, cot> w.r.t. z_e through the quantizer == through the identity map.
    def through_vq(z_e):
        _, z_q = q.lookup(z_e)
        z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
        return jnp.sum(q.proj_out(z_st) * cot)

    def identity(z_e):
        return jnp.sum(q.proj_out(z_e) * cot)

    z_e = q.proj_in(x)
    np.testing.assert_allclose(jax.grad(through_vq)(z_e), jax.grad(identity)(z_e), atol=1e-6)
    # And the module's own forward uses that estimator: d out / d z is nonzero and equals identity's.
    g_mod = jax.grad(lambda z: jnp.sum(q(z)[0] * cot))(x)
    g_ref = jax.grad(lambda z: identity(q.proj_in(z)))(x)
    np.testing.assert_allclose(g_mod, g_ref, atol=1e-6)


def test_decode_ids_through_cw(data):
    q = SimVQ(SimVQConfig(codebook_size=K, code_dim=E), D_IN, D_OUT, rngs=_rngs(3))
    out, ids, _, _ = q(jnp.asarray(data))
    np.testing.assert_allclose(np.asarray(q.decode_ids(ids)), np.asarray(out), atol=1e-6)
    _, z_q = q.lookup(q.proj_in(jnp.asarray(data)))
    np.testing.assert_allclose(np.asarray(q.codes(ids)), np.asarray(z_q), atol=1e-6)
    raw = np.asarray(q.codebook[...])[np.asarray(ids)]  # raw C is NOT the code
    assert np.abs(raw - np.asarray(z_q)).max() > 1e-3


def test_code_metrics():
    ids = jnp.array([[0, 1, 1, 3]], jnp.int32)
    assert float(code_usage(ids, 8)) == pytest.approx(3 / 8)
    p = np.array([0.25, 0.5, 0.25])
    assert float(code_perplexity(ids, 8)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    u = CodeUsage(8)
    u.update(ids)
    u.update(np.array([7]))
    assert u.utilisation() == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="ids outside"):
        u.update(np.array([8]))
