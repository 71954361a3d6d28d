"""Property-based tests (hypothesis) over the public API: bad or edge inputs either raise a
ValueError/TypeError that names the argument, or give a finite result that keeps the
contract (exactly k kept, the OBS optimality conditions, an honest status).

Shapes come from a small set and examples are bounded so that compiled functions are
reused across examples and the whole file stays near a minute on 2 cores.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iobs_jax as ij
from iobs_jax import optax as iox

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = ("float16", "float32", "float64")
SHAPES = ((8,), (4, 4), (2, 3, 2))


@st.composite
def arrays(draw, shapes=SHAPES, dtypes=DTYPES, nonfinite=True):
    """A random array: shape, dtype, scale 1e-30..1e30, optional NaN/inf entries."""
    shape = draw(st.sampled_from(shapes))
    dtype = draw(st.sampled_from(dtypes))
    exponent = draw(st.integers(-30, 30))
    seed = draw(st.integers(0, 2**16))
    values = np.random.default_rng(seed).normal(size=shape) * 10.0**exponent
    if nonfinite and draw(st.booleans()) and draw(st.booleans()):
        flat = values.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf]))
    with np.errstate(over="ignore", under="ignore"):
        return np.asarray(values, dtype)


def _raises_naming(fn, *names):
    """Run ``fn``; if it raises, the error must be a ValueError/TypeError naming one of
    ``names``. Returns the result or None."""
    try:
        return fn()
    except (ValueError, TypeError) as err:
        assert any(n in str(err) for n in names), (names, str(err))
        return None


# ------------------------------------------------------------------ masks


@SETTINGS
@given(x=arrays(), k=st.integers(-2, 20))
def test_topk_mask_exact_k_or_a_clear_error(x, k):
    mask = _raises_naming(lambda: ij.topk_mask(x, k), "scores", "k")
    if mask is None:
        assert np.isnan(x).any() or not 0 <= k <= x.size
        return
    mask = np.asarray(mask)
    assert mask.shape == x.shape and mask.dtype == bool and mask.sum() == k
    if 0 < k < x.size:
        assert x[mask].min() >= x[~mask].max()


@SETTINGS
@given(x=arrays(), k=st.integers(-1, 17))
def test_hard_threshold_keeps_the_k_largest_magnitudes(x, k):
    out = _raises_naming(lambda: ij.hard_threshold(x, k), "x", "k")
    if out is None:
        assert not np.isfinite(x).all() or not 0 <= k <= x.size
        return
    out = np.asarray(out)
    assert out.dtype == x.dtype and (out != 0).sum() <= k
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept])
    if kept.any() and (~kept).any():
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()


@SETTINGS
@given(x=arrays(shapes=((4, 8), (8, 4)), nonfinite=False), nm=st.sampled_from(
    [(0, 4), (1, 4), (2, 4), (4, 4), (1, 2), (3, 8), (2, 3)]), axis=st.sampled_from(
    [0, 1, -1, -2, 2, 1.0, "0"]))
def test_nm_mask_keeps_n_in_every_group(x, nm, axis):
    n, m = nm
    mask = _raises_naming(lambda: ij.nm_mask(x, n, m, axis=axis), "axis", "m=", "n", "m")
    if mask is None:
        return
    moved = np.moveaxis(np.asarray(mask), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    assert np.all(groups.sum(-1) == n)


# ------------------------------------------------------------------ OBS


def _spd(seed, d, scale=1.0):
    m = np.random.default_rng(seed).normal(size=(d, d))
    return (m @ m.T / d + 0.5 * np.eye(d)) * scale


def _brute_force_projection(theta, h, mask):
    """``theta_Q = theta~_Q + H_QQ^{-1} H_QP theta~_P`` in float64."""
    q, p = np.flatnonzero(mask), np.flatnonzero(~mask)
    out = np.zeros_like(theta)
    if q.size:
        out[q] = theta[q] + np.linalg.solve(h[np.ix_(q, q)], h[np.ix_(q, p)] @ theta[p])
    return out


@st.composite
def obs_problems(draw):
    d = draw(st.sampled_from((4, 6)))
    seed = draw(st.integers(0, 2**16))
    exponent = draw(st.integers(-30, 30))
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=d) * 10.0**exponent
    mask = rng.random(d) < 0.5
    return theta, _spd(seed, d, 10.0 ** draw(st.integers(-5, 5))), mask


@SETTINGS
@given(problem=obs_problems(), dtype=st.sampled_from(("float32", "float64")))
def test_obs_project_matches_brute_force(problem, dtype):
    theta, h, mask = problem
    want = _brute_force_projection(theta, h, mask)
    got = ij.obs_project(jnp.asarray(theta, dtype), jnp.asarray(h, dtype), jnp.asarray(mask))
    got = np.asarray(got, np.float64)
    assert np.all(got[~mask] == 0) and np.isfinite(got).all()
    scale = np.abs(theta).max()
    tol = 1e-9 if dtype == "float64" else 2e-3
    np.testing.assert_allclose(got, want, atol=tol * scale * 10, rtol=tol)


@SETTINGS
@given(problem=obs_problems(), dtype=st.sampled_from(("float32", "float64")))
def test_obs_project_from_inverse_matches_brute_force(problem, dtype):
    theta, h, mask = problem
    g = np.linalg.inv(h)
    if not np.isfinite(np.asarray(g, dtype)).all():
        return
    want = _brute_force_projection(theta, h, mask)
    got = _raises_naming(lambda: ij.obs_project_from_inverse(
        jnp.asarray(theta, dtype), jnp.asarray(g, dtype), jnp.asarray(mask)),
        "theta_tilde", "hessian_inverse")
    if got is None:  # beyond the dtype's range (e.g. 1e30 in float32): refused, not wrong
        assert dtype == "float32"
        return
    got = np.asarray(got, np.float64)
    scale = np.abs(theta).max()
    tol = 1e-9 if dtype == "float64" else 3e-3
    np.testing.assert_allclose(got, want, atol=tol * scale * 10, rtol=tol)


@SETTINGS
@given(problem=obs_problems(), k=st.integers(-1, 7),
       dtype=st.sampled_from(("float32", "float64")))
def test_greedy_obs_keeps_exactly_k_and_never_loses_to_topk(problem, k, dtype):
    theta, h, _ = problem
    d = theta.size
    g = np.linalg.inv(h)
    with np.errstate(over="ignore"):
        theta_d, g_d = np.asarray(theta, dtype), np.asarray(g, dtype)
    if not (np.isfinite(theta_d).all() and np.isfinite(g_d).all()):
        return
    res = _raises_naming(lambda: ij.greedy_obs(jnp.asarray(theta_d), jnp.asarray(g_d), k),
                         "k", "hessian_inverse", "theta_tilde", "greedy OBS")
    if res is None:
        assert not 0 <= k <= d or dtype == "float32"
        return
    out, mask = (np.asarray(v) for v in res)
    assert mask.sum() == k and np.all(out[~mask] == 0) and np.isfinite(out).all()
    # Against every support of size k (d <= 6): the OBS cost of greedy's support is at
    # most that of top-k |theta|, and its weights are the OBS projection onto it.
    cost = lambda m: float(theta[~m] @ np.linalg.solve(g[np.ix_(~m, ~m)], theta[~m])) \
        if (~m).any() else 0.0
    topk = np.zeros(d, bool)
    topk[np.argsort(-np.abs(theta), kind="stable")[:k]] = True
    assert cost(mask) <= cost(topk) * (1 + 1e-3) + 1e-300
    best = min(cost(np.isin(np.arange(d), c)) for c in itertools.combinations(range(d), k))
    assert cost(mask) >= best * (1 - 1e-3)  # a cost, never below the optimum
    want = _brute_force_projection(theta, h, mask)
    tol = 1e-6 if dtype == "float64" else 3e-3
    np.testing.assert_allclose(out, want, atol=tol * np.abs(theta).max() * 10, rtol=tol)


@SETTINGS
@given(theta=arrays(shapes=((8,),)), g=arrays(shapes=((8,),), dtypes=("float32", "float64")))
def test_obs_saliency_is_the_formula_or_a_clear_error(theta, g):
    out = _raises_naming(lambda: ij.obs_saliency(theta, g), "theta", "hinv_diag",
                         "OBS saliency")
    if out is None:
        return
    out = np.asarray(out)
    assert np.isfinite(out).all() and out.dtype in (np.float32, np.float64)
    want = theta.astype(np.float64) ** 2 / g.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-30)


# ------------------------------------------------------------------ curvature


def _quadratic(x, q, b):  # one function object: compiled once, not per example
    return 0.5 * x @ q @ x - b @ x


@SETTINGS
@given(seed=st.integers(0, 2**16), shift=st.sampled_from((0.0, -10.0)),
       hessian=st.sampled_from(("exact", "cg")), exponent=st.integers(-8, 8))
def test_newton_direction_solves_or_reports_an_indefinite_hessian(seed, shift, hessian,
                                                                  exponent):
    q = _spd(seed, 5) + shift * np.eye(5)  # shift -10: indefinite
    b = np.random.default_rng(seed + 1).normal(size=5) * 10.0**exponent
    x0 = jnp.zeros(5)
    out = _raises_naming(lambda: ij.newton_direction(
        _quadratic, x0, jnp.asarray(q), jnp.asarray(b), hessian=hessian, cg_tol=1e-12),
        "Newton direction")
    if out is None:
        assert np.linalg.eigvalsh(q).min() < 0
        return
    assert np.linalg.eigvalsh(q).min() > 0
    np.testing.assert_allclose(out, np.linalg.solve(q, -b), rtol=1e-5,
                               atol=1e-8 * np.abs(b).max())


# ------------------------------------------------------------------ solvers


SOLVERS = {
    "iht": lambda k: ij.IHT(ij.problems.mse_loss, k),
    "htp": lambda k: ij.IHT(ij.problems.mse_loss, k, variant="htp"),
    "iobs-topk": lambda k: ij.IOBS(ij.problems.mse_loss, k),
    "iobs-saliency": lambda k: ij.IOBS(ij.problems.mse_loss, k, selection="saliency"),
    "pursuit": lambda k: ij.OBSPursuit(k),
}


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SOLVERS)), dtype=st.sampled_from(("float32", "float64")),
       exponent=st.integers(-3, 3), seed=st.integers(0, 2**16),
       poison=st.sampled_from((None, np.nan, np.inf)))
def test_solvers_status_is_honest(name, dtype, exponent, seed, poison):
    prob = ij.problems.sparse_linear_regression(jax.random.key(seed), 32, 16, 3,
                                                dtype=dtype)
    y = prob.observations * 10.0**exponent
    if poison is not None:
        y = y.at[seed % 32].set(poison)
    x, state = SOLVERS[name](3).run(jnp.zeros(16, dtype), prob.design, y)
    x, status = np.asarray(x), int(state.status)
    assert np.isfinite(x).all() and (x != 0).sum() <= 3
    if poison is not None:
        assert status == ij.Status.NONFINITE
    elif status == ij.Status.SUCCESSFUL:
        x_true = np.asarray(prob.x_true) * 10.0**exponent
        rel = np.linalg.norm(x - x_true) / np.linalg.norm(x_true)
        # Success means converged; on these easy instances it also means recovered.
        assert rel < (1e-3 if dtype == "float32" else 1e-6) or name == "iht", rel


# ------------------------------------------------------------------ optax, Fisher pruning


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(sparsity=st.sampled_from((0.0, 0.25, 0.5, 0.9, 1.0, -0.1, float("nan"))),
       exponent=st.integers(-20, 20), seed=st.integers(0, 2**16),
       curvature=st.sampled_from(("fisher", "diagonal", None)),
       poison=st.booleans())
def test_optax_transforms_keep_the_count_or_skip_honestly(sparsity, exponent, seed,
                                                          curvature, poison):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(4, 4)) * 10.0**exponent, jnp.float32),
              "b": jnp.zeros(4, jnp.float32)}
    make = (lambda: iox.hard_threshold(sparsity)) if curvature is None else (
        lambda: iox.iobs(0.1, sparsity, curvature=curvature))
    tx = _raises_naming(make, "sparsity")
    if tx is None:
        assert not 0 <= sparsity < 1
        return
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    per_example = jax.tree.map(lambda g: jnp.stack([g, 2 * g, -g]), grads)
    if poison:
        per_example["w"] = per_example["w"].at[0, 0, 0].set(jnp.nan)
        grads["w"] = grads["w"].at[0, 0].set(jnp.nan)
    state = tx.init(params)
    extra = {} if curvature is None else {"per_example_grads": per_example}
    updates, state = tx.update(grads, state, params, **extra)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(new))
    if poison:
        assert int(state.skipped) == 1
        jax.tree.map(np.testing.assert_array_equal, new, params)
    else:
        assert int(state.skipped) == 0
        assert int(jnp.sum(new["w"] == 0)) >= round(sparsity * 16)
        assert int(jnp.sum(state.masks["w"])) == 16 - round(sparsity * 16)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(exponent=st.sampled_from((-18, -6, 0, 6, 18)), sparsity=st.sampled_from(
    (0.0, 0.5, 0.75)), seed=st.integers(0, 2**16))
def test_fisher_prune_reaches_the_sparsity_at_any_scale(exponent, sparsity, seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)) * 10.0**exponent, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    loss = lambda p, xi: jnp.sum((xi @ p["w"] - 1.0) ** 2)
    res = _raises_naming(lambda: ij.fisher_prune(loss, params, x, sparsity), "Fisher",
                         "gradient")
    if res is None:
        return
    pruned, report = res
    assert np.isfinite(np.asarray(pruned["w"])).all()
    assert report.sparsity == pytest.approx(round(sparsity * 24) / 24)
    assert int(jnp.sum(~report.masks["w"])) == round(sparsity * 24)
    assert np.all(np.asarray(pruned["w"])[~np.asarray(report.masks["w"])] == 0)
    assert np.isfinite(report.predicted_loss_increase) and report.predicted_loss_increase >= 0
