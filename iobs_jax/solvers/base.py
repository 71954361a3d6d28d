"""What the IHT and I-OBS solvers share: status codes, the run loop, the problem setup.

Solvers follow the jaxopt shape: ``init_state(x0, *args)``, ``update(x, state, *args)``
and ``run(x0, *args)``, with ``fun(x, *args) -> scalar`` and ``x`` any pytree. Internally
every step works on the flattened parameter vector (``ravel_pytree``): ``k`` counts
globally over the leaves and dense curvature matrices index that vector.

Failures at run time (non-finite data, a Hessian that cannot be factored) never come back
as silent NaNs: the step is rejected, the last finite iterate is kept, and
``state.status`` is set to :attr:`Status.NONFINITE`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from iobs_jax.core.masks import flatten, topk_any, tree_size, unflatten_like
from iobs_jax.core.validation import check_float_array, check_int, check_tol, is_concrete

__all__ = ["Status", "trajectory", "raise_if_failed"]


class Status(enum.IntEnum):
    """Outcome codes stored as ``state.status`` (an int32 array, batched under vmap).

    - ``SUCCESSFUL`` (0): the relative change of the iterate fell to ``tol``.
    - ``MAX_STEPS_REACHED`` (1): not converged yet (after ``run``: ``maxiter`` was reached).
    - ``NONFINITE`` (2): the objective, gradient, curvature or a step was NaN/inf (bad
      data, or a Hessian that is not positive definite, so that its Cholesky factor
      fails: add ``damping``); the returned ``x`` is the last finite iterate (``x0`` if
      the data itself is bad).
    """

    SUCCESSFUL = 0
    MAX_STEPS_REACHED = 1
    NONFINITE = 2


def raise_if_failed(state: NamedTuple) -> None:
    """Raise ``RuntimeError`` if a (possibly batched) solver state reports non-finite values.

    Call it outside ``jit`` on the state that ``run`` returned, as a ``throw=True`` style
    check: ``x, state = solver.run(...); raise_if_failed(state)``.
    """
    if not hasattr(state, "status"):
        raise TypeError(f"raise_if_failed needs a solver state with a .status field (what "
                        f"run returns second); got {type(state).__name__}.")
    status = jax.device_get(state.status)
    bad = jnp.asarray(status) == Status.NONFINITE
    if bool(jnp.any(bad)):
        n = int(jnp.sum(bad))
        raise RuntimeError(
            f"{n} solve(s) hit non-finite values (NaN/inf in the data, the objective or the "
            "curvature). Check the inputs for NaN/inf, or add damping for a singular Hessian."
        )


class Problem(NamedTuple):
    """``fun`` seen as a function of the flat parameter vector."""

    flat_fun: Callable[..., jax.Array]
    unravel: Callable[[jax.Array], Any]
    size: int
    like: Any  # the parameter pytree, for shaping flat masks

    def unravel_mask(self, flat_mask: jax.Array) -> Any:
        return unflatten_like(flat_mask, self.like)


def setup_problem(
    fun: Callable[..., Any], x0: Any, args: tuple, k: int, name: str, validate: bool = True
) -> Problem:
    """Validate ``x0``, ``k`` and ``fun(x0, *args)`` statically and flatten the problem.

    ``validate=False`` (used by ``update``, whose inputs came from ``init_state``) skips
    the abstract evaluation of ``fun``.
    """
    _, unravel = ravel_pytree(x0)
    d = tree_size(x0)
    if not validate:
        return Problem(lambda z, *a: fun(unravel(z), *a), unravel, d, x0)
    leaves = jax.tree.leaves(x0)
    if not leaves:
        raise ValueError(f"{name}: x0 has no array leaves.")
    for leaf in leaves:
        dtype = check_float_array(leaf, "x0").dtype
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{name}: x0 must hold floating-point arrays (the iterates are real); got "
                f"dtype {jnp.result_type(leaf)}. Pass x0.astype({dtype.name})."
            )
    check_int(k, "k", low=0, high=d)
    try:
        out = jax.eval_shape(lambda x: fun(x, *args), x0)  # args stay as given
    except Exception as err:  # re-raised with a message that says what to fix
        raise ValueError(
            f"{name}: fun(x0, *args) failed for x0 with leaf shapes "
            f"{[jnp.shape(leaf) for leaf in leaves]}; check that x0 and the data arguments "
            f"have matching shapes. Original error: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"{name}: fun(x0, *args) must return a real scalar; got "
            f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}."
        )
    return Problem(lambda z, *a: fun(unravel(z), *a), unravel, d, x0)


def relative_change(x_new: jax.Array, x: jax.Array) -> jax.Array:
    """``||x_new - x|| / max(||x_new||, tiny)``: the stopping criterion of every solver."""
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.linalg.norm(x_new - x) / jnp.maximum(jnp.linalg.norm(x_new), tiny)


def all_finite(*arrays: jax.Array) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def initial_fields(prob: Problem, x: jax.Array, args: tuple, k: int) -> dict:
    """The state fields every solver shares, evaluated at the flat starting point ``x``."""
    value, grad = jax.value_and_grad(prob.flat_fun)(x, *args)
    status = jnp.where(all_finite(value, grad, x), Status.MAX_STEPS_REACHED, Status.NONFINITE)
    return dict(
        iter_num=jnp.zeros((), jnp.int32),
        value=value.astype(x.dtype),
        grad=prob.unravel(grad),
        error=jnp.asarray(jnp.inf, x.dtype),
        mask=prob.unravel_mask(topk_any(jnp.abs(x), k)),
        status=status.astype(jnp.int32),
    )


def finish_update(
    prob: Problem, x: jax.Array, x_new: jax.Array, mask: jax.Array, state, args: tuple, tol,
    evaluated: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, dict]:
    """Evaluate ``f`` at the proposed iterate and accept it only if everything is finite.

    ``evaluated=(value, flat_grad)`` at ``x_new`` skips the evaluation (a solver that
    already has them in closed form).

    A rejected step keeps ``x``, its value, gradient and mask, sets ``error = inf`` and
    ``status = NONFINITE``; an accepted one sets ``SUCCESSFUL`` once the relative change
    is ``<= tol``. Returns the new iterate (as a pytree) and the shared state fields.
    """
    # Round each leaf to its own dtype (a bfloat16 leaf beside a float64 one must not
    # keep float64 digits it cannot hold, or the change never falls below tol).
    x_new = ravel_pytree(prob.unravel(x_new.astype(x.dtype)))[0]
    grad = ravel_pytree(state.grad)[0]
    if evaluated is None:
        value_new, grad_new = jax.value_and_grad(prob.flat_fun)(x_new, *args)
    else:
        value_new, grad_new = evaluated
    ok = all_finite(x_new, value_new, grad_new) & (state.status != Status.NONFINITE)
    error = relative_change(x_new, x)
    # A tolerance below the coarsest leaf's resolution (1e-6 in bfloat16) is never met.
    eps = max(float(jnp.finfo(jnp.result_type(leaf)).eps) for leaf in jax.tree.leaves(prob.like))
    tol = jnp.maximum(jnp.asarray(tol, x.dtype), jnp.asarray(eps, x.dtype))
    status = jnp.where(
        ok,
        jnp.where(error <= tol, Status.SUCCESSFUL, Status.MAX_STEPS_REACHED),
        Status.NONFINITE,
    ).astype(jnp.int32)
    keep = lambda new, old: jnp.where(ok, new, old)
    fields = dict(
        iter_num=state.iter_num + 1,
        value=keep(value_new.astype(x.dtype), state.value),
        grad=prob.unravel(keep(grad_new, grad)),
        error=jnp.where(ok, error, jnp.inf).astype(x.dtype),
        mask=prob.unravel_mask(keep(mask, flatten(state.mask, bool))),
        status=status,
    )
    return prob.unravel(keep(x_new, x)), fields


def run_loop(solver, x0: Any, args: tuple):
    """``lax.while_loop`` over ``solver.update`` until converged, failed or ``maxiter``.

    With ``solver.jit`` (the default) the loop is compiled once per solver configuration
    (its static fields, ``fun`` included) and argument shapes and reused: a plain Python
    loop over instances calling ``run`` pays the compilation once, not on every call.
    The solver is a pytree, so its array fields (step size, damping) are arguments of the
    compiled function, not constants baked into it.
    """
    if solver.jit:
        return _run_compiled(solver, x0, *args)
    return _run(solver, x0, *args)


def _run(solver, x0: Any, *args: Any):
    state = solver.init_state(x0, *args)

    def cond(carry):
        _, state = carry
        return (state.iter_num < solver.maxiter) & (state.status == Status.MAX_STEPS_REACHED)

    def body(carry):
        x, state = carry
        return solver.update(x, state, *args)

    return jax.lax.while_loop(cond, body, (x0, state))


_run_compiled = jax.jit(_run)


def trajectory(solver, x0: Any, *args: Any, num_steps: int):
    """Run exactly ``num_steps`` updates and return every iterate (for convergence curves).

    Returns ``(xs, states)``: pytrees whose leaves have a leading axis of length
    ``num_steps`` holding ``x_1 .. x_T`` and their states (``lax.scan``; works under ``jit``
    and ``vmap``). Unlike ``run`` it does not stop at ``tol``; a failed solve stays at its
    last finite iterate.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from iobs_jax import IHT
      >>> from iobs_jax.problems import sparse_linear_regression, mse_loss
      >>> p = sparse_linear_regression(jax.random.key(0), n=64, d=32, k=4)
      >>> xs, states = trajectory(IHT(mse_loss, k=4), jnp.zeros(32), p.design,
      ...                         p.observations, num_steps=100)
      >>> xs.shape, states.value.shape
      ((100, 32), (100,))
    """
    num_steps = check_int(num_steps, "num_steps", low=1)
    state = solver.init_state(x0, *args)

    def body(carry, _):
        x, state = solver.update(*carry, *args)
        return (x, state), (x, state)

    _, (xs, states) = jax.lax.scan(body, (x0, state), None, length=num_steps)
    return xs, states


def validate_solver_fields(solver, name: str) -> None:
    """Checks shared by the solver dataclasses (skipped for non-concrete pytree leaves)."""
    if not callable(solver.fun):
        raise TypeError(f"{name}: fun must be callable fun(x, *args) -> scalar.")
    if getattr(solver, "max_k", None) is None:
        check_int(solver.k, "k", low=0)
    else:  # k may be traced: max_k fixes the shapes, k is checked when it is concrete
        object.__setattr__(solver, "max_k", check_int(solver.max_k, "max_k", low=0))
        _check_traced_k(solver.k, solver.max_k)
    check_int(solver.maxiter, "maxiter", low=0)
    if not isinstance(solver.jit, bool):
        raise TypeError(f"{name}: jit must be True or False; got {solver.jit!r}.")
    # tol is a static (hashable) field of a frozen dataclass: store it as a plain float
    # (the usual __post_init__ idiom for normalizing a frozen field).
    object.__setattr__(solver, "tol", check_tol(solver.tol, f"{name}: tol"))


def is_checkable(value: Any) -> bool:
    """True for a concrete number or array, the only field values worth validating.

    A solver is a pytree, so ``__post_init__`` also runs when JAX rebuilds it with tracers
    (inside ``jit``/``vmap``) or with the non-array sentinels of its tree utilities; those
    values cannot be range-checked and are skipped.
    """
    return isinstance(value, int | float | np.ndarray | np.generic | jax.Array) and is_concrete(
        value
    )


def _check_traced_k(k: Any, max_k: int) -> None:
    """A sparsity that may be traced: an integer scalar in ``[0, max_k]`` when concrete."""
    if not is_concrete(k):
        return
    if isinstance(k, bool) or np.ndim(k) != 0 or not jnp.issubdtype(jnp.result_type(k),
                                                                    jnp.integer):
        raise TypeError(f"k must be an integer scalar (a Python int or an int array); got {k!r}.")
    if not 0 <= int(k) <= max_k:
        raise ValueError(f"k must be in [0, max_k={max_k}]; got k={int(k)}.")


def sparsity_bound(solver) -> int:
    """The static bound on a solver's ``k``: ``max_k`` when ``k`` may be traced, else ``k``."""
    return solver.k if solver.max_k is None else solver.max_k


def register_solver(cls: type, data_fields: tuple[str, ...]) -> None:
    """Register a solver dataclass as a pytree whose ``data_fields`` are leaves.

    The other fields are static (they fix shapes or code paths and are hashed into the
    compiled function's cache key). ``k`` is static too unless the solver has ``max_k``
    set: then ``k`` is a leaf as well, so a jitted function that takes the solver is
    compiled once for every sparsity up to ``max_k`` (what a sweep over ``k`` needs).
    Rebuilding skips ``__post_init__`` (the fields were validated when first built).
    """
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten(solver):
        traced = (*data_fields, "k") if solver.max_k is not None else data_fields
        children = [(jax.tree_util.GetAttrKey(f), getattr(solver, f)) for f in traced]
        static = tuple((f, getattr(solver, f)) for f in names if f not in traced)
        return children, (traced, static)

    def unflatten(aux, children):
        traced, static = aux
        solver = object.__new__(cls)
        for name, value in (*static, *zip(traced, children, strict=True)):
            object.__setattr__(solver, name, value)
        return solver

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
