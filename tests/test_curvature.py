"""Hessian-vector products, dense Hessians, Newton directions and curvature objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_spd

import iobs_jax as ij


def logistic_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, -y * logits)) + 0.1 * jnp.sum(params["w"] ** 4)


@pytest.fixture
def logistic_problem(rng):
    x = jnp.asarray(rng.normal(size=(30, 5)))
    y = jnp.asarray(np.sign(rng.normal(size=30)))
    params = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(0.3)}
    return params, x, y


def test_hvp_equals_dense_hessian_times_vector_on_pytree(rng, logistic_problem):
    params, x, y = logistic_problem
    v = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(-1.2)}
    got = ij.hvp(logistic_loss, params, v, x, y)
    h = ij.dense_hessian(logistic_loss, params, x, y)
    flat_v, unravel = jax.flatten_util.ravel_pytree(v)
    expected = unravel(h @ flat_v)
    np.testing.assert_allclose(got["w"], expected["w"], atol=1e-12)
    np.testing.assert_allclose(got["b"], expected["b"], atol=1e-12)
    # Central finite differences of the gradient as an independent check.
    eps = 1e-6
    grad = jax.grad(logistic_loss)
    plus = grad(jax.tree.map(lambda p, d: p + eps * d, params, v), x, y)
    minus = grad(jax.tree.map(lambda p, d: p - eps * d, params, v), x, y)
    np.testing.assert_allclose(got["w"], (plus["w"] - minus["w"]) / (2 * eps), atol=1e-6)


def test_dense_hessian_of_a_quadratic_is_its_matrix(rng):
    q = random_spd(rng, 6)
    f = lambda z: 0.5 * z @ q @ z + jnp.sum(z)
    np.testing.assert_allclose(ij.dense_hessian(f, jnp.zeros(6)), q, atol=1e-12)


@pytest.mark.parametrize("hessian", ["exact", "cg"])
def test_newton_step_solves_a_quadratic(rng, hessian):
    q = random_spd(rng, 8)
    c = rng.normal(size=8)
    f = lambda z, q, c: 0.5 * (z - c) @ q @ (z - c)
    x0 = jnp.asarray(rng.normal(size=8))
    step = ij.newton_direction(f, x0, q, c, hessian=hessian, cg_tol=1e-14, cg_maxiter=100)
    np.testing.assert_allclose(x0 - step, c, atol=1e-8)


def test_newton_direction_exact_equals_cg_with_damping(logistic_problem):
    params, x, y = logistic_problem
    exact = ij.newton_direction(logistic_loss, params, x, y, damping=0.1)
    cg = ij.newton_direction(logistic_loss, params, x, y, hessian="cg", damping=0.1,
                             cg_tol=1e-14, cg_maxiter=100)
    np.testing.assert_allclose(exact["w"], cg["w"], atol=1e-9)
    h = np.asarray(ij.dense_hessian(logistic_loss, params, x, y)) + 0.1 * np.eye(6)
    g = jax.flatten_util.ravel_pytree(jax.grad(logistic_loss)(params, x, y))[0]
    flat = jax.flatten_util.ravel_pytree(exact)[0]
    np.testing.assert_allclose(flat, np.linalg.solve(h, g), atol=1e-10)


def test_newton_direction_with_callable_hessian(rng):
    q = random_spd(rng, 5)
    f = lambda z: 0.5 * z @ q @ z
    x0 = jnp.asarray(rng.normal(size=5))
    as_matrix = ij.newton_direction(f, x0, hessian=lambda z: jnp.asarray(q))
    as_operator = ij.newton_direction(f, x0, hessian=lambda z: (lambda v: q @ v), cg_tol=1e-14)
    np.testing.assert_allclose(as_matrix, x0, atol=1e-10)
    np.testing.assert_allclose(as_operator, x0, atol=1e-8)
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        ij.newton_direction(f, x0, hessian=lambda z: jnp.eye(4))
    with pytest.raises(ValueError, match="hessian must be one of"):
        ij.newton_direction(f, x0, hessian="exactly")


def test_dense_curvature_solves_inverse_and_masked_solve(rng):
    h = random_spd(rng, 7)
    curv = ij.DenseCurvature(jnp.asarray(h), damping=0.25)
    a = h + 0.25 * np.eye(7)
    b = rng.normal(size=7)
    np.testing.assert_allclose(curv.matvec(b), a @ b, atol=1e-12)
    np.testing.assert_allclose(curv.solve(b), np.linalg.solve(a, b), atol=1e-10)
    np.testing.assert_allclose(curv.inverse(), np.linalg.inv(a), atol=1e-10)
    np.testing.assert_allclose(curv.inverse_diag(), np.diag(np.linalg.inv(a)), atol=1e-10)
    np.testing.assert_allclose(curv.mean_diag(), np.mean(np.diag(a)), atol=1e-12)
    mask = np.array([True, False, True, True, False, True, False])
    z = np.zeros(7)
    z[mask] = np.linalg.solve(a[np.ix_(mask, mask)], b[mask])
    np.testing.assert_allclose(curv.masked_solve(jnp.asarray(mask), b), z, atol=1e-10)
    # With the support size given statically the gathered (4, 4) system gives the same.
    np.testing.assert_allclose(curv.masked_solve(jnp.asarray(mask), b, 4), z, atol=1e-10)
    gathered = jax.jit(curv.masked_solve, static_argnums=2)(jnp.asarray(mask), b, 4)
    np.testing.assert_allclose(gathered, z, atol=1e-10)
    np.testing.assert_array_equal(curv.masked_solve(jnp.zeros(7, bool), b, 0), np.zeros(7))
    full = curv.masked_solve(jnp.ones(7, bool), b, 7)
    np.testing.assert_allclose(full, np.linalg.solve(a, b), atol=1e-10)
    free = ij.OperatorCurvature(lambda v: jnp.asarray(h) @ v, 7, jnp.float64, 0.25, cg_tol=1e-14)
    np.testing.assert_allclose(free.masked_solve(jnp.asarray(mask), b), z, atol=1e-9)
    with pytest.raises(ValueError, match="matrix-free"):
        free.inverse_diag()


def test_matrix_free_mean_diag_is_a_close_trace_estimate(rng):
    h = random_spd(rng, 200)
    free = ij.OperatorCurvature(lambda v: jnp.asarray(h) @ v, 200, jnp.float64)
    np.testing.assert_allclose(free.mean_diag(), np.mean(np.diag(h)), rtol=0.1)


def test_power_iteration_estimates_largest_eigenvalue(rng):
    h = random_spd(rng, 30)
    lam = ij.power_iteration(lambda v: jnp.asarray(h) @ v, 30, jnp.float64, num_iters=300)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(h)[-1], rtol=1e-3)


def test_conjugate_gradient_is_exact_on_spd_and_finite_below_precision(rng):
    h = random_spd(rng, 12)
    b = rng.normal(size=12)
    x = ij.conjugate_gradient(lambda v: jnp.asarray(h) @ v, jnp.asarray(b), tol=1e-14,
                              maxiter=100)
    np.testing.assert_allclose(x, np.linalg.solve(h, b), atol=1e-9)
    h32 = jnp.asarray(h, jnp.float32)
    x32 = ij.conjugate_gradient(lambda v: h32 @ v, jnp.asarray(b, jnp.float32), tol=1e-13,
                                maxiter=500)
    assert x32.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x32)))
    np.testing.assert_allclose(x32, np.linalg.solve(h, b), rtol=1e-3, atol=1e-3)
    zero = ij.conjugate_gradient(lambda v: h32 @ v, jnp.zeros(12, jnp.float32))
    assert not bool(jnp.any(zero))


def test_row_batched_cg_step_equals_one_cg_per_row(rng):
    """The one CG recurrence with a row-wise inner product (the layer-wise refit's use)
    runs an independent CG per column of a slab: equal to cg_solve on each system."""
    from iobs_jax.core.curvature import CGState, cg_solve, cg_step

    d, rows, iters = 6, 4, 4
    hs = np.stack([random_spd(rng, d) for _ in range(rows)])  # one system per column
    b = jnp.asarray(rng.normal(size=(d, rows)))
    apply = lambda p: jnp.einsum("rij,jr->ir", jnp.asarray(hs), p)
    rowdot = lambda u, v: jnp.sum(u * v, axis=0, keepdims=True)
    state = CGState(jnp.zeros_like(b), b, b, rowdot(b, b))
    for _ in range(iters):
        state, alpha, _ = cg_step(state, apply(state.p), rowdot)
        assert alpha.shape == (1, rows)
    for r in range(rows):
        h = jnp.asarray(hs[r])
        one = cg_solve(lambda v, h=h: h @ v, b[:, r], tol=0.0, maxiter=iters)
        np.testing.assert_allclose(state.x[:, r], one, rtol=1e-10, atol=1e-12)
    state = CGState(jnp.zeros_like(b), b, b, rowdot(b, b))
    for _ in range(d):  # d steps of exact arithmetic solve a d x d system
        state, _, _ = cg_step(state, apply(state.p), rowdot)
    exact = np.stack([np.linalg.solve(hs[r], b[:, r]) for r in range(rows)], axis=1)
    np.testing.assert_allclose(state.x, exact, rtol=1e-6, atol=1e-8)


def test_cholesky_inverse_is_the_inverse(rng):
    from iobs_jax.core.curvature import cholesky_inverse

    h = random_spd(rng, 7)
    np.testing.assert_allclose(cholesky_inverse(jnp.linalg.cholesky(jnp.asarray(h))),
                               np.linalg.inv(h), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ij.DenseCurvature(jnp.asarray(h)).inverse(), np.linalg.inv(h),
                               rtol=1e-9, atol=1e-12)


def test_newton_direction_raises_on_indefinite_hessian_instead_of_nan():
    f = lambda x: jnp.sum(3.0 * jnp.sin(x) - 0.1 * x**2)  # Hessian indefinite at (1.5, -1.5)
    with pytest.raises(ValueError, match="not positive definite"):
        ij.newton_direction(f, jnp.array([1.5, -1.5]))


def test_dense_curvature_factors_16_bit_matrices_in_float32(rng):
    h = random_spd(rng, 6)
    curv = ij.DenseCurvature(jnp.asarray(h, jnp.bfloat16), damping=0.1)
    assert curv.dtype == jnp.float32
    b = rng.normal(size=6)
    ref = np.linalg.solve(np.asarray(jnp.asarray(h, jnp.bfloat16), np.float64) + 0.1 * np.eye(6), b)
    np.testing.assert_allclose(curv.solve(jnp.asarray(b, jnp.bfloat16)), ref, rtol=0.05, atol=0.05)
