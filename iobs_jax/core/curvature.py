"""Curvature: Hessian-vector products, dense Hessians, damping and Newton directions.

One interface serves every second-order method in the library. A *curvature* is an
object over flat parameter vectors of length ``d`` with

- ``matvec(v)``: ``(H + damping I) v``;
- ``solve(b)``: ``(H + damping I)^{-1} b`` (the Newton direction when ``b`` is the gradient);
- ``masked_solve(mask, b, size=None)``: the solution ``z`` of
  ``(H + damping I)_QQ z_Q = b_Q`` with ``z_P = 0``, where ``Q = mask`` and ``P`` is its
  complement (the OBS correction); ``size`` is ``|Q|`` when it is static (top-k masks);
- ``mean_diag()``: ``trace(H + damping I) / d`` (exact for dense curvature, a
  deterministic Hutchinson estimate for a matrix-free one), the scale of the curvature;
- ``inverse()`` and ``inverse_diag()``: ``G = (H + damping I)^{-1}`` and its diagonal, when
  they are affordable (dense curvature only; needed by saliency and greedy selection).

:class:`DenseCurvature` holds the matrix and factors it once by Cholesky;
:class:`OperatorCurvature` only needs ``v -> H v`` (for example a Hessian-vector product
from forward-over-reverse autodiff) and solves by conjugate gradients. Both are plain
Python objects built inside traced code; they are not carried across ``jit`` boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve

from iobs_jax.core.masks import tree_size
from iobs_jax.core.validation import (
    check_choice,
    check_finite_result,
    check_float_array,
    check_int,
    check_nonnegative_scalar,
    check_same_structure,
    check_square_matrix,
    check_tol,
)

__all__ = [
    "DenseCurvature",
    "OperatorCurvature",
    "WoodburyCurvature",
    "hvp",
    "dense_hessian",
    "newton_direction",
    "power_iteration",
    "make_curvature",
    "conjugate_gradient",
]


def highest_precision(fn: Callable) -> Callable:
    """Run ``fn`` with float32 matrix products at full precision on every backend.

    GPUs and TPUs multiply float32 in TF32 / bfloat16 passes by default; Gram matrices
    ``X^T X``, Woodbury identities and CG on them cancel, and at 10 mantissa bits a
    damped Fisher or layer Hessian can turn indefinite (measured: NaN from the Fisher
    OBS update on an H100). The setting is part of JAX's trace context, so compiled
    functions are cached per precision.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


def hvp(fun: Callable[..., jax.Array], x: Any, v: Any, *args: Any) -> Any:
    """Hessian-vector product ``H(x) v`` of ``fun(x, *args)`` by forward-over-reverse autodiff.

    ``x`` and ``v`` are pytrees of the same structure; the result has that structure too.
    Costs about two gradient evaluations and never forms ``H``.

    Example:
      >>> f = lambda x, a: 0.5 * jnp.sum(a * x**2)
      >>> hvp(f, jnp.ones(3), jnp.ones(3), jnp.array([1., 2., 3.]))
      Array([1., 2., 3.], dtype=float32)
    """
    check_same_structure(x, v, "x", "v")
    return jax.jvp(lambda p: jax.grad(fun)(p, *args), (x,), (v,))[1]


def dense_hessian(fun: Callable[..., jax.Array], x: Any, *args: Any) -> jax.Array:
    """The ``(d, d)`` Hessian of ``fun(x, *args)`` over the flattened parameters of ``x``.

    ``d`` is the total number of entries of the pytree ``x`` (flattened in
    ``jax.flatten_util.ravel_pytree`` order). Forward-over-reverse, ``d`` HVPs: use it for
    small problems only.
    """
    flat, unravel = ravel_pytree(x)
    return jax.hessian(lambda z: fun(unravel(z), *args))(flat)


def compute_dtype(dtype: Any) -> Any:
    """The dtype dense linear algebra runs in: at least float32.

    XLA has no 16-bit Cholesky, and half precision could not hold a useful factor (or a
    rank-one-downdated inverse) anyway; callers cast results back to their own dtype.
    """
    return jnp.promote_types(dtype, jnp.float32)


def _jitter(diag: jax.Array) -> jax.Array:
    # A relative jitter of ~d * eps keeps Cholesky finite on PSD matrices that are
    # singular only by round-off, and is far below any meaningful damping.
    d = diag.shape[0]
    scale = jnp.maximum(jnp.mean(jnp.abs(diag)), jnp.finfo(diag.dtype).tiny)
    return d * jnp.finfo(diag.dtype).eps * scale


def _add_to_diagonal(a: jax.Array, value: jax.Array) -> jax.Array:
    eye = (jax.lax.broadcasted_iota(jnp.int32, a.shape, 0)
           == jax.lax.broadcasted_iota(jnp.int32, a.shape, 1))
    return jnp.where(eye, a + value, a)


def guarded_cholesky(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of a symmetric ``a`` (its lower triangle is read): ``(L, jitter)``.

    If the factorization fails (round-off on a singular or barely definite matrix, e.g.
    ``damping=0`` on rank-deficient calibration data) it is retried with a diagonal
    jitter starting at ``d * eps * mean|diag|`` and growing 100x per try, so the result is
    always finite; ``jitter`` is what was added (0 when the plain factor worked), for the
    caller to report.
    """
    factor = lambda m: jax.lax.linalg.cholesky(m, symmetrize_input=False)
    chol = factor(a)
    # A failed factorization comes back all NaN: its diagonal tells.
    finite = lambda c: jnp.all(jnp.isfinite(jnp.diagonal(c)))

    def retry(_):
        return grow_jitter(lambda j: factor(_add_to_diagonal(a, j)), finite,
                           _jitter(jnp.diagonal(a)))

    return jax.lax.cond(finite(chol), lambda _: (chol, jnp.zeros((), a.dtype)), retry, None)


def cholesky_inverse(chol: jax.Array) -> jax.Array:
    """``A^{-1}`` from the lower Cholesky factor ``L`` of ``A = L L^T``: the library's one
    dense inverse (``cho_solve`` against the identity), used by every curvature class,
    the layer-wise methods and OBS pursuit.

    Example:
      >>> a = jnp.array([[4.0, 2.0], [2.0, 2.0]])
      >>> (cholesky_inverse(jnp.linalg.cholesky(a)) @ a).round(4)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    return cho_solve((chol, True), jnp.eye(chol.shape[-1], dtype=chol.dtype))


def grow_jitter(factor: Callable[[jax.Array], Any], ok: Callable[[Any], jax.Array],
                base: jax.Array, max_tries: int = 12) -> tuple[Any, jax.Array]:
    """``factor(jitter)`` for ``jitter = base * 100**t``, ``t = 0, 1, ...``, until
    ``ok(result)`` or ``max_tries`` calls: ``(result, jitter)``. The one retry rule of the
    library's factorizations (a plain factor that failed from round-off on a singular or
    barely definite matrix), with ``base`` a round-off-sized jitter such as
    ``d * eps * mean|diag|``."""

    def failed(state):
        return ~ok(state[0]) & (state[2] < max_tries)

    def attempt(state):
        jitter = base * 100.0 ** state[2].astype(base.dtype)
        return factor(jitter), jitter, state[2] + 1

    state = (factor(base), base, jnp.ones((), jnp.int32))
    return jax.lax.while_loop(failed, attempt, state)[:2]


class DenseCurvature:
    """A dense curvature matrix ``H`` (``(d, d)``, symmetric PSD) plus ``damping * I``.

    The damped matrix is factored once by Cholesky (with a round-off-sized jitter); all
    solves reuse the factor. A singular ``H`` with ``damping = 0`` gives large but finite
    directions along its null space only when round-off allows it: pass ``damping > 0``
    whenever ``H`` is rank deficient (for least squares: fewer samples than parameters).
    """

    def __init__(self, matrix: jax.Array, damping: Any = 0.0):
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense curvature needs a square matrix; got {matrix.shape}.")
        self.size = matrix.shape[0]
        # 16-bit curvature is stored and solved in float32 (see compute_dtype).
        self.dtype = compute_dtype(matrix.dtype)
        matrix = matrix.astype(self.dtype)
        self.damping = jnp.asarray(damping, matrix.dtype)
        # Symmetrize: autodiff Hessians are symmetric only up to round-off.
        self.matrix = 0.5 * (matrix + matrix.T)
        self._damped = self.matrix + self.damping * jnp.eye(self.size, dtype=self.dtype)
        self._chol = None

    @property
    def chol(self) -> jax.Array:
        if self._chol is None:
            a = self._damped
            a = a + _jitter(jnp.diagonal(a)) * jnp.eye(self.size, dtype=self.dtype)
            self._chol = jnp.linalg.cholesky(a)
        return self._chol

    def matvec(self, v: jax.Array) -> jax.Array:
        return self._damped @ v.astype(self.dtype)

    def solve(self, b: jax.Array) -> jax.Array:
        return cho_solve((self.chol, True), b.astype(self.dtype))

    def inverse(self) -> jax.Array:
        return cholesky_inverse(self.chol)

    def mean_diag(self) -> jax.Array:
        return jnp.mean(jnp.diagonal(self._damped))

    def inverse_diag(self) -> jax.Array:
        # diag(A^{-1}) = column sums of (L^{-1})^2 for A = L L^T.
        linv = jax.scipy.linalg.solve_triangular(
            self.chol, jnp.eye(self.size, dtype=self.dtype), lower=True
        )
        return jnp.sum(linv**2, axis=0)

    def masked_solve(self, mask: jax.Array, b: jax.Array, size: int | None = None) -> jax.Array:
        """Solve ``A_QQ z_Q = b_Q``, ``z_P = 0`` with static shapes.

        ``size=None``: the support size is not known statically. With ``M = diag(mask)``
        the matrix ``M A M + (I - M)`` is ``A_QQ`` on ``Q`` and the identity on ``P``, so
        one Cholesky of a ``(d, d)`` matrix solves any support without data-dependent
        shapes (what ``jit`` and ``vmap`` need).

        ``size=s`` (a static int): the caller guarantees that ``mask`` has exactly ``s``
        True entries (a top-k mask does). Then the ``(s, s)`` block is gathered and
        factored instead: ``O(s^3)`` rather than ``O(d^3)``, the common case ``k << d``.
        """
        b = b.astype(self.dtype)
        if size is not None:
            if size == 0:
                return jnp.zeros_like(b)
            idx = jnp.nonzero(mask, size=size, fill_value=0)[0]
            a = self._damped[idx[:, None], idx[None, :]]
            a = a + _jitter(jnp.diagonal(a)) * jnp.eye(size, dtype=self.dtype)
            z = cho_solve((jnp.linalg.cholesky(a), True), b[idx])
            return jnp.zeros_like(b).at[idx].set(z)
        m = mask.astype(self.dtype)
        # The filler on P is scaled like A (not 1) so that the jitter, relative to the
        # mean diagonal, stays relative to A_QQ whatever the scale of the curvature.
        diag_q = jnp.abs(jnp.diagonal(self._damped)) * m
        scale = jnp.sum(diag_q) / jnp.maximum(jnp.sum(m), 1.0)
        scale = jnp.where(scale > 0, scale, 1.0)
        a = self._damped * m[:, None] * m[None, :] + jnp.diag(scale * (1.0 - m))
        a = a + _jitter(jnp.diagonal(a)) * jnp.diag(m)
        chol = jnp.linalg.cholesky(a)
        return cho_solve((chol, True), b * m) * m


class OperatorCurvature:
    """A matrix-free curvature ``v -> H v`` plus ``damping * I``, solved by CG.

    ``cg_tol`` is CG's relative residual tolerance and ``cg_maxiter`` its iteration cap
    (``None``: ``10 d``); see :func:`conjugate_gradient`. CG needs ``H + damping I`` to
    be positive definite on the space it works in; with a singular ``H`` and zero damping
    it still converges on consistent systems (gradients of least squares are). An
    indefinite ``H`` gives NaN solutions (see :func:`conjugate_gradient`), unless
    ``truncate=True``: truncated Newton-CG, which stops at negative curvature (a gradient
    step if that is the first direction; no correction for masked solves). ``matvec``,
    ``solve`` and ``masked_solve`` also take pytree vectors when ``matvec`` does (CG
    reduces leaf by leaf; ``dtype`` is then the leaves' dtype).
    """

    def __init__(
        self,
        matvec: Callable[[jax.Array], jax.Array],
        size: int,
        dtype: Any,
        damping: Any = 0.0,
        *,
        cg_tol: float = 1e-6,
        cg_maxiter: int | None = None,
        truncate: bool = False,
    ):
        self._op = matvec
        self.truncate = truncate
        self.size = size
        self.dtype = dtype
        self.damping = jnp.asarray(damping, dtype)
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter

    def matvec(self, v: Any) -> Any:
        return jax.tree.map(lambda hv, x: hv + self.damping * x, self._op(v), v)

    def _cg(self, op, b, x0=None, fallback="zero"):
        maxiter = 10 * self.size if self.cg_maxiter is None else self.cg_maxiter
        return cg_solve(op, b, x0, tol=self.cg_tol, maxiter=maxiter,
                        truncate=fallback if self.truncate else None)

    def solve(self, b: jax.Array, x0: jax.Array | None = None) -> jax.Array:
        return self._cg(self.matvec, b, x0, fallback="gradient")

    def masked_solve(
        self, mask: jax.Array, b: jax.Array, size: int | None = None, *,
        x0: jax.Array | None = None,
    ) -> jax.Array:
        # CG works with the masked operator whatever the support size; ``size`` is
        # accepted for interface compatibility with DenseCurvature. Vectors may be
        # pytrees (``mask`` then one like them): nothing is raveled.
        m = jax.tree.map(lambda k, x: k.astype(x.dtype), mask, b)
        mul = lambda a, c: jax.tree.map(jnp.multiply, a, c)
        op = lambda v: jax.tree.map(lambda k, av, x: k * av + (1.0 - k) * x, m,
                                    self.matvec(mul(m, v)), v)
        return mul(self._cg(op, mul(b, m), None if x0 is None else mul(x0, m)), m)

    def mean_diag(self, num_probes: int = 16) -> jax.Array:
        """Hutchinson estimate ``mean_j v_j^T A v_j / d`` with fixed +-1 probes."""
        probes = _sign_probes(self.size, num_probes, self.dtype)
        quad = jax.vmap(lambda v: jnp.vdot(v, self.matvec(v)))(probes)
        return jnp.mean(quad) / self.size

    def inverse(self) -> jax.Array:
        raise ValueError(
            "the inverse Hessian is not available from a matrix-free (CG) curvature; "
            "use hessian='exact' or pass a dense Hessian matrix."
        )

    inverse_diag = inverse


class WoodburyCurvature:
    """Low rank plus diagonal: ``C = U^T U + damping I``, solved by the Woodbury identity.

    ``rows`` holds the ``m`` rows of ``U`` as a pytree whose leaves have a leading axis of
    length ``m`` (row ``i`` is a pytree like the vectors ``C`` acts on: for an empirical
    Fisher ``F = G^T G / m``, the per-example gradients divided by ``sqrt(m)``). With
    ``K = damping I_m + U U^T`` (``m x m``),

        C^{-1} b      = (b - U^T K^{-1} U b) / damping
        diag(C^{-1})  = (1 - sum_i U_ij [K^{-1} U]_ij) / damping
        C_QQ^{-1} b_Q = the same with U restricted to the columns Q,

    ``O(m^2 d)`` work and ``O(m d)`` memory. Every product contracts leaf by leaf, so
    with sharded leaves each device works on its shards and only ``m``-vectors and the
    ``(m, m)`` Gram matrix cross devices. ``mean_diag()`` is ``sum(U**2) / d + damping``.
    """

    def __init__(self, rows: Any, damping: Any):
        self.rows = rows
        leaves = jax.tree.leaves(rows)
        self.m = leaves[0].shape[0]
        self.dtype = leaves[0].dtype
        self.size = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves)
        self.damping = jnp.asarray(damping, self.dtype)

    def _u(self, v: Any, rows: Any = None) -> jax.Array:
        """``U v``: an ``m``-vector."""
        rows = self.rows if rows is None else rows
        parts = [jnp.tensordot(r, x, axes=x.ndim)
                 for r, x in zip(jax.tree.leaves(rows), jax.tree.leaves(v), strict=True)]
        return functools.reduce(jnp.add, parts)

    def _ut(self, c: jax.Array, rows: Any = None) -> Any:
        """``U^T c``: a vector (pytree like one row)."""
        return jax.tree.map(lambda r: jnp.tensordot(c, r, axes=1),
                            self.rows if rows is None else rows)

    def _small(self, rows: Any) -> jax.Array:
        """Lower Cholesky factor of ``K = damping I_m + U U^T``."""
        gram = functools.reduce(jnp.add, [
            jnp.tensordot(r, r, axes=(list(range(1, r.ndim)),) * 2)
            for r in jax.tree.leaves(rows)])
        return jnp.linalg.cholesky(gram + self.damping * jnp.eye(self.m, dtype=self.dtype))

    def _woodbury(self, rows: Any, b: Any) -> Any:
        c = cho_solve((self._small(rows), True), self._u(b, rows))
        return jax.tree.map(lambda bi, ui: (bi - ui) / self.damping, b, self._ut(c, rows))

    def matvec(self, v: Any) -> Any:
        return jax.tree.map(lambda a, x: a + self.damping * x, self._ut(self._u(v)), v)

    def solve(self, b: Any) -> Any:
        return self._woodbury(self.rows, b)

    def inverse_diag(self) -> Any:
        kinv = cholesky_inverse(self._small(self.rows))
        return jax.tree.map(
            lambda r: (1.0 - jnp.sum(r * jnp.tensordot(kinv, r, axes=1), axis=0))
            / self.damping, self.rows)

    def inverse(self) -> jax.Array:
        """The dense ``C^{-1} = (I - U^T K^{-1} U) / damping`` (symmetrized), for ``U`` an
        ``(m, d)`` array: small blocks only (``d x d`` memory)."""
        u = self.rows
        inv = (jnp.eye(u.shape[1], dtype=self.dtype) - u.T @ self._kinv_u(u)) / self.damping
        return 0.5 * (inv + inv.T)

    def _kinv_u(self, u: jax.Array) -> jax.Array:
        return cho_solve((self._small(u), True), u)

    def masked_solve(self, mask: Any, b: Any, size: int | None = None) -> Any:
        # Restricted to Q the curvature is U_Q^T U_Q + damping I: Woodbury on masked U.
        m = jax.tree.map(lambda k, x: k.astype(x.dtype), mask, b)
        rows = jax.tree.map(lambda r, k: r * k[None], self.rows, m)
        z = self._woodbury(rows, jax.tree.map(jnp.multiply, b, m))
        return jax.tree.map(jnp.multiply, z, m)

    def mean_diag(self) -> jax.Array:
        total = functools.reduce(jnp.add, [jnp.sum(jnp.square(r))
                                           for r in jax.tree.leaves(self.rows)])
        return total / self.size + self.damping


def tree_mean_diag(matvec: Callable[[Any], Any], like: Any, num_probes: int = 4) -> jax.Array:
    """Hutchinson estimate of ``trace(A) / d`` for ``A = matvec`` on pytree vectors like
    ``like``, with the fixed +-1 probes of :func:`_sign_probes` laid over the leaves."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(x.shape, dtype=np.int64)) for x in leaves]
    total = jnp.zeros((), leaves[0].dtype)
    for j in range(num_probes):
        probe, start = [], 0
        for x, n in zip(leaves, sizes, strict=True):
            probe.append(_sign_values(start + _positions(x.shape), j, x.dtype))
            start += n
        v = jax.tree.unflatten(treedef, probe)
        total = total + _vdot(v, matvec(v))
    return total / (num_probes * sum(sizes))


def _positions(shape: tuple[int, ...]) -> jax.Array:
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        pos = pos + jnp.uint32(stride) * jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        stride *= shape[axis]
    return pos


Curvature = DenseCurvature | OperatorCurvature | WoodburyCurvature


def conjugate_gradient(
    op: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    x0: jax.Array | None = None,
    *,
    tol: float = 1e-6,
    maxiter: int = 100,
) -> jax.Array:
    """Conjugate gradients for ``op(x) = b`` with ``op`` symmetric PSD, guarded for round-off.

    Stops when ``||r|| <= tol_eff ||b||`` with ``tol_eff = max(tol, 10 eps)`` (a tolerance
    below the dtype's precision would otherwise iterate into 0/0), or after ``maxiter``
    iterations. A search direction ``p`` with no curvature left (``p^T A p ~ 0`` and
    ``A p ~ 0``: the null space of a singular PSD operator) ends the run at the current
    iterate. A direction of *negative or zero curvature with* ``A p`` *clearly nonzero``
    proves that ``op`` is not PSD (indefinite); then, and when ``op`` returns NaN/inf, the
    result is all NaN, so that solvers report :attr:`Status.NONFINITE`, never a
    silently wrong (e.g. zero) direction. Called eagerly (not under ``jit``) it raises
    ``ValueError`` instead.

    Example:
      >>> x = conjugate_gradient(lambda v: jnp.array([2.0, 4.0]) * v, jnp.array([2.0, 4.0]))
      >>> x.round(4)
      Array([1., 1.], dtype=float32)
    """
    tol = check_tol(tol, "tol")
    maxiter = check_int(maxiter, "maxiter", low=0)
    b = check_float_array(b, "b")
    x = cg_solve(op, b, x0, tol=tol, maxiter=maxiter)
    return check_finite_result(
        x, "the conjugate gradient solution",
        "op returned NaN/inf or is not positive semi-definite (a direction of negative "
        "curvature p^T op(p) <= 0 was found); add damping, or use a PSD approximation "
        "such as Gauss-Newton.")


def cg_solve(op, b, x0=None, *, tol=1e-6, maxiter=100, truncate=None) -> jax.Array:
    """:func:`conjugate_gradient` without the eager check (for traced library code).

    ``truncate="gradient"`` or ``"zero"``: truncated Newton-CG instead of failing (Nocedal
    & Wright, Algorithm 7.1): at a direction of negative curvature stop with the current
    iterate, or, on the first iteration, with ``b`` itself (a gradient step) or zero.
    A non-finite ``op`` still gives NaN. ``b`` (and ``x0``, ``op``'s argument and value) may
    be a pytree of arrays: inner products sum over leaves, nothing is raveled.
    """
    tm = jax.tree.map
    dtype = jax.tree.leaves(b)[0].dtype
    eps = jnp.finfo(dtype).eps
    tol_eff = jnp.maximum(jnp.asarray(tol, dtype), 10 * eps)
    stop2 = (tol_eff**2) * _vdot(b, b)
    x = tm(jnp.zeros_like, b) if x0 is None else x0
    r = tm(jnp.subtract, b, op(x)) if x0 is not None else b
    rs = _vdot(r, r)

    def cond(carry):
        i, _, _, _, rs, done, _ = carry
        return (i < maxiter) & (rs > stop2) & ~done

    def body(carry):
        i, x, r, p, rs, _, top = carry
        ap = op(p)
        # The largest ||A p|| / ||p|| seen: the operator's scale, to tell a null-space
        # direction (A p ~ 0, fine for a singular PSD op) from a non-PSD one.
        norm_p, norm_ap = _norm(p), _norm(ap)
        top = jnp.maximum(top, norm_ap / jnp.where(norm_p > 0, norm_p, 1.0))
        (x, r, p, rs_new), _, pap = cg_step(CGState(x, r, p, rs), ap)
        # p^T A p <= 0 with A p clearly nonzero cannot happen for a PSD A (there
        # p^T A p >= ||A p||^2 / lambda_max), even with round-off, in any precision.
        ok = pap > 0
        negative = ~ok & (norm_ap > jnp.sqrt(eps) * top * norm_p)
        if truncate == "gradient":
            x = tm(lambda xi, bi: jnp.where(negative & (i == 0), bi, xi), x, b)
        elif truncate is None:
            x = tm(lambda xi: jnp.where(negative, jnp.nan, xi), x)
        x = tm(lambda xi: jnp.where(jnp.isfinite(pap), xi, jnp.nan), x)
        return i + 1, x, r, p, rs_new, ~ok, top

    init = (0, x, r, r, rs, jnp.array(False), jnp.zeros((), dtype))
    _, x, *_ = jax.lax.while_loop(cond, body, init)
    # A non-finite right-hand side (or op(x0)) stops the loop at once: not a solution.
    return tm(lambda xi: jnp.where(jnp.isfinite(rs), xi, jnp.nan), x)


class CGState(NamedTuple):
    """Conjugate-gradient iterate ``x``, residual ``r = b - A x``, direction ``p`` and
    ``rs = <r, r>`` (arrays or pytrees; ``rs`` has the shape ``dot`` returns)."""

    x: Any
    r: Any
    p: Any
    rs: jax.Array


def cg_step(state: CGState, ap: Any, dot: Callable[[Any, Any], jax.Array] | None = None
            ) -> tuple[CGState, jax.Array, jax.Array]:
    """One conjugate-gradient iteration, given ``ap = A p``: ``(state, alpha, p^T A p)``.

    ``alpha = <r, r> / <p, A p>``, ``x += alpha p``, ``r -= alpha A p``,
    ``p = r + (<r', r'> / <r, r>) p``. The one CG recurrence of the library, used by
    :func:`cg_solve` and by the layer-wise refit, which runs one CG per row at once:
    ``dot`` is then a row-wise inner product and ``alpha`` a vector of step sizes
    (default: the inner product of two pytrees). ``alpha = 0`` where ``p^T A p <= 0``
    (the caller decides what that means); a zero residual gives ``beta = 0``.

    Example:
      >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]]); b = jnp.array([2.0, 4.0])
      >>> s = CGState(jnp.zeros(2), b, b, b @ b)
      >>> for _ in range(2):
      ...     s, _, _ = cg_step(s, a @ s.p)
      >>> s.x.round(4)
      Array([1., 1.], dtype=float32)
    """
    dot = _vdot if dot is None else dot
    tm = jax.tree.map
    pap = dot(state.p, ap)
    ok = pap > 0
    alpha = jnp.where(ok, state.rs / jnp.where(ok, pap, 1.0), 0.0)
    x = tm(lambda xi, pi: xi + alpha * pi, state.x, state.p)
    r = tm(lambda ri, api: ri - alpha * api, state.r, ap)
    rs = dot(r, r)
    nonzero = state.rs > 0
    beta = jnp.where(nonzero, rs / jnp.where(nonzero, state.rs, 1.0), 0.0)
    p = tm(lambda ri, pi: ri + beta * pi, r, state.p)
    return CGState(x, r, p, rs), alpha, pap


def _vdot(a: Any, b: Any) -> jax.Array:
    """``<a, b>`` of two arrays or pytrees of arrays (a sum of per-leaf dot products)."""
    parts = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                            strict=True)]
    return functools.reduce(jnp.add, parts)


def _norm(a: Any) -> jax.Array:
    leaves = jax.tree.leaves(a)
    if len(leaves) == 1:
        return jnp.linalg.norm(leaves[0])
    return jnp.sqrt(functools.reduce(jnp.add, [jnp.vdot(x, x) for x in leaves]))


def _sign_probes(size: int, num: int, dtype: Any) -> jax.Array:
    """``(num, size)`` pseudo-random +-1 vectors from an integer hash of (probe, index).

    Deterministic on purpose: an internal estimator must not consume or invent a PRNG
    key, and the same problem must give the same step size every time.
    """
    i = jnp.arange(size, dtype=jnp.uint32)[None, :]
    return jnp.stack([_sign_values(i[0], j, dtype) for j in range(num)])


def _sign_values(i: jax.Array, j: int, dtype: Any) -> jax.Array:
    """Probe ``j``'s +-1 at the (uint32) indices ``i``."""
    h = (i * jnp.uint32(2654435761)) ^ (jnp.uint32(j + 1) * jnp.uint32(2246822519))
    h = h ^ (h >> jnp.uint32(15))
    h = h * jnp.uint32(2654435769)
    h = h ^ (h >> jnp.uint32(13))
    return jnp.where((h & jnp.uint32(1)) == 1, 1.0, -1.0).astype(dtype)


def power_iteration(
    matvec: Callable[[jax.Array], jax.Array], size: int, dtype: Any, num_iters: int = 50,
    *, start: jax.Array | None = None, return_vector: bool = False,
) -> Any:
    """Estimate the largest eigenvalue of a symmetric PSD operator by power iteration.

    Starts from ``start``, by default a fixed, non-symmetric vector (no PRNG key needed,
    results reproducible). Power iteration approaches ``lambda_max`` from below: callers
    that need a safe ``1 / L`` step add a margin. With ``return_vector=True`` returns
    ``(lambda, v)``, ``v`` the unit-norm estimate of the top eigenvector.
    """
    size = check_int(size, "size", low=1)
    num_iters = check_int(num_iters, "num_iters", low=0)
    idx = jnp.arange(size, dtype=dtype)
    # The default start is generic: not orthogonal to anything.
    v = 1.0 + 0.5 * jnp.sin(1.0 + idx) if start is None else jnp.asarray(start, dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, carry):
        v, _ = carry
        w = matvec(v)
        lam = jnp.vdot(v, w)
        nrm = jnp.linalg.norm(w)
        v = jnp.where(nrm > 0, w / jnp.where(nrm > 0, nrm, 1.0), v)
        return v, lam

    v, lam = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), dtype)))
    return (lam, v) if return_vector else lam


HESSIAN_KINDS = ("exact", "cg")


def check_cg_options(cg_tol: Any, cg_maxiter: Any) -> None:
    """CG options at the public boundary: a tolerance >= 0 and an iteration cap >= 1."""
    check_tol(cg_tol, "cg_tol")
    if cg_maxiter is not None:
        check_int(cg_maxiter, "cg_maxiter", low=1)


def make_curvature(
    hessian: Any,
    flat_fun: Callable[..., jax.Array],
    x: jax.Array,
    args: tuple,
    damping: Any = 0.0,
    *,
    unravel: Callable[[jax.Array], Any] | None = None,
    cg_tol: float = 1e-6,
    cg_maxiter: int | None = None,
) -> Curvature:
    """Build the curvature of ``flat_fun(x, *args)`` at a flat ``x``.

    ``hessian`` is ``"exact"`` (dense autodiff Hessian), ``"cg"`` (HVPs, matrix-free) or a
    callable ``hessian(params, *args)`` on the user's pytree returning either a dense
    ``(d, d)`` matrix or a function ``v -> H v`` on pytrees shaped like ``params``.
    """
    d = x.shape[0]
    if isinstance(hessian, str):
        check_choice(hessian, "hessian", HESSIAN_KINDS)
        if hessian == "exact":
            return DenseCurvature(jax.hessian(flat_fun)(x, *args), damping)
        _, op = jax.linearize(jax.grad(lambda z: flat_fun(z, *args)), x)
        return OperatorCurvature(op, d, x.dtype, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    if not callable(hessian):
        raise TypeError(
            f"hessian must be 'exact', 'cg' or a callable; got {type(hessian).__name__}."
        )
    unravel = unravel if unravel is not None else (lambda z: z)
    out = hessian(unravel(x), *args)
    if callable(out):
        op = lambda v: ravel_pytree(out(unravel(v)))[0].astype(x.dtype)
        return OperatorCurvature(op, d, x.dtype, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    h = check_square_matrix(out, d, "the matrix returned by hessian(params, *args)")
    return DenseCurvature(h.astype(compute_dtype(x.dtype)), damping)


def newton_direction(
    fun: Callable[..., jax.Array],
    x: Any,
    *args: Any,
    hessian: Any = "exact",
    damping: Any = 0.0,
    cg_tol: float = 1e-6,
    cg_maxiter: int | None = None,
) -> Any:
    """The damped Newton direction ``(H + damping I)^{-1} grad f(x)`` as a pytree like ``x``.

    ``hessian="exact"`` forms the dense Hessian and solves by Cholesky; ``"cg"`` runs
    conjugate gradients on Hessian-vector products; a callable is used as in
    :func:`make_curvature`. A Newton step is ``x - newton_direction(...)``.
    """
    damping = check_nonnegative_scalar(damping, "damping")
    check_cg_options(cg_tol, cg_maxiter)
    flat, unravel = ravel_pytree(x)
    flat_fun = lambda z, *a: fun(unravel(z), *a)
    if tree_size(x) == 0:
        raise ValueError("newton_direction needs at least one parameter.")
    out = jax.eval_shape(flat_fun, flat, *args)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"fun(x, *args) must return a real scalar for newton_direction; got "
                         f"{getattr(out, 'shape', type(out))}.")
    curv = make_curvature(
        hessian, flat_fun, flat, args, damping, unravel=unravel, cg_tol=cg_tol,
        cg_maxiter=cg_maxiter,
    )
    g = jax.grad(flat_fun)(flat, *args)
    direction = unravel(curv.solve(g).astype(flat.dtype))
    return check_finite_result(
        direction, "the Newton direction",
        "the gradient or Hessian of fun at x is not finite, or the Hessian is not positive "
        "definite (Cholesky fails, and CG finds negative curvature, on an indefinite "
        "matrix). Pass damping larger than minus its most negative eigenvalue, or a PSD "
        "approximation (Gauss-Newton) as a callable hessian.",
    )
