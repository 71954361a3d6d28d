"""Oracles for the layer-wise pruning math (float64, small layers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iobs_jax
from iobs_jax import _layerwise as lw


def _layer(rows=6, cols=12, samples=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, cols)) @ rng.standard_normal((cols, cols)) * 0.5
    h = jnp.asarray(x.T @ x / samples)
    w0 = jnp.asarray(rng.standard_normal((rows, cols)))
    return w0, lw.damp_hessian(h, 0.01), h


def _random_mask(shape, keep, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random(shape) < keep)


def _constrained_lstsq(t, mask, h):
    """Per row: minimize (w - t)^T H (w - t) with w = 0 off the mask (dense numpy solve)."""
    t, mask, h = np.asarray(t), np.asarray(mask), np.asarray(h)
    out = np.zeros_like(t)
    for r in range(t.shape[0]):
        q = np.flatnonzero(mask[r])
        if q.size:
            out[r, q] = np.linalg.solve(h[np.ix_(q, q)], (h @ t[r])[q])
    return out


@pytest.mark.parametrize("keep", [0.85, 0.3], ids=["removed-form", "kept-form"])
def test_refit_equals_per_row_constrained_least_squares(keep):
    w0, hd, _ = _layer()
    mask = _random_mask(w0.shape, keep, 1)
    w = lw.refit(w0, mask, hd)
    np.testing.assert_allclose(w, _constrained_lstsq(w0, mask, hd), rtol=1e-9, atol=1e-9)
    assert np.all(np.asarray(w)[~np.asarray(mask)] == 0)


def test_refit_matches_core_obs_projection_row_by_row():
    w0, hd, _ = _layer(rows=3)
    mask = _random_mask(w0.shape, 0.5, 2)
    w = lw.refit(w0, mask, hd)
    for r in range(3):
        np.testing.assert_allclose(w[r], iobs_jax.obs_project(w0[r], hd, mask[r]), atol=1e-9)


def test_restricted_inverse_diagonal_estimate():
    w0, hd, _ = _layer()
    g = np.linalg.inv(np.asarray(hd))
    # Exact when one weight per row is removed (a single Schur complement step).
    one = np.ones(w0.shape, bool)
    one[np.arange(6), np.arange(6) * 2] = False
    est = np.asarray(lw.restricted_inverse_diag(jnp.asarray(g), hd, jnp.asarray(one)))
    for r in range(6):
        q = np.flatnonzero(one[r])
        exact = np.diag(np.linalg.inv(np.asarray(hd)[np.ix_(q, q)]))
        np.testing.assert_allclose(est[r, q], exact, rtol=1e-8)
    # Otherwise an estimate inside the exact bounds 1/H_jj <= . <= G_jj.
    mask = _random_mask(w0.shape, 0.4, 3)
    est = np.asarray(lw.restricted_inverse_diag(jnp.asarray(g), hd, mask))
    assert np.all(est >= 1 / np.diag(np.asarray(hd)) - 1e-12)
    assert np.all(est <= np.diag(g)[None, :] + 1e-12)


def test_refit_cg_converges_to_the_exact_refit():
    w0, hd, _ = _layer(rows=8, cols=20)
    mask = _random_mask(w0.shape, 0.5, 4)
    exact = lw.refit(w0, mask, hd)
    w, iters = lw.refit_cg(w0, mask, hd, lw._inverse(hd), tol=1e-12, maxiter=100)
    np.testing.assert_allclose(w, exact, atol=1e-8)
    assert int(iters) <= 20  # CG is exact after at most |Q| <= cols steps


def _sparsegpt_reference(w0, hd, mask):
    """Plain column-by-column SparseGPT with a fixed mask (no blocks, no lazy updates)."""
    w = np.array(w0, dtype=np.float64)
    u = np.linalg.cholesky(np.linalg.inv(np.asarray(hd))).T
    for j in range(w.shape[1]):
        q = np.where(np.asarray(mask)[:, j], w[:, j], 0.0)
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
        w[:, j] = q
    return w


def test_sparsegpt_equals_column_reference_and_ignores_block_size():
    w0, hd, _ = _layer(cols=10)
    mask = _random_mask(w0.shape, 0.5, 5)
    ref = _sparsegpt_reference(w0, hd, mask)
    for block in (1, 3, 4, 10, 128):
        w, m = lw.sparsegpt(w0, hd, 0.5, blocksize=block, mask=mask)
        np.testing.assert_allclose(w, ref, atol=1e-10, err_msg=f"blocksize={block}")
        assert np.array_equal(m, mask)


def test_sparsegpt_chooses_exact_sparsity_and_valid_nm():
    w0, hd, _ = _layer(rows=5, cols=16)
    w, mask = lw.sparsegpt(w0, hd, 0.75, blocksize=8)
    assert int(mask.sum()) == 20 and np.all(np.asarray(w)[~np.asarray(mask)] == 0)
    w, mask = lw.sparsegpt(w0, hd, 0.5, nm=(2, 4), blocksize=8)
    assert np.all(np.asarray(mask).reshape(5, 4, 4).sum(-1) == 2)


def _obc_reference(w0, hd, k):
    g0 = np.linalg.inv(np.asarray(hd))
    out = np.zeros_like(np.asarray(w0))
    for r, w in enumerate(np.array(w0)):
        g, removed = g0.copy(), np.zeros(w.size, bool)
        for _ in range(w.size - k):
            with np.errstate(divide="ignore", invalid="ignore"):  # removed: G_pp = 0
                sal = np.where(removed, np.inf, w**2 / np.diag(g))
            p = int(np.argmin(sal))
            w = w - w[p] / g[p, p] * g[:, p]
            g = g - np.outer(g[:, p], g[p, :]) / g[p, p]
            removed[p] = True
            w[removed] = 0.0
        out[r] = w
    return out


def test_obc_equals_rank_one_reference():
    w0, hd, _ = _layer(rows=4, cols=10)
    w, mask = lw.obc(w0, hd, 0.6)
    np.testing.assert_allclose(w, _obc_reference(w0, hd, 4), atol=1e-9)
    assert np.all(np.asarray(mask).sum(1) == 4)


def test_iobs_one_step_is_saliency_mask_plus_exact_refit():
    w0, hd, h = _layer(rows=6, cols=12)
    w, mask = lw.iobs(w0, hd, 0.5, solver="cholesky")
    sal = np.asarray(w0) ** 2 / np.diag(np.linalg.inv(np.asarray(hd)))[None, :]
    expect_mask = np.zeros(sal.size, bool)
    expect_mask[np.argsort(-sal.ravel(), kind="stable")[:36]] = True
    assert np.array_equal(mask, expect_mask.reshape(6, 12))
    np.testing.assert_allclose(w, _constrained_lstsq(w0, mask, hd), atol=1e-9)
    # the fast CG projection reaches the same loss
    w_cg, _ = lw.iobs(w0, hd, 0.5, cg_tol=1e-10)
    np.testing.assert_allclose(w_cg, w, atol=1e-7)


def test_iobs_beats_sparsegpt_and_rounds_approach_obc():
    w0, hd, h = _layer(rows=16, cols=24, samples=200, seed=7)
    loss = lambda w: float(lw.layer_loss(w, w0, hd))
    sgpt = loss(lw.sparsegpt(w0, hd, 0.75)[0])
    one = loss(lw.iobs(w0, hd, 0.75, scope="row")[0])
    rounds = loss(lw.iobs(w0, hd, 0.75, scope="row", rounds=6)[0])
    obc = loss(lw.obc(w0, hd, 0.75)[0])
    assert one < sgpt and rounds <= one and obc <= rounds * 1.05


def test_iobs_iterations_keep_the_best_held_out_iterate():
    w0, hd, h = _layer(rows=6, cols=12, seed=3)
    _, h_val_raw = _layer(rows=6, cols=12, seed=4)[1:]
    w1, m1 = lw.iobs(w0, hd, 0.5, solver="cholesky")
    # eta = 1 is a fixed point: more iterations return the same answer
    w3, m3 = lw.iobs(w0, hd, 0.5, iterations=3, solver="cholesky")
    np.testing.assert_allclose(w3, w1, atol=1e-9)
    w_half, _ = lw.iobs(w0, hd, 0.5, iterations=4, step_size=0.5, h_val=h_val_raw,
                        solver="cholesky")
    candidates, w_t = [], w0
    for _ in range(4):
        target = w_t - 0.5 * (w_t - w0)
        w_t, _ = lw.iobs(target, hd, 0.5, solver="cholesky")
        candidates.append(float(lw.layer_loss(w_t, w0, h_val_raw)))
    assert float(lw.layer_loss(w_half, w0, h_val_raw)) <= min(candidates) + 1e-9


@pytest.mark.parametrize("method", ["magnitude", "wanda", "iobs"])
def test_masks_have_exact_counts_for_every_scope_and_pattern(method):
    w0, hd, _ = _layer(rows=4, cols=16)
    fn = lw.METHODS[method]
    _, m = fn(w0, hd, 0.75, "layer", None)
    assert int(m.sum()) == 16
    _, m = fn(w0, hd, 0.75, "row", None)
    assert np.all(np.asarray(m).sum(1) == 4)
    _, m = fn(w0, hd, 0.5, "row", (2, 4))
    assert np.all(np.asarray(m).reshape(4, 4, 4).sum(-1) == 2)


def test_singular_hessian_is_handled_by_damping():
    w0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)))
    h = jnp.zeros((8, 8)).at[:4, :4].set(jnp.eye(4))  # 4 inputs never active
    hd = lw.damp_hessian(h, 0.01)
    for method in ("sparsegpt", "iobs"):
        w, _ = lw.METHODS[method](w0, hd, 0.5)
        assert np.all(np.isfinite(w))
    w, mask = lw.iobs(w0, lw.damp_hessian(jnp.zeros((8, 8)), 0.01), 0.5)
    assert np.all(np.isfinite(w))  # all-zero H: identity, i.e. magnitude


def test_refit_is_jit_and_vmap_safe_for_a_fixed_support():
    w0, hd, _ = _layer()
    mask = _random_mask(w0.shape, 0.5, 9)
    eager = lw.refit(w0, mask, hd)
    traced = jax.jit(lambda w, m: lw.refit(w, m, hd))(w0, mask)
    np.testing.assert_allclose(traced, eager, atol=1e-9)
