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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from ._base import (
    Status,
    finish_update,
    initial_fields,
    is_checkable,
    setup_problem,
    validate_solver_fields,
)
from ._curvature import DenseCurvature, _jitter
from ._masks import _topk_mask_flat
from ._obs import greedy_obs_unchecked
from ._validation import (
    check_choice,
    check_int,
    check_nonnegative_scalar,
    check_positive_scalar,
)

__all__ = ["OBSPursuit", "OBSPursuitState"]


def _mse(x: jax.Array, design: jax.Array, observations: jax.Array) -> jax.Array:
    return jnp.mean((design @ x - observations) ** 2)


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


def _default_schedule(k: int, refit: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    # Measured on d = 256, n in {64..192}, k* in {8..48}, 100 instances per cell
    # (benchmarks/recovery_baselines.py): the attempts fail on different instances, so a
    # restart that differs in both the candidate count and the step recovers most of what
    # each one alone misses (see the README, "Sparse recovery sweeps").
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

    ``run(x0, A, y)`` with ``A`` ``(n, d)``, ``y`` ``(n,)`` and ``x0`` ``(d,)`` is jit- and
    vmap-able: ``jax.vmap(solver.run, in_axes=(None, 0, 0))(x0, As, ys)``. ``update`` is
    one step of the first attempt (``run`` adds the restarts). Measured on d = 256, 100
    noiseless Gaussian instances per cell (``benchmarks/recovery_baselines.py``), it
    recovers more instances than HTP and the baselines where ``k*/n`` is large.

    Example:
      >>> x, state = OBSPursuit(k=16).run(jnp.zeros(256), A, y)
      >>> state.status  # 0: the support stopped changing
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
    fun = staticmethod(_mse)  # the loss the state reports (validate_solver_fields needs it)

    def __post_init__(self):
        validate_solver_fields(self, "OBSPursuit")
        if not isinstance(self.refit, bool):
            raise TypeError(f"refit must be True or False; got {self.refit!r}.")
        cands, steps = self.candidates, self.step
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
        for name in ("damping", "restart_tol"):
            if is_checkable(getattr(self, name)):
                check_nonnegative_scalar(getattr(self, name), name)
        if is_checkable(self.step_size):
            check_positive_scalar(self.step_size, "step_size")

    def _attempts(self, design: jax.Array) -> list[tuple[int, str]]:
        """The schedule with sizes capped at ``min(n, d)``, repeated attempts dropped."""
        n, d = design.shape
        out = []
        for c, s in zip(self.candidates, self.step, strict=True):
            if (min(c, n, d), s) not in out:
                out.append((min(c, n, d), s))
        return out

    def init_state(self, x0: jax.Array, design: jax.Array, observations: jax.Array
                   ) -> OBSPursuitState:
        """Validate shapes, evaluate the loss and gradient at ``x0`` and factor the Gram matrix."""
        design, observations = jnp.asarray(design), jnp.asarray(observations)
        if design.ndim != 2 or observations.shape != design.shape[:1] or jnp.shape(x0) != (
            design.shape[1],
        ):
            raise ValueError(
                f"OBSPursuit needs A (n, d), y (n,) and x0 (d,); got shapes {design.shape}, "
                f"{observations.shape} and {jnp.shape(x0)}."
            )
        prob = setup_problem(self.fun, x0, (design, observations), self.k, "OBSPursuit")
        fields = initial_fields(prob, x0, (design, observations), self.k)
        if "newton" in self.step:
            factor = self._factor(design)
        else:  # no attempt needs the factorization
            factor = jnp.zeros((0, 0), fields["value"].dtype)
        return OBSPursuitState(**fields, factor=factor, attempt=jnp.zeros((), jnp.int32),
                               residual=(observations - design @ x0).astype(x0.dtype))

    def _factor(self, design: jax.Array) -> jax.Array:
        """The lower Cholesky factor of ``G + mu I``, ``G`` the smaller Gram matrix."""
        n, d = design.shape
        gram = design @ design.T if n < d else design.T @ design
        mu = jnp.asarray(self.damping, gram.dtype) * jnp.trace(gram) / gram.shape[0]
        eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
        gram = gram + (mu + _jitter(jnp.diagonal(gram))) * eye
        return jnp.linalg.cholesky(gram)

    def update(self, x: jax.Array, state: OBSPursuitState, design: jax.Array,
               observations: jax.Array) -> tuple[jax.Array, OBSPursuitState]:
        """One step of the first attempt; returns ``(x_new, new_state)``."""
        attempt = self._attempts(design)[0]
        return self._update(attempt, x, state, design, observations)

    def _update(self, attempt, x, state, design, observations):
        args = (design, observations)
        prob = setup_problem(self.fun, x, args, self.k, "OBSPursuit", validate=False)
        x_new, mask = self._step(attempt, x, state, design, observations)
        # f and its gradient in closed form, from the new residual (one pass over A each).
        n = design.shape[0]
        residual = (observations - design @ x_new).astype(x.dtype)
        value = jnp.mean(residual**2)
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

    def run(self, x0: jax.Array, design: jax.Array, observations: jax.Array):
        """Iterate from ``x0`` (restarting as scheduled) until the support is stable."""
        if self.jit:
            return _run_compiled(self, x0, design, observations)
        return _run(self, x0, design, observations)

    def _step(self, attempt, x, state, design, observations):
        c, how = attempt
        n, d = design.shape
        if how == "gradient":  # A^T r = -(n / 2) grad f: no pass over A
            if c > self.k and self.refit:
                # Only the ranking of |x~| off the support matters here (the fit does not
                # use x~), and it does not depend on the step's scale: skip a pass over A.
                scale = 1.0
            else:
                scale = jnp.sum(design * design) / d  # mean squared column norm
            step = (-0.5 * n / scale) * state.grad
        elif n < d:  # dual (Woodbury) form
            step = design.T @ cho_solve((state.factor, True), state.residual)
        else:
            step = cho_solve((state.factor, True), -0.5 * n * state.grad)
        x_tilde = x + jnp.asarray(self.step_size, x.dtype) * step
        score = jnp.abs(x_tilde)
        if c > self.k:  # the current support is always a candidate (ranked first)
            score = jnp.where(x != 0, score + jnp.max(score) + 1.0, score)
        if c == 0:
            return jnp.zeros_like(x), jnp.zeros((d,), bool)
        mask = _topk_mask_flat(score, c)
        if not self.refit:
            return jnp.where(mask, x_tilde, 0.0), mask
        idx = jnp.nonzero(mask, size=c)[0]
        sub = design[:, idx]
        curv = DenseCurvature(sub.T @ sub)  # H_CC up to the factor 2/n
        z = curv.solve(sub.T @ observations).astype(x.dtype)
        if c > self.k:
            z, keep = greedy_obs_unchecked(z, curv.inverse(), self.k)
        else:
            keep = jnp.ones((c,), bool)
        mask = jnp.zeros((d,), bool).at[idx].set(keep)
        return jnp.zeros_like(x).at[idx].set(jnp.where(keep, z, 0.0)), mask


def _as_tuple(value, name):
    if isinstance(value, str) or not isinstance(value, tuple | list):
        return (value,)
    if not value:
        raise ValueError(f"{name} must give at least one attempt; got {value!r}.")
    return tuple(value)


def _loop(solver, attempt, x, state, args):
    def cond(carry):
        _, state = carry
        return (state.iter_num < solver.maxiter) & (state.status == Status.MAX_STEPS_REACHED)

    def body(carry):
        return solver._update(attempt, *carry, *args)

    return jax.lax.while_loop(cond, body, (x, state))


def _run(solver, x0, design, observations):
    args = (design, observations)
    attempts = solver._attempts(design)
    state = solver.init_state(x0, *args)
    x, state = _loop(solver, attempts[0], x0, state, args)
    if len(attempts) == 1:
        return x, state
    prob = setup_problem(solver.fun, x0, args, solver.k, "OBSPursuit", validate=False)
    zero = jnp.zeros_like(x0)
    start = initial_fields(prob, zero, args, solver.k)
    scale = jnp.mean(observations**2)
    tol = jnp.asarray(solver.restart_tol, scale.dtype)
    for j, attempt in enumerate(attempts[1:], start=1):
        need = (state.status != Status.NONFINITE) & (state.value > tol**2 * scale)
        # Lanes that fit (or failed on bad data) start as finished: in a batch the
        # attempt's while_loop then only iterates while some lane still needs it.
        begin = state._replace(**start, attempt=jnp.asarray(j, jnp.int32),
                               residual=observations.astype(state.residual.dtype))
        begin = begin._replace(status=jnp.where(need, begin.status, Status.SUCCESSFUL)
                               .astype(jnp.int32))
        x_j, state_j = _loop(solver, attempt, zero, begin, args)
        better = need & (state_j.status != Status.NONFINITE) & (state_j.value < state.value)
        total = state.iter_num + jnp.where(need, state_j.iter_num, 0)
        x, state = jax.tree.map(lambda new, old, b=better: jnp.where(b, new, old),
                                (x_j, state_j), (x, state))
        state = state._replace(iter_num=total)
    return x, state


_run_compiled = jax.jit(_run)


jax.tree_util.register_dataclass(
    OBSPursuit,
    data_fields=["restart_tol", "damping", "step_size"],
    meta_fields=[f.name for f in dataclasses.fields(OBSPursuit)
                 if f.name not in ("restart_tol", "damping", "step_size")],
)
