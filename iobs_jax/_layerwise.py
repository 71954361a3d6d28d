"""Layer-wise pruning of one linear layer: magnitude, Wanda, SparseGPT, OBC and I-OBS.

For a layer with dense weights ``W0`` of shape ``(rows, cols)`` (rows = outputs) and
calibration inputs ``X`` (``cols`` features, ``N`` samples) the layer loss is

    L(W) = ||W X - W0 X||_F^2 / N = tr((W - W0) H (W - W0)^T),   H = X X^T / N.

Every row is an independent OBS problem sharing ``H``. All functions here take
``(W0, H)`` as arrays (float32 or float64), are pure and jit-compatible, and return
``(W, mask)`` with ``mask`` True on kept weights. The model-level driver is
:func:`iobs_jax.prune`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import cho_solve

from ._masks import _topk_mask_flat, nm_mask
from ._obs import greedy_obs_unchecked

# Rows are solved in chunks: a (rows, k, k) batch of gathered blocks does not fit in
# cache (or memory) for wide layers, and lax.map keeps one compiled body.
_ROW_CHUNK = 32


@jax.jit
def damp_hessian(h: jax.Array, damping: float) -> jax.Array:
    """``H + damping * mean(diag H) * I`` (SparseGPT's relative damping).

    Inputs that are always zero make ``H`` singular (blank MNIST pixels, padded
    features); relative damping keeps every solve well posed. An all-zero ``H`` gets
    the identity, so a layer that never saw a non-zero input degrades to magnitude.
    """
    mean = jnp.mean(jnp.diagonal(h))
    lam = jnp.where(mean > 0, damping * mean, 1.0)
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)


@jax.jit
def layer_loss(w: jax.Array, w0: jax.Array, h: jax.Array) -> jax.Array:
    """``tr((W - W0) H (W - W0)^T)``: the layer's mean squared output error."""
    delta = (w - w0).astype(h.dtype)
    return jnp.sum((delta @ h) * delta)


class LayerStats(NamedTuple):
    """Calibration statistics of one layer, averaged over ``N`` samples (token positions).

    ``h = X X^T / N`` of the inputs the layer receives in the (partly pruned) model; with
    dense-output targets also ``cross = X_d X^T / N`` and ``hd = X_d X_d^T / N``, ``X_d``
    the inputs the same layer receives in the dense model (else both None).
    """

    h: jax.Array
    cross: jax.Array | None = None
    hd: jax.Array | None = None


@jax.jit
def target_loss(w: jax.Array, w0: jax.Array, stats: LayerStats) -> jax.Array:
    """``||W X - W0 X_d||^2 / N``: the layer's error against the dense model's outputs.

    Equals :func:`layer_loss` ``(w, w0, h)`` when there are no cross statistics
    (``X_d = X``). Expanded: ``tr(W H W^T) - 2 tr(W C^T W0^T) + tr(W0 H_d W0^T)``.
    """
    if stats.cross is None:
        return layer_loss(w, w0, stats.h)
    w, w0 = w.astype(stats.h.dtype), w0.astype(stats.h.dtype)
    value = (jnp.sum((w @ stats.h) * w) - 2.0 * jnp.sum(w * (w0 @ stats.cross))
             + jnp.sum((w0 @ stats.hd) * w0))
    return jnp.maximum(value, 0.0)  # rounding can make an exact fit slightly negative


@jax.jit
def dense_target(w0: jax.Array, stats: LayerStats, h_damped: jax.Array) -> jax.Array:
    """The dense least-squares point for dense-model targets: ``W0 C (H + lambda I)^{-1}``.

    ``||W X - W0 X_d||^2 = tr((W - W~) H (W - W~)^T) + const`` with ``W~ H = W0 C``, so
    every method that minimizes ``tr((W - W0) H (W - W0)^T)`` minimizes the dense-target
    loss when given ``W~`` in place of ``W0``: the layer then also corrects the error its
    pruned predecessors left in its inputs.
    """
    rhs = (w0.astype(h_damped.dtype) @ stats.cross).T
    chol = jnp.linalg.cholesky(h_damped)
    return cho_solve((chol, True), rhs).T


def keep_count(size: int, sparsity: float) -> int:
    """Number of weights kept out of ``size`` at ``sparsity`` (the pruned count is rounded)."""
    return size - int(round(sparsity * size))


def select_mask(
    scores: jax.Array, sparsity: float, scope: str, nm: tuple[int, int] | None
) -> jax.Array:
    """Keep the largest ``scores`` of a ``(rows, cols)`` layer.

    ``scope="layer"``: one top-k over the whole layer; ``"row"``: the same count in every
    row; ``nm=(n, m)``: ``n`` of every ``m`` consecutive inputs in each row (``sparsity``
    is then ``1 - n/m`` and ignored). Ties go to the lower index.
    """
    rows, cols = scores.shape
    if nm is not None:
        return nm_mask(scores, nm[0], nm[1], axis=1)
    if scope == "row":
        k = keep_count(cols, sparsity)
        return jax.vmap(lambda s: _topk_mask_flat(s, k))(scores)
    k = keep_count(rows * cols, sparsity)
    return _topk_mask_flat(scores.reshape(-1), k).reshape(rows, cols)


# --------------------------------------------------------------------------- refit


def _padded_support(mask_row: jax.Array, size: int):
    """Indices of the True entries padded to ``size`` and a validity vector."""
    idx = jnp.nonzero(mask_row, size=size, fill_value=0)[0]
    valid = jnp.arange(size) < jnp.sum(mask_row)
    return idx, valid


def _gathered_cholesky(a: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """Cholesky of ``a[idx][:, idx]`` with padded slots replaced by the identity."""
    v = valid.astype(a.dtype)
    block = a[idx[:, None], idx[None, :]] * v[:, None] * v[None, :]
    return jnp.linalg.cholesky(block + jnp.diag(1.0 - v))


def _refit_kept(h, target, mask, size):
    """Q-form: ``w_Q = t_Q + H_QQ^{-1} (H (t * (1 - m)))_Q`` (correction form)."""

    def one(t, m):
        idx, valid = _padded_support(m, size)
        chol = _gathered_cholesky(h, idx, valid)
        rhs = (h @ jnp.where(m, 0.0, t))[idx] * valid
        z = cho_solve((chol, True), rhs) * valid
        return jnp.where(m, t, 0.0).at[idx].add(z * valid)

    return one


def _refit_removed(g, target, mask, size):
    """P-form: ``w = t - G[:, P] (G_PP)^{-1} t_P`` with ``G = H^{-1}``."""

    def one(t, m):
        idx, valid = _padded_support(~m, size)
        chol = _gathered_cholesky(g, idx, valid)
        y = cho_solve((chol, True), t[idx] * valid) * valid
        gp = g[:, idx] * valid[None, :]
        return jnp.where(m, t - gp @ y, 0.0)

    return one


def refit(
    target: jax.Array,
    mask: jax.Array,
    h: jax.Array,
    g: jax.Array | None = None,
) -> jax.Array:
    """Per-row OBS projection of ``target`` onto ``mask`` under the metric ``H``.

    Row ``r`` solves ``min_w (w - t_r)^T H (w - t_r)`` subject to ``w = 0`` off
    ``mask[r]``; with ``t = W0`` this is the exact least-squares refit of the layer on
    the support. Each row's system is gathered and factored by Cholesky, batched over
    rows in chunks; the smaller of the kept block ``H_QQ`` and the removed block
    ``G_PP`` (``G = H^{-1}``) is factored, so the cost is
    ``rows * min(|Q|, |P|)^3 / 3``.

    Args:
      target: ``(rows, cols)``.
      mask: ``(rows, cols)`` bool, True = kept.
      h: ``(cols, cols)`` damped (positive definite) Hessian.
      g: its inverse, if already computed (needed for the removed form).

    Returns:
      The projected weights, exact zeros off the mask.
    """
    cols = h.shape[0]
    counts = jnp.sum(mask, axis=1)
    # Concrete sizes pick the form and the padding; under a trace fall back to the worst
    # case (the kept form padded to the full width).
    try:
        kmax = int(jnp.max(counts))
        pmax = cols - int(jnp.min(counts))
    except jax.errors.ConcretizationTypeError:
        kmax, pmax = cols, cols + 1
    if pmax == 0:
        return target
    if kmax == 0:
        return jnp.zeros_like(target)
    if pmax < kmax:
        g = _inverse(h) if g is None else g
        return _refit_rows(g, target, mask, _bucket(pmax, cols), True)
    return _refit_rows(h, target, mask, _bucket(kmax, cols), False)


def _bucket(size: int, cols: int) -> int:
    # Round padded sizes up so successive calls reuse a few compiled shapes.
    return min(cols, -(-size // 16) * 16)


@functools.partial(jax.jit, static_argnames=("size", "removed_form"))
def _refit_rows(a, target, mask, size, removed_form):
    make = _refit_removed if removed_form else _refit_kept
    one = make(a, target, mask, size)
    return lax.map(lambda tm: one(*tm), (target, mask), batch_size=_ROW_CHUNK)


@functools.partial(jax.jit, static_argnames=("maxiter",))
def refit_cg(target, mask, h, g, tol=1e-4, maxiter=100):
    """:func:`refit` by preconditioned CG on all rows at once (matrix-multiply bound).

    Solves ``H_QQ delta_Q = (H (t * (1 - m)))_Q`` for every row simultaneously with the
    masked operator ``Z -> ((Z * M) @ H) * M`` and the preconditioner
    ``R -> ((R * M) @ G) * M`` (``G_QQ``, exact when nothing is pruned; on MNIST layers it
    reaches the exact refit's loss to 1e-3 in about 20 iterations at 50% sparsity,
    against hundreds for Jacobi). Stops when every row's preconditioned residual norm is
    below ``tol`` times its initial value in total over rows, or after ``maxiter`` iterations. Each
    iteration is two ``(rows, cols) @ (cols, cols)`` products: no per-row gathers or
    factorizations, which on CPU cost ~10x more than the products for the same answer.

    Returns ``(w, iterations)``.
    """
    m = mask.astype(h.dtype)
    t = target.astype(h.dtype)

    def op(z):
        return ((z * m) @ h) * m

    def prec(r):
        return ((r * m) @ g) * m

    def rowdot(a, b):
        return jnp.sum(a * b, axis=1, keepdims=True)

    b = ((t * (1.0 - m)) @ h) * m
    z = prec(b)
    rz = rowdot(b, z)
    # One criterion for the layer: the loss is a sum over rows, so rows with a tiny
    # right-hand side need not be solved to the same relative accuracy as the others.
    stop = (tol**2) * jnp.sum(rz)
    tiny = jnp.finfo(h.dtype).tiny

    def cond(carry):
        _, _, _, rz, it = carry
        return (it < maxiter) & (jnp.sum(rz) > stop)

    def body(carry):
        x, r, p, rz, it = carry
        ap = op(p)
        alpha = rz / jnp.maximum(rowdot(p, ap), tiny)
        x = x + alpha * p
        r = r - alpha * ap
        z = prec(r)
        rz_new = rowdot(r, z)
        p = z + (rz_new / jnp.maximum(rz, tiny)) * p
        return x, r, p, rz_new, it + 1

    init = (jnp.zeros_like(t), b, z, rz, jnp.zeros((), jnp.int32))
    x, _, _, _, it = lax.while_loop(cond, body, init)
    return (t * m + x * m).astype(target.dtype), it


@jax.jit
def _inverse(h: jax.Array) -> jax.Array:
    chol = jnp.linalg.cholesky(h)
    return cho_solve((chol, True), jnp.eye(h.shape[0], dtype=h.dtype))


# ----------------------------------------------------------------------- methods


@functools.partial(jax.jit, static_argnames=("sparsity", "scope", "nm"))
def magnitude(w0, h, sparsity, scope="layer", nm=None):
    """Keep the largest ``|w|`` (no compensation)."""
    del h
    mask = select_mask(jnp.abs(w0), sparsity, scope, nm)
    return jnp.where(mask, w0, 0.0), mask


@functools.partial(jax.jit, static_argnames=("sparsity", "scope", "nm"))
def wanda(w0, h, sparsity, scope="row", nm=None):
    """Wanda: keep the largest ``|w_ij| * ||x_j||`` (per output row by default)."""
    scores = jnp.abs(w0) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))[None, :]
    mask = select_mask(scores, sparsity, scope, nm)
    return jnp.where(mask, w0, 0.0), mask


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "blocksize"))
def sparsegpt(w0, h, sparsity, nm=None, blocksize=128, mask=None):
    """SparseGPT (Frantar & Alistarh 2023): blocked OBS with lazy updates.

    With ``U`` the upper Cholesky factor of ``G = H^{-1}`` (``G = U^T U``), columns are
    processed left to right; inside a block of ``blocksize`` columns the mask is chosen
    by ``w^2 / U_jj^2`` over the block (all rows together; for N:M every ``m`` columns
    per row), and pruning column ``j`` applies ``W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]``.
    Updates to the columns right of the block are applied once per block (one matmul).
    ``mask`` fixes the support (then the result does not depend on ``blocksize``).
    """
    rows, cols = w0.shape
    u = jnp.linalg.cholesky(_inverse(h)).T  # upper: G = U^T U
    fixed = mask is not None
    nblocks = math.ceil(cols / blocksize)
    w = w0
    masks = []
    for b in range(nblocks):
        i1, i2 = b * blocksize, min(cols, (b + 1) * blocksize)
        ub = u[i1:i2, i1:i2]
        wb = w[:, i1:i2]
        if fixed:
            mb = mask[:, i1:i2]
        elif nm is None:
            score = wb**2 / jnp.diagonal(ub)[None, :] ** 2
            k = keep_count(score.size, sparsity)
            mb = _topk_mask_flat(score.reshape(-1), k).reshape(score.shape)
        else:
            mb = jnp.ones_like(wb, dtype=bool)  # chosen inside the column loop
        qb, errb, mb = _sparsegpt_block(wb, ub, mb, nm if not fixed else None)
        masks.append(mb)
        w = w.at[:, i1:i2].set(qb)
        if i2 < cols:
            w = w.at[:, i2:].add(-errb @ u[i1:i2, i2:])
    return w, jnp.concatenate(masks, axis=1)


def _sparsegpt_block(wb, ub, mb, nm):
    width = wb.shape[1]

    def body(i, carry):
        wb, mb, errb = carry
        if nm is not None:
            n, m = nm

            def choose(mb):
                cols = lax.dynamic_slice_in_dim(wb, i, m, axis=1)
                d = lax.dynamic_slice_in_dim(jnp.diagonal(ub), i, m)
                keep = nm_mask(cols**2 / d[None, :] ** 2, n, m, axis=1)
                return lax.dynamic_update_slice_in_dim(mb, keep, i, axis=1)

            mb = lax.cond(i % m == 0, choose, lambda mb: mb, mb)
        col = wb[:, i]
        keep = mb[:, i]
        q = jnp.where(keep, col, 0.0)
        err = (col - q) / ub[i, i]
        # U is upper triangular, so this only touches columns >= i.
        wb = wb - err[:, None] * ub[i][None, :]
        wb = wb.at[:, i].set(q)
        errb = errb.at[:, i].set(err)
        return wb, mb, errb

    wb, mb, errb = lax.fori_loop(0, width, body, (wb, mb, jnp.zeros_like(wb)))
    return wb, errb, mb


@functools.partial(jax.jit, static_argnames=("sparsity",))
def obc(w0, h, sparsity):
    """Exact greedy OBS per row (OBC, Frantar et al. 2022): the quality reference.

    Every row removes its ``cols - k`` least salient weights one at a time with rank-one
    updates of its own inverse Hessian: ``O(rows * cols^3)`` time.
    """
    cols = w0.shape[1]
    k = keep_count(cols, sparsity)
    g = _inverse(h)

    def one(t):
        return greedy_obs_unchecked(t, g, k, safeguard=False)

    return lax.map(one, w0, batch_size=_ROW_CHUNK)


def iobs(
    w0,
    h,
    sparsity,
    scope="layer",
    nm=None,
    rounds=1,
    iterations=1,
    step_size=1.0,
    h_val=None,
    solver="cg",
    val_loss=None,
    cg_tol=1e-3,
    cg_maxiter=200,
):
    """I-OBS for one layer: Newton-like step, OBS-saliency mask, exact OBS refit.

    For this loss ``H^{-1} grad L(W_t) = W_t - W0``, so one I-OBS iteration is

        W~ = W_t - eta (W_t - W0),   mask = top-k of W~^2 / diag(G),
        W_{t+1} = per-row OBS projection of W~ onto mask under H   (:func:`refit`).

    From the dense start with ``eta = 1`` the step lands on ``W0`` and one iteration is
    "whole-layer saliency + exact refit". ``rounds > 1`` reaches the final support in
    several rounds (kept fraction shrinking geometrically); each later round ranks the
    kept weights by ``w^2 / [(H_QQ)^{-1}]_jj``, the inverse restricted to the row's current
    support (estimated by :func:`restricted_inverse_diag`), which approaches OBC's greedy
    order at a few batched solves' cost (N:M masks
    are chosen in one round: ``rounds`` does not apply to them).
    ``iterations > 1`` repeats the step from the sparse iterate; with ``h_val`` (the
    Hessian of held-out calibration inputs) the iterate with the lowest held-out loss is
    returned, otherwise the last one; ``val_loss(W)`` (a callable) replaces ``h_val``
    when the held-out loss is not ``layer_loss(W, W0, h_val)`` (dense-output targets).

    ``solver="cg"`` projects with :func:`refit_cg` (default: fast, loss within about
    ``cg_tol`` of exact); ``"cholesky"`` with the exact batched :func:`refit`.
    """

    g = _inverse(h)
    w_t, best = w0, None
    for _ in range(iterations):
        if solver == "cg":
            # One compiled program per layer shape: step, support, projection.
            w_t, mask = _step(w_t, w0, h, g, step_size, sparsity, scope, nm, rounds, cg_tol,
                              cg_maxiter)
        else:
            target = w_t - step_size * (w_t - w0)
            mask = _support(target, h, g, sparsity, scope, nm, rounds, cg_tol, cg_maxiter)
            w_t = refit(target, mask, h, g)
        if val_loss is None and h_val is not None:
            val_loss = functools.partial(layer_loss, w0=w0, h=h_val)
        if val_loss is not None:
            val = float(val_loss(w_t))
            if best is None or val < best[0]:
                best = (val, w_t, mask)
    if best is not None:
        return best[1], best[2]
    return w_t, mask


_STATIC = ("sparsity", "scope", "nm", "rounds", "cg_tol", "cg_maxiter")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _step(w_t, w0, h, g, step_size, sparsity, scope, nm, rounds, cg_tol, cg_maxiter):
    target = w_t - step_size * (w_t - w0)
    mask = _support(target, h, g, sparsity, scope, nm, rounds, cg_tol, cg_maxiter)
    return refit_cg(target, mask, h, g, cg_tol, cg_maxiter)[0], mask


@functools.partial(jax.jit, static_argnames=_STATIC)
def _support(target, h, g, sparsity, scope, nm, rounds, cg_tol, cg_maxiter):
    """The I-OBS mask: top-k OBS saliency, reached in ``rounds`` shrinking supports.

    Round ``r`` keeps a fraction ``(1 - sparsity)^(r / rounds)``, ranking the weights of
    the current support by ``w^2 / [(H_QQ)^{-1}]_jj`` with ``w`` the refit on that support.
    """
    gdiag = jnp.broadcast_to(jnp.diagonal(g), target.shape)
    if nm is not None or rounds == 1:
        return select_mask(target**2 / gdiag, sparsity, scope, nm)
    keep = 1.0 - sparsity
    current = jnp.ones(target.shape, bool)
    w = target
    for r in range(1, rounds + 1):
        scores = jnp.where(current, w**2 / gdiag, -jnp.inf)
        current = select_mask(scores, 1.0 - keep ** (r / rounds), scope, None)
        if r < rounds:
            w = refit_cg(target, current, h, g, cg_tol, cg_maxiter)[0]
            gdiag = restricted_inverse_diag(g, h, current)
    return current


def restricted_inverse_diag(g: jax.Array, h: jax.Array, mask: jax.Array) -> jax.Array:
    """Per row, an estimate of ``diag((H_QQ)^{-1})`` on the row's support ``Q``.

    Exact: ``G_jj - G_jP (G_PP)^{-1} G_Pj`` (Schur complement, ``P`` = removed). With
    ``G_PP`` replaced by its diagonal this is ``G_jj - sum_p G_jp^2 / G_pp``: one
    ``(rows, cols) @ (cols, cols)`` product for the whole layer instead of a factorization
    per row, exact when one weight per row was removed. It is clamped below by
    ``1 / H_jj``, a lower bound of the exact value. On MNIST-calibrated layers the masks
    it ranks gave layer losses within 0-5% of the exact diagonal's at 6x less time.
    """
    gd = jnp.diagonal(g)
    removed = (~mask).astype(g.dtype) / gd[None, :]
    est = gd[None, :] - removed @ (g * g)
    return jnp.maximum(est, 1.0 / jnp.diagonal(h)[None, :])


METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "obc": obc,
    "iobs": iobs,
}

