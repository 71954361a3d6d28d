"""OBS pursuit: I-OBS for sparse least squares, with a candidate set and greedy OBS pruning.

For ``f(x) = (1/n) ||A x - y||^2`` the Hessian ``H = 2 A^T A / n`` is constant, so it is
factored once per problem (Cholesky), and the damped Newton step has a closed form in
whichever of the primal (``d x d``) or dual (``n x n``, Woodbury) spaces is smaller:

    (A^T A + mu I)^{-1} A^T r  =  A^T (A A^T + mu I)^{-1} r,        r = y - A x_t.

One update (Subspace Pursuit's shape, Dai & Milenkovic 2009, with the OBS projection and
greedy OBS in place of magnitude pruning):

    x~      = x_t + A^T (A A^T + mu I)^{-1} (y - A x_t)       Newton step (dual form)
              (or x_t + A^T r / L, the "gradient" step, L the mean squared column norm)
    C       = supp(x_t) + the largest |x~_i| off it, |C| = c   candidates (c >= k)
    z       = argmin_{x_P = 0, P = not C} ||A x - y||^2       OBS projection onto C
    x_{t+1} = greedy OBS from z with G = (A_C^T A_C)^{-1} down to k entries

Greedy OBS on a quadratic is exact, so ``x_{t+1}`` is the least-squares fit on its own
support (the "refit" of HTP). An attempt stops when the support no longer changes (the
relative change of ``x`` is then exactly 0) or the loss stops decreasing.

Restarts: an attempt that stops on a support that does not fit the data is followed by
another from zero with a different candidate count and step (the default schedule is
Newton with ``1.5 k`` candidates, then gradient with ``1.25 k``); the lower-loss attempt
is returned. The attempts fail on different instances: on d = 256 compressed sensing
(``benchmarks/recovery_baselines.py``) the two together recover 81.35% of the grid's
instances against 80.0% and 80.05% for each alone.

With ``candidates=k`` this is Topk-I-OBS for least squares with a constant, factored
Hessian: ``x_{t+1}`` is the least-squares fit on the top-``k`` of ``|x~|`` (``refit=True``)
or ``x~`` restricted to it (``refit=False``, the "plain" Topk-I-OBS of the authors'
code; with ``step_size = 2/n`` it is their synthetic experiment, whose loss is a mean
but whose Hessian is ``A^T A``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from iobs_jax.core.curvature import cholesky_inverse
from iobs_jax.core.masks import topk_any
from iobs_jax.core.obs import greedy_obs_unchecked
from iobs_jax.core.support import count_jitter, support_cholesky, support_slots
from iobs_jax.core.validation import (
    check_choice,
    check_int,
    check_nonnegative_scalar,
    check_positive_scalar,
)
from iobs_jax.solvers.base import (
    Status,
    finish_update,
    initial_fields,
    is_checkable,
    register_solver,
    setup_problem,
    sparsity_bound,
    validate_solver_fields,
)

__all__ = ["OBSPursuit", "OBSPursuitState"]


def _mean_square(v: jax.Array, rows: Any = None) -> jax.Array:
    """``||v||^2 / rows``, the mean over the first ``rows`` entries (the others are zero)."""
    return jnp.mean(v**2) if rows is None else jnp.sum(v**2) / rows


def _mse(x: jax.Array, design: jax.Array, observations: jax.Array, rows: Any = None
         ) -> jax.Array:
    """``||A x - y||^2 / rows``: the mean squared error over the ``rows`` measurements."""
    return _mean_square(design @ x - observations, rows)


def _rows(design: jax.Array, rows: Any) -> Any:
    return design.shape[0] if rows is None else rows


def _greater(a: Any, b: Any) -> Any:
    """``a > b``: a Python bool for static sizes, a traced one otherwise."""
    if isinstance(a, int) and isinstance(b, int):
        return a > b
    return jnp.greater(a, b)


def _select(cond: Any, if_true, if_false) -> Any:
    """``if_true()`` or ``if_false()``: chosen now for a Python bool, by ``where`` if traced."""
    if isinstance(cond, bool):
        return if_true() if cond else if_false()
    return jnp.where(cond, if_true(), if_false())


def _at_most(*sizes: Any) -> Any:
    """``min`` of sizes that may be traced (a Python int when all are static)."""
    if all(isinstance(v, int) for v in sizes):
        return min(sizes)
    return functools.reduce(jnp.minimum, sizes)


class OBSPursuitState(NamedTuple):
    """State of :class:`OBSPursuit`: the fields of :class:`IOBSState`, the factor, and more.

    Attributes:
      iter_num, value, grad, error, mask, status: as in :class:`IOBSState` (``value`` is
        the mean squared error).
      factor: the lower Cholesky factor of ``A A^T + mu I`` (``n < d``) or ``A^T A + mu I``
        (``n >= d``), computed once by ``init_state`` (two triangular solves per step
        cost less than forming the inverse: a solve at n = 192, d = 256, k = 8, where the
        set-up dominates, took 1.6 ms instead of 2.9 ms on CPU);
        ``(0, 0)`` when no attempt takes a Newton step.
      attempt: which attempt (index into the schedule) produced the iterate.
      residual: ``y - A x`` (``(n,)``), kept so that a step costs two or three passes over
        ``A`` instead of five.
    """

    iter_num: jax.Array
    value: jax.Array
    grad: jax.Array
    error: jax.Array
    mask: jax.Array
    status: jax.Array
    factor: jax.Array
    attempt: jax.Array
    residual: jax.Array


STEPS = ("newton", "gradient")


def _default_schedule(k: Any, refit: bool) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    # Measured on d = 256, n in {64..192}, k* in {8..48}, 100 instances per cell
    # (benchmarks/recovery_baselines.py): the attempts fail on different instances, so a
    # restart that differs in both the candidate count and the step recovers most of what
    # each one alone misses (see the README, "Sparse recovery sweeps"). k may be traced.
    if not refit:
        return (k,), ("newton",)
    return (k + k // 2, k + k // 4), ("newton", "gradient")


@dataclasses.dataclass(frozen=True)
class OBSPursuit:
    """I-OBS pursuit for ``min ||A x - y||^2 s.t. ||x||_0 <= k`` (see the module docstring).

    Attempts and restarts: ``run`` first iterates from ``x0`` with the first candidate
    count and step. If it stops at a point that does not fit the data (relative residual
    ``||A x - y|| / ||y|| > restart_tol``) it restarts from zero with the next entry of the
    schedule, and so on; it returns the attempt with the lowest loss (``state.attempt``
    says which). In a batch (``vmap``) the lanes that already fit wait, so a restart costs
    time only in batches where some instance needs it.

    Args:
      k: number of nonzeros kept.
      candidates: ``c``, the size of the candidate set (``k <= c``), or one size per
        attempt. ``None`` (default): ``(k + k // 2, k + k // 4)`` with ``step=("newton",
        "gradient")`` (two attempts), or ``k`` when ``refit=False``. Sizes are capped at
        ``min(n, d)`` (beyond ``n`` the fit on ``C`` is not unique). ``c = k`` is
        Topk-I-OBS in dual form with a least-squares refit.
      step: ``"newton"`` (``x~ = x + eta (A^T A + mu I)^{-1} A^T r``, the I-OBS step) or
        ``"gradient"`` (``x~ = x + eta A^T r / L`` with ``L`` the mean squared column norm:
        candidates ranked by correlation with the residual, as in Subspace Pursuit), or
        one per attempt (a single value applies to every attempt). ``None``: the default
        schedule's steps when ``candidates`` is ``None``, else ``"newton"``.
      restart_tol: restart when the relative residual is above it (default ``1e-4``).
        With noisy data every instance restarts (the lower-loss attempt is kept); set it
        above the noise level, or give one attempt, to skip the restarts.
      damping: ``mu`` relative to the mean diagonal of the smaller Gram matrix
        (``mu = damping * trace(A A^T) / min(n, d)``); it only regularizes the Newton step.
      step_size: ``eta`` in the steps above (default 1).
      refit: ``False`` keeps ``x~`` on the chosen support instead of the least-squares
        fit (needs ``candidates=k``: without a fit there is no OBS pruning).
      monotone: stop an attempt (status ``SUCCESSFUL``, the better iterate kept) as soon
        as an update does not lower the loss, Subspace Pursuit's rule: without it an
        instance that cannot be recovered cycles among supports until ``maxiter``.
      maxiter: iteration cap of each attempt (``state.iter_num`` counts all of them).
      tol, jit: as in :class:`IOBS`.
      max_k: a static bound that lets ``k`` be a traced integer ``<= max_k`` (a pytree
        leaf: a jitted function that takes the solver compiles once for every ``k``, as
        sweeps need). The candidate sets are then padded to the counts of ``max_k``, and
        ``candidates`` are functions of ``k`` (``candidates=lambda k: k``; default: the
        default schedule's counts).

    ``run(x0, A, y)`` with ``A`` ``(n, d)``, ``y`` ``(n,)`` and ``x0`` ``(d,)`` is jit- and
    vmap-able: ``jax.vmap(solver.run, in_axes=(None, 0, 0))(x0, As, ys)``. An optional
    fourth argument ``rows`` (``run(x0, A, y, rows)``, may be traced) says that only the
    first ``rows`` rows of ``A`` and ``y`` are measurements and the others zero padding
    (a sweep pads every cell of a grid to one shape): the loss, the damping and the cap on
    the candidate counts then use ``rows``; the primal or dual form still follows the
    padded shape. ``update`` is
    one step of the first attempt (``run`` adds the restarts). Measured on d = 256, 100
    noiseless Gaussian instances per cell (``benchmarks/recovery_baselines.py``), it
    recovers more instances than HTP and the baselines where ``k*/n`` is large.

    Example:
      >>> import jax
      >>> from iobs_jax.problems import sparse_linear_regression
      >>> p = sparse_linear_regression(jax.random.key(0), n=96, d=256, k=16)
      >>> x, state = OBSPursuit(k=16).run(jnp.zeros(256), p.design, p.observations)
      >>> int(state.status), bool(jnp.all((x != 0) == p.support))   # 0: support stable
      (0, True)
    """

    k: int
    candidates: int | tuple[int, ...] | None = None
    step: str | tuple[str, ...] | None = None
    restart_tol: Any = 1e-4
    damping: Any = 1e-6
    step_size: Any = 1.0
    refit: bool = True
    monotone: bool = True
    maxiter: int = 50
    tol: float = 1e-6
    jit: bool = True
    max_k: int | None = None
    fun = staticmethod(_mse)  # the loss the state reports (validate_solver_fields needs it)

    def __post_init__(self):
        validate_solver_fields(self, "OBSPursuit")
        if not isinstance(self.refit, bool):
            raise TypeError(f"refit must be True or False; got {self.refit!r}.")
        cands, steps = self.candidates, self.step
        if self.max_k is not None:
            self._normalize_traced(cands, steps)
            self._check_scalars()
            return
        if cands is None and steps is None:
            cands, steps = _default_schedule(self.k, self.refit)
        cands = (self.k + self.k // 2 if self.refit else self.k) if cands is None else cands
        cands = _as_tuple(cands, "candidates")
        steps = _as_tuple("newton" if steps is None else steps, "step")
        if len(cands) != len(steps) and 1 not in (len(cands), len(steps)):
            raise ValueError(f"candidates and step give {len(cands)} and {len(steps)} "
                             "attempts; give one value or one per attempt for each.")
        size = max(len(cands), len(steps))
        cands, steps = cands * (size // len(cands)), steps * (size // len(steps))
        for c in cands:
            check_int(c, "candidates", low=self.k)
        for s in steps:
            check_choice(s, "step", STEPS)
        if not self.refit and any(c != self.k for c in cands):
            raise ValueError("OBSPursuit(refit=False) keeps x~ on a top-k support; it needs "
                             "candidates=k (candidate pruning is a least-squares fit).")
        # Normalized to hashable tuples: they are static fields (they fix array shapes).
        object.__setattr__(self, "candidates", cands)
        object.__setattr__(self, "step", steps)
        self._check_scalars()

    def _normalize_traced(self, cands, steps):
        """With ``max_k``: candidate counts are functions of the (traced) ``k``."""
        if cands is None and steps is None:
            return  # the default schedule, evaluated for the traced k
        if cands is None:
            cands = _more_by_half if self.refit else _same_count
        cands, steps = _as_tuple(cands, "candidates"), _as_tuple(steps or "newton", "step")
        if not all(callable(c) for c in cands):
            raise ValueError("OBSPursuit(max_k=...) takes candidate counts as functions of k "
                             "(e.g. candidates=lambda k: k), since k may be traced.")
        if len(cands) != len(steps) and 1 not in (len(cands), len(steps)):
            raise ValueError(f"candidates and step give {len(cands)} and {len(steps)} "
                             "attempts; give one value or one per attempt for each.")
        size = max(len(cands), len(steps))
        cands, steps = cands * (size // len(cands)), steps * (size // len(steps))
        for c, s in zip(cands, steps, strict=True):
            check_int(c(self.max_k), "candidates(max_k)", low=self.max_k)
            check_choice(s, "step", STEPS)
        if not self.refit and any(c(self.max_k) != self.max_k for c in cands):
            raise ValueError("OBSPursuit(refit=False) keeps x~ on a top-k support; it needs "
                             "candidates=k (candidate pruning is a least-squares fit).")
        object.__setattr__(self, "candidates", cands)
        object.__setattr__(self, "step", steps)

    def _check_scalars(self):
        for name in ("damping", "restart_tol"):
            if is_checkable(getattr(self, name)):
                check_nonnegative_scalar(getattr(self, name), name)
        if is_checkable(self.step_size):
            check_positive_scalar(self.step_size, "step_size")

    def _schedule(self, k: Any) -> tuple[tuple[Any, ...], tuple[str, ...]]:
        """Candidate counts (for sparsity ``k``) and steps of the attempts."""
        if self.max_k is None:
            return self.candidates, self.step
        if self.candidates is None:
            return _default_schedule(k, self.refit)
        return tuple(c(k) for c in self.candidates), self.step

    def _attempts(self, design: jax.Array, rows: Any = None) -> list[tuple]:
        """``(count, capacity, step, count > k)`` per attempt, repeated attempts dropped.

        ``count`` is the candidate count capped at ``min(rows, d)`` (traced when ``k`` or
        ``rows`` is), ``capacity`` its static bound (the count of ``max_k`` capped at the
        padded ``min(n, d)``): candidate blocks are padded to it.
        """
        n, d = design.shape
        counts, steps = self._schedule(self.k)
        bounds, _ = self._schedule(sparsity_bound(self))
        out = []
        for c, b, s in zip(counts, bounds, steps, strict=True):
            count = _at_most(c, _rows(design, rows), d)
            # More candidates than k (then greedy OBS prunes): known statically when the
            # count is static or is k itself (candidates=lambda k: k with a traced k).
            more = False if c is self.k else _greater(count, self.k)
            attempt = (count, min(b, n, d), s, more)
            static = isinstance(count, int)  # traced counts (distinct steps) are kept
            if not static or attempt not in out:
                out.append(attempt)
        return out

    def _steps(self) -> tuple[str, ...]:
        return self._schedule(self.k)[1]

    def init_state(self, x0: jax.Array, design: jax.Array, observations: jax.Array,
                   rows: Any = None) -> OBSPursuitState:
        """Validate shapes, evaluate the loss and gradient at ``x0`` and factor the Gram matrix."""
        design, observations = jnp.asarray(design), jnp.asarray(observations)
        if design.ndim != 2 or observations.shape != design.shape[:1] or jnp.shape(x0) != (
            design.shape[1],
        ):
            raise ValueError(
                f"OBSPursuit needs A (n, d), y (n,) and x0 (d,); got shapes {design.shape}, "
                f"{observations.shape} and {jnp.shape(x0)}."
            )
        if rows is not None and is_checkable(rows):
            check_int(rows, "rows", low=1, high=design.shape[0])
        args = _args(design, observations, rows)
        prob = setup_problem(self.fun, x0, args, sparsity_bound(self), "OBSPursuit")
        fields = initial_fields(prob, x0, args, self.k)
        if "newton" in self._steps():
            factor = self._factor(design, rows)
        else:  # no attempt needs the factorization
            factor = jnp.zeros((0, 0), fields["value"].dtype)
        return OBSPursuitState(**fields, factor=factor, attempt=jnp.zeros((), jnp.int32),
                               residual=(observations - design @ x0).astype(x0.dtype))

    def _factor(self, design: jax.Array, rows: Any = None) -> jax.Array:
        """The lower Cholesky factor of ``G + mu I``, ``G`` the smaller Gram matrix.

        With padded rows the dual Gram has zero rows and columns beyond ``rows``: ``mu``
        and the round-off jitter are those of the unpadded matrix (``rows`` its size), and
        the padded block ``(mu + jitter) I`` only ever meets zero residuals.
        """
        n, d = design.shape
        gram = design @ design.T if n < d else design.T @ design
        size = _rows(design, rows) if n < d else d
        mu = jnp.asarray(self.damping, gram.dtype) * jnp.trace(gram) / size
        eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
        gram = gram + (mu + count_jitter(jnp.diagonal(gram), size)) * eye
        return jnp.linalg.cholesky(gram)

    def update(self, x: jax.Array, state: OBSPursuitState, design: jax.Array,
               observations: jax.Array, rows: Any = None) -> tuple[jax.Array, OBSPursuitState]:
        """One step of the first attempt; returns ``(x_new, new_state)``."""
        attempt = self._attempts(design, rows)[0]
        return self._update(attempt, x, state, design, observations, rows)

    def _update(self, attempt, x, state, design, observations, rows=None):
        args = _args(design, observations, rows)
        prob = setup_problem(self.fun, x, args, sparsity_bound(self), "OBSPursuit",
                             validate=False)
        x_new, mask = self._step(attempt, x, state, design, observations, rows)
        # f and its gradient in closed form, from the new residual (one pass over A each).
        n = _rows(design, rows)
        residual = (observations - design @ x_new).astype(x.dtype)
        value = _mean_square(residual, rows)
        grad = (-2.0 / n) * (design.T @ residual)
        if self.monotone:  # Subspace Pursuit's rule: stop once the loss stops decreasing
            worse = (value >= state.value) & (state.iter_num > 0)
            x_new, mask = jnp.where(worse, x, x_new), jnp.where(worse, state.mask, mask)
            residual = jnp.where(worse, state.residual, residual)
            value, grad = jnp.where(worse, state.value, value), jnp.where(worse, state.grad, grad)
        x_out, fields = finish_update(prob, x, x_new, mask, state, args, self.tol,
                                      evaluated=(value, grad))
        # finish_update keeps x on a non-finite step: keep its residual with it.
        residual = jnp.where(fields["status"] == Status.NONFINITE, state.residual, residual)
        return x_out, state._replace(**fields, residual=residual)

    def run(self, x0: jax.Array, design: jax.Array, observations: jax.Array,
            rows: Any = None):
        """Iterate from ``x0`` (restarting as scheduled) until the support is stable."""
        if rows is not None and is_checkable(rows):  # inside jit it is a tracer
            check_int(rows, "rows", low=1, high=jnp.shape(design)[0])
        if self.jit:
            return _run_compiled(self, x0, design, observations, rows)
        return _run(self, x0, design, observations, rows)

    def _step(self, attempt, x, state, design, observations, rows=None):
        c, capacity, how, more = attempt  # more: a Python bool unless c or k is traced
        n, d = _rows(design, rows), design.shape[1]
        if how == "gradient":  # A^T r = -(n / 2) grad f: no pass over A
            # With c > k only the ranking of |x~| off the support matters (the fit does
            # not use x~), and it does not depend on the step's scale: skip a pass over A.
            columns = lambda: jnp.sum(design * design) / d  # mean squared column norm
            scale = _select(more & self.refit, lambda: 1.0, columns)
            step = (-0.5 * n / scale) * state.grad
        elif design.shape[0] < d:  # dual (Woodbury) form
            step = design.T @ cho_solve((state.factor, True), state.residual)
        else:
            step = cho_solve((state.factor, True), -0.5 * n * state.grad)
        x_tilde = x + jnp.asarray(self.step_size, x.dtype) * step
        score = jnp.abs(x_tilde)
        # With c > k the current support is always a candidate (ranked first).
        score = _select(more, lambda: jnp.where(x != 0, score + jnp.max(score) + 1.0, score),
                        lambda: score)
        if capacity == 0:
            return jnp.zeros_like(x), jnp.zeros((d,), bool)
        mask = topk_any(score, c)
        if not self.refit:
            return jnp.where(mask, x_tilde, 0.0), mask
        return self._fit_candidates(mask, c, capacity, more, x.dtype, design, observations)

    def _fit_candidates(self, mask, c, capacity, more, dtype, design, observations):
        """Least squares on the candidates ``C = mask``, then greedy OBS down to ``k``.

        The fit ``z = (A_C^T A_C)^{-1} A_C^T y`` and ``G = (A_C^T A_C)^{-1}`` (``H_CC`` up to
        the factor ``2/n``) come from one Cholesky factor of the gathered block, padded to
        ``capacity`` slots when ``c`` is traced (padding: ``z = 0``, decoupled in ``G``, so
        greedy OBS removes it first at no cost and the kept entries are the unpadded ones).
        """
        d = design.shape[1]
        idx, valid = support_slots(mask, c, capacity)
        sub = jnp.where(valid, design[:, idx], 0.0)
        chol = support_cholesky(sub.T @ sub, valid, c)
        z = cho_solve((chol, True), sub.T @ observations).astype(dtype)
        if more is False:  # c == k: nothing to prune
            keep = valid
        else:
            g = cholesky_inverse(chol)
            z, keep = greedy_obs_unchecked(z, g, self.k)
        keep = keep & valid
        mask = jnp.zeros((d,), bool).at[idx].max(keep)
        return jnp.zeros((d,), dtype).at[idx].add(jnp.where(keep, z, 0.0)), mask


def _same_count(k: Any) -> Any:
    """``candidates=k`` for a traced ``k``: Topk-I-OBS with refit (or HTP, gradient step)."""
    return k


def _more_by_half(k: Any) -> Any:
    return k + k // 2


def _as_tuple(value, name):
    if isinstance(value, str) or not isinstance(value, tuple | list):
        return (value,)
    if not value:
        raise ValueError(f"{name} must give at least one attempt; got {value!r}.")
    return tuple(value)


def _args(design, observations, rows):
    return (design, observations) if rows is None else (design, observations, rows)


def _loop(solver, attempt, x, state, design, observations, rows):
    def cond(carry):
        _, state = carry
        return (state.iter_num < solver.maxiter) & (state.status == Status.MAX_STEPS_REACHED)

    def body(carry):
        return solver._update(attempt, *carry, design, observations, rows)

    return jax.lax.while_loop(cond, body, (x, state))


def _run(solver, x0, design, observations, rows=None):
    data = (design, observations, rows)
    args = _args(*data)
    attempts = solver._attempts(design, rows)
    state = solver.init_state(x0, *args)
    x, state = _loop(solver, attempts[0], x0, state, *data)
    if len(attempts) == 1:
        return x, state
    prob = setup_problem(solver.fun, x0, args, sparsity_bound(solver), "OBSPursuit",
                         validate=False)
    zero = jnp.zeros_like(x0)
    start = initial_fields(prob, zero, args, solver.k)
    scale = _mean_square(observations, rows)
    tol = jnp.asarray(solver.restart_tol, scale.dtype)
    for j, attempt in enumerate(attempts[1:], start=1):
        need = (state.status != Status.NONFINITE) & (state.value > tol**2 * scale)
        # Lanes that fit (or failed on bad data) start as finished: in a batch the
        # attempt's while_loop then only iterates while some lane still needs it.
        begin = state._replace(**start, attempt=jnp.asarray(j, jnp.int32),
                               residual=observations.astype(state.residual.dtype))
        begin = begin._replace(status=jnp.where(need, begin.status, Status.SUCCESSFUL)
                               .astype(jnp.int32))
        x_j, state_j = _loop(solver, attempt, zero, begin, *data)
        better = need & (state_j.status != Status.NONFINITE) & (state_j.value < state.value)
        total = state.iter_num + jnp.where(need, state_j.iter_num, 0)
        x, state = jax.tree.map(lambda new, old, b=better: jnp.where(b, new, old),
                                (x_j, state_j), (x, state))
        state = state._replace(iter_num=total)
    return x, state


_run_compiled = jax.jit(_run)


register_solver(OBSPursuit, ("restart_tol", "damping", "step_size"))
