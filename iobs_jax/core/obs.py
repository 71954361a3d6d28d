"""The Optimal Brain Surgeon (OBS) projection, saliency and greedy OBS (OBC).

For a fixed support ``Q`` (``mask``), with ``P`` its complement and ``G = H^{-1}``,

    argmin_{theta_P = 0} (theta - theta~)^T H (theta - theta~)
        theta_Q = theta~_Q + (H_QQ)^{-1} H_QP theta~_P        (the H form)
        theta   = theta~ - G[:, P] (G_PP)^{-1} theta~_P        (the inverse form)

and the projection costs ``theta~_P^T (G_PP)^{-1} theta~_P``. These are the only
implementations of the OBS formula in the library: the solvers call the unchecked
internals (``project``, ``saliency``, ``greedy_obs_unchecked``), users the checked
public functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from iobs_jax.core.curvature import (
    Curvature,
    DenseCurvature,
    OperatorCurvature,
    check_cg_options,
    compute_dtype,
)
from iobs_jax.core.masks import flatten, topk_any
from iobs_jax.core.validation import (
    check_finite,
    check_finite_result,
    check_float_array,
    check_int,
    check_nonnegative_scalar,
    check_same_structure,
    check_square_matrix,
    is_concrete,
    is_finite_now,
)

__all__ = ["obs_saliency", "obs_project", "obs_project_from_inverse", "greedy_obs"]
# Internal, unchecked entry points for traced library code: ``saliency``, ``project``,
# ``greedy_obs_unchecked``.


def obs_saliency(theta: Any, hinv_diag: Any) -> Any:
    """OBS saliency of removing each weight alone: ``theta**2 / hinv_diag``.

    ``hinv_diag`` is the diagonal of ``G = H^{-1}`` (array or pytree like ``theta``). The
    saliency is twice the increase of the quadratic model when ``theta_i`` is set to zero
    and the other weights are optimally corrected. Smaller means cheaper to prune.
    Computed in at least float32 (16-bit inputs give float32 saliencies: squares of
    half-precision weights under- and overflow); a saliency that overflows even there is
    a ValueError, not an ``inf``.

    Example:
      >>> obs_saliency(jnp.array([1.0, 2.0]), jnp.array([0.5, 4.0]))
      Array([2., 1.], dtype=float32)
    """
    check_same_structure(theta, hinv_diag, "theta", "hinv_diag")
    for t, g in zip(jax.tree.leaves(theta), jax.tree.leaves(hinv_diag), strict=True):
        check_finite(check_float_array(t, "theta"), "theta")
        g = check_finite(check_float_array(g, "hinv_diag"), "hinv_diag")
        if is_concrete(g) and g.size and not (np.asarray(g) > 0).all():
            raise ValueError(
                "hinv_diag must be > 0 (the diagonal of a positive definite inverse Hessian); "
                "add damping to the Hessian before inverting it."
            )
    def one(t, g):
        work = compute_dtype(jnp.result_type(t, g))
        return saliency(jnp.asarray(t, work), jnp.asarray(g, work))

    out = jax.tree.map(one, theta, hinv_diag)
    return check_finite_result(out, "the OBS saliency", "theta**2 / hinv_diag overflows its "
                               "dtype; rescale theta or compute in float64.")


def saliency(theta: jax.Array, hinv_diag: jax.Array) -> jax.Array:
    """``theta**2 / hinv_diag`` without checks (for traced code inside the library)."""
    return theta**2 / hinv_diag


def saliency_rank(theta: jax.Array, hinv_diag: jax.Array) -> jax.Array:
    """A score ordered exactly like ``theta**2 / hinv_diag``, for top-k selection.

    ``|theta| / sqrt(hinv_diag)`` in at least float32: squaring is what under- and
    overflows (a float16 weight of 1e-4 squares to 0, so every saliency tied at 0 and the
    "top-k" was the first k indices; a float32 weight of 1e20 squares to inf), and sqrt
    is monotone, so the order is the same.
    """
    work = compute_dtype(jnp.result_type(theta, hinv_diag))
    return jnp.abs(theta.astype(work)) * jax.lax.rsqrt(hinv_diag.astype(work))


def project(
    curv: Curvature, theta_tilde: jax.Array, mask: jax.Array, size: int | None = None
) -> jax.Array:
    """OBS projection of a flat ``theta_tilde`` onto ``mask`` for a built curvature.

    ``size``: pass ``k`` when ``mask`` is known to hold exactly ``k`` True entries (a
    top-k mask), so a dense curvature solves a ``(k, k)`` system instead of ``(d, d)``.
    Solved in correction form, ``theta = M theta~ + delta`` with
    ``A_QQ delta_Q = (A (theta~ * (1 - M)))_Q``, which keeps the answer accurate when the
    removed part is small (the usual case) and is exactly the H form above.
    ``theta_tilde`` and ``mask`` may be pytrees when ``curv`` acts on pytrees (a
    matrix-free or Woodbury curvature): the formula is applied leaf by leaf.
    """
    m = jax.tree.map(lambda k, t: k.astype(t.dtype), mask, theta_tilde)
    removed = jax.tree.map(lambda t, k: t * (1.0 - k), theta_tilde, m)
    delta = curv.masked_solve(mask, curv.matvec(removed), size)
    return jax.tree.map(lambda t, k, z: t * k + z, theta_tilde, m, delta)


def obs_project(
    theta_tilde: Any,
    hessian: Any,
    mask: Any,
    *,
    damping: Any = 0.0,
    cg_tol: float = 1e-6,
    cg_maxiter: int | None = None,
) -> Any:
    """H-norm projection onto a support.

    ``theta = argmin_{theta[~mask] = 0} (theta - theta~)^T H (theta - theta~)``.

    Args:
      theta_tilde: array or pytree of arrays (``d`` entries in all).
      hessian: either a dense symmetric PSD ``(d, d)`` matrix over the flattened
        parameters (``jax.flatten_util.ravel_pytree`` order), solved exactly by a Cholesky
        factorization of the masked system; or a callable ``v -> H v`` on arrays/pytrees
        shaped like ``theta_tilde``, solved matrix-free by CG on the masked operator.
      mask: boolean array/pytree like ``theta_tilde``; True marks the kept support ``Q``.
      damping: ``lambda >= 0``, project in the ``H + lambda I`` norm instead (needed when
        ``H_QQ`` is singular).
      cg_tol, cg_maxiter: CG options for a callable ``hessian``.

    Returns:
      ``theta`` shaped like ``theta_tilde``, zero off the mask, with
      ``theta_Q = theta~_Q + (H_QQ)^{-1} H_QP theta~_P``.

    Example:
      >>> H = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> obs_project(jnp.array([1.0, 1.0]), H, jnp.array([True, False])).round(4)
      Array([1.5, 0. ], dtype=float32)
    """
    flat_mask = _check_mask(mask, theta_tilde)
    theta_tilde = jax.tree.map(
        lambda t: check_finite(check_float_array(t, "theta_tilde"), "theta_tilde"), theta_tilde
    )
    damping = check_nonnegative_scalar(damping, "damping")
    check_cg_options(cg_tol, cg_maxiter)
    flat, unravel = ravel_pytree(theta_tilde)
    d = flat.shape[0]
    if callable(hessian):
        _check_operator(hessian, theta_tilde)
        matvec = _flat_operator(hessian, unravel, flat.dtype)
        curv = OperatorCurvature(
            matvec, d, flat.dtype, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter
        )
    else:
        h = check_finite(check_square_matrix(hessian, d), "hessian")
        curv = DenseCurvature(h.astype(compute_dtype(flat.dtype)), damping)
    theta = project(curv, flat, flat_mask).astype(flat.dtype)
    return _check_solution(unravel(theta), "the OBS projection")


def _check_mask(mask: Any, like: Any) -> jax.Array:
    """A support mask is boolean (integers: nonzero = kept) shaped like ``like``; returns
    it as one flat boolean vector."""
    if not jax.tree.structure(like).num_nodes > 1:  # a single array: lists are fine too
        mask = jnp.asarray(mask)
    check_same_structure(like, mask, "theta_tilde", "mask")
    for m in jax.tree.leaves(mask):
        dtype = jnp.result_type(m)
        if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"mask must be boolean (True = kept; integers count nonzero as kept); got "
                f"dtype {dtype}. Build it with topk_mask/nm_mask or a comparison."
            )
    return flatten(mask, bool)


_NOT_PD = (
    "the curvature is not positive definite on the kept support (indefinite or singular), "
    "or a callable hessian returned NaN/inf. Pass damping > 0 (or a PSD approximation "
    "such as Gauss-Newton)."
)


def check_positive_definite(m: jax.Array, name: str) -> None:
    """Raise unless a concrete symmetric ``m`` has a Cholesky factor (up to the round-off
    jitter every dense solve adds): an inverse Hessian ``G`` is positive definite by
    definition, and a negative definite one would give confident nonsense."""
    if not is_concrete(m) or not m.size:
        return
    with jax.ensure_compile_time_eval():
        ok = bool(jnp.all(jnp.isfinite(DenseCurvature(m).chol)))
    if not ok:
        raise ValueError(f"{name} must be symmetric positive definite (G = H^-1 of a "
                         f"positive definite H); its Cholesky factorization fails. Invert a "
                         f"damped Hessian, H + damping * I.")


def _check_solution(x: Any, what: str) -> Any:
    return check_finite_result(x, what, _NOT_PD)


def _check_operator(op: Callable[[Any], Any], like: Any) -> None:
    """Probe a callable ``hessian`` once with ``like`` (when concrete): its output must be
    a finite pytree of the same structure and shapes, or CG would fail deep inside."""
    if not all(is_concrete(leaf) for leaf in jax.tree.leaves(like)):
        return
    try:
        out = op(like)
    except Exception as err:  # re-raised naming the argument
        raise TypeError(f"hessian(v) failed for v shaped like theta_tilde: "
                        f"{type(err).__name__}: {err}") from err
    check_same_structure(like, out, "theta_tilde", "hessian(v)")
    if not all(is_finite_now(leaf) for leaf in jax.tree.leaves(out)):
        raise ValueError("hessian(v) returned NaN/inf for v = theta_tilde; the callable must "
                         "return the finite product H v.")


def _flat_operator(op: Callable[[Any], Any], unravel, dtype) -> Callable[[jax.Array], jax.Array]:
    return lambda v: ravel_pytree(op(unravel(v)))[0].astype(dtype)


def _project_from_inverse(
    g: jax.Array, theta_tilde: jax.Array, mask: jax.Array, size: int | None = None
):
    """Inverse-form projection and its cost ``theta~_P^T (G_PP)^{-1} theta~_P``.

    ``size``: the number of True entries of ``mask`` when it is static.
    """
    projected, cost, e = project_from_inverse_scaled(g, theta_tilde, mask, size)
    return projected, jnp.ldexp(cost, e)


def project_from_inverse_scaled(g: jax.Array, theta_tilde: jax.Array, mask: jax.Array,
                                size: int | None = None):
    """``(theta, cost / 2^e, e)``: the projection solved on ``theta~`` and ``G`` scaled by
    powers of two to their largest entries (``e = 2 e_theta - e_G``).

    The projection is linear in ``theta~`` and does not depend on the scale of ``G``, but
    the intermediate ``(G_PP)^{-1} theta~_P`` overflows float32 for weights near 1e18
    with a Fisher inverse near 1e-36; the cost itself may not fit the dtype, so it comes
    back in pieces for the caller to combine in float64.
    """
    es = _exponent(jnp.max(jnp.abs(theta_tilde)))
    ec = _exponent(jnp.max(jnp.abs(jnp.diagonal(g))))
    theta, g = jnp.ldexp(theta_tilde, -es), jnp.ldexp(g, -ec)
    removed = None if size is None else theta.shape[0] - size
    projected, cost = project_inverse_form(DenseCurvature(g), theta, mask, removed)
    return jnp.ldexp(projected, es), cost, 2 * es - ec


def project_inverse_form(g: Any, theta_tilde: jax.Array, mask: jax.Array,
                         removed: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The inverse form of the OBS projection for a curvature ``g`` of ``G = H^{-1}``:
    ``(theta, cost)`` with ``theta = theta~ - G[:, P] (G_PP)^{-1} theta~_P`` (exact zeros off
    ``mask``) and ``cost = theta~_P^T (G_PP)^{-1} theta~_P``.

    ``(G_PP)^{-1} theta~_P`` is the masked solve on the complement ``P`` (``removed`` its
    static size, if known), spread by ``G``. Equal to :func:`project` with ``H``; cheaper
    when few entries are removed.
    """
    w = g.masked_solve(~mask, theta_tilde, removed)
    return jnp.where(mask, theta_tilde - g.matvec(w), 0.0), jnp.vdot(theta_tilde, w)


def obs_project_from_inverse(
    theta_tilde: jax.Array, hessian_inverse: jax.Array, mask: jax.Array
) -> jax.Array:
    """The same projection from ``G = H^{-1}``: ``theta = theta~ - G[:, P] (G_PP)^{-1} theta~_P``.

    Useful when the inverse is what one has (Woodbury/Fisher inverses, OBC). 1-D arrays
    only; entries off the mask are set to exactly zero.
    """
    theta_tilde = check_finite(check_float_array(theta_tilde, "theta_tilde"), "theta_tilde")
    if theta_tilde.ndim != 1:
        raise ValueError(f"theta_tilde must be a vector; got shape {theta_tilde.shape}.")
    d = theta_tilde.shape[0]
    g = check_square_matrix(hessian_inverse, d, "hessian_inverse")
    g = check_finite(g, "hessian_inverse").astype(compute_dtype(theta_tilde.dtype))
    check_positive_definite(g, "hessian_inverse")
    if np.shape(mask) != (d,):
        raise ValueError(f"mask must have shape ({d},) like theta_tilde; got {np.shape(mask)}.")
    mask = _check_mask(mask, theta_tilde)
    theta = _project_from_inverse(g, theta_tilde, mask)[0].astype(theta_tilde.dtype)
    return _check_solution(theta, "the OBS projection")


def greedy_obs(
    theta_tilde: jax.Array, hessian_inverse: jax.Array, k: int, *, safeguard: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Greedy OBS (OBC): remove the least salient weight ``d - k`` times.

    Each round picks ``p = argmin_{i kept} theta_i^2 / G_ii`` (ties: lowest index) and
    applies the exact rank-one OBS updates

        theta <- theta - (theta_p / G_pp) G[:, p]
        G     <- G - G[:, p] G[p, :] / G_pp

    which zero ``theta_p`` and restrict ``G`` to the remaining weights. Because OBS is
    exact on a quadratic, the final ``theta`` equals :func:`obs_project` onto the final
    mask, and its cost is the sum of the removed saliencies. Cost ``O((d - k) d^2)``.

    Greedy removal is not optimal: on about 1-3% of random instances the one-shot support
    "top-k of |theta~|" with its OBS correction is cheaper. With ``safeguard=True``
    (default) the greedy result is compared with it by the exact OBS cost and the cheaper
    is returned, so ``greedy_obs`` is never worse than top-k plus correction and equals
    the plain greedy path whenever that path is at least as good. ``safeguard=False``
    always returns the plain greedy path.

    16-bit inputs are computed in float32 (rank-one downdates in half precision lose
    the inverse) and returned in their own dtype.

    Args:
      theta_tilde: ``(d,)`` weights.
      hessian_inverse: ``(d, d)`` symmetric positive definite ``G = H^{-1}``.
      k: static int, ``0 <= k <= d``, number of weights kept.
      safeguard: compare with top-k plus correction (adds one ``O((d - k)^3)`` solve).

    Returns:
      ``(theta, mask)``: the pruned weights (exact zeros off the mask) and the boolean mask
      with exactly ``k`` True.

    Example:
      >>> theta, mask = greedy_obs(jnp.array([3.0, 0.1, -2.0]), jnp.eye(3), 2)
      >>> mask
      Array([ True, False,  True], dtype=bool)
    """
    theta = check_finite(check_float_array(theta_tilde, "theta_tilde"), "theta_tilde")
    if theta.ndim != 1:
        raise ValueError(
            f"greedy_obs works on a vector; got theta_tilde of shape {theta.shape} "
            f"(vmap it for rows of a layer)."
        )
    d = theta.shape[0]
    g = check_finite(check_square_matrix(hessian_inverse, d, "hessian_inverse"), "hessian_inverse")
    check_positive_definite(g, "hessian_inverse")
    k = check_int(k, "k", low=0, high=d)
    out, mask = greedy_obs_unchecked(theta, g, k, bool(safeguard))
    return _check_solution(out, "greedy OBS"), mask


def greedy_obs_unchecked(theta: jax.Array, g: jax.Array, k: Any, safeguard: bool = True):
    """:func:`greedy_obs` without the boundary checks (for traced code in the library).

    ``k`` may be a traced integer (a sweep's sparsity): the removal loop then runs a traced
    number of rounds and the safeguard solves the masked ``(d, d)`` system.
    """
    work = compute_dtype(theta.dtype)
    run = _greedy_obs if isinstance(k, int | np.integer) else _greedy_obs_traced
    out, mask = run(theta.astype(work), g.astype(work), k, safeguard)
    return out.astype(theta.dtype), mask


@functools.partial(jax.jit, static_argnames=("k", "safeguard"))
def _greedy_obs(theta, g, k, safeguard):
    # Compiled once per (shape, k): eager callers would otherwise retrace the loop.
    d = theta.shape[0]
    theta, g, e = _scaled(theta, g)
    out, mask, cost = _greedy_path(theta, g, d - k)
    if safeguard and k not in (0, d):
        out, mask = _safeguarded(theta, g, k, k, out, mask, cost)
    return jnp.ldexp(out, e), mask


@functools.partial(jax.jit, static_argnames=("safeguard",))
def _greedy_obs_traced(theta, g, k, safeguard):
    theta, g, e = _scaled(theta, g)
    out, mask, cost = _greedy_path(theta, g, theta.shape[0] - k)
    if safeguard:
        out, mask = _safeguarded(theta, g, k, None, out, mask, cost)
    return jnp.ldexp(out, e), mask


def _scaled(theta, g):
    """``theta / 2^e``, ``G`` symmetrized and scaled to O(1), and ``e``.

    OBS is linear in theta and invariant to the scale of G (the mask and the corrected
    weights do not change), so both are scaled first: squares of weights near 1e20
    overflow float32, and an overflowing saliency once made argmin pick an entry
    already removed (k + 1 kept).
    """
    e = _exponent(jnp.max(jnp.abs(theta)))
    g = 0.5 * (g + g.T)
    g = jnp.ldexp(g, -_exponent(jnp.max(jnp.abs(jnp.diagonal(g)))))
    return jnp.ldexp(theta, -e), g, e


def _exponent(m: jax.Array) -> jax.Array:
    """The binary exponent ``e`` with ``m / 2^e`` in ``[0.5, 1)`` (0 for 0/inf/NaN).

    Scaling by ``ldexp(x, -e)`` is exact; ``x / m`` is not safe: XLA on CPU divides by
    multiplying with ``1 / m``, which flushes to zero for ``m`` above ~8.5e37 in float32.
    """
    e = jnp.frexp(m)[1]
    return jnp.where((m > 0) & jnp.isfinite(m), e, jnp.zeros_like(e))


def _greedy_path(theta, g, removals):
    """``removals`` rounds of greedy OBS; returns the weights, the kept mask and the cost."""
    d = theta.shape[0]
    big = jnp.finfo(theta.dtype).max
    # Round-off can push a Schur complement's diagonal to <= 0; clamp it to a tiny
    # positive value so saliencies stay finite and ordered instead of turning NaN.
    floor = jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(jnp.diagonal(g)))

    def body(_, carry):
        theta, gk, removed, cost = carry
        gdiag = jnp.maximum(jnp.diagonal(gk), floor)
        # Removed entries rank last (inf), kept ones below it whatever their value, so
        # every round removes a new entry: exactly d - k removed.
        sal = jnp.where(removed, jnp.inf, jnp.minimum(theta**2 / gdiag, big))
        p = jnp.argmin(sal)
        col = gk[:, p]
        theta = theta - (theta[p] / gdiag[p]) * col
        gk = gk - jnp.outer(col, col) / gdiag[p]
        removed = removed.at[p].set(True)
        theta = jnp.where(removed, 0.0, theta)
        return theta, gk, removed, cost + sal[p]

    init = (theta, g, jnp.zeros((d,), bool), jnp.zeros((), theta.dtype))
    out, _, removed, cost = jax.lax.fori_loop(0, removals, body, init)
    return out, ~removed, cost


def _safeguarded(theta, g, k, size, out, mask, cost):
    """The cheaper of the greedy path and top-k of ``|theta|`` with its OBS correction."""
    candidate = topk_any(jnp.abs(theta), k)
    alt, alt_cost = _project_from_inverse(g, theta, candidate, size)
    # Keep the greedy path on ties: the two costs are computed differently, and a
    # round-off difference must not swap in another (equally good) answer.
    better = alt_cost < cost * (1 - 64 * jnp.finfo(cost.dtype).eps)
    return jnp.where(better, alt, out), jnp.where(better, candidate, mask)
