"""Optax gradient transformations: hard thresholding (IHT) and I-OBS for sparse training.

Both return updates ``u'`` such that ``params + u'`` is sparse, so they compose with any
optimizer and need nothing after ``optax.apply_updates``::

    tx = optax.chain(optax.adamw(1e-3), iobs_jax.optax.hard_threshold(sparsity=0.9))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ._curvature import OperatorCurvature, highest_precision, hvp
from ._masks import _topk_mask_dynamic, _topk_mask_flat, nm_mask
from ._obs import project

Schedule = Callable[[jax.Array], jax.Array]


class SparsityState(NamedTuple):
    """``count``: updates so far; ``masks``: bool pytree like params (True = kept)."""

    count: jax.Array
    masks: Any


class IOBSTransformState(NamedTuple):
    """State of :func:`iobs`: the projection state plus the diagonal curvature EMA."""

    count: jax.Array
    masks: Any
    second_moment: Any


def cubic_sparsity_schedule(
    final_sparsity: float, begin_step: int, end_step: int, initial_sparsity: float = 0.0,
    frequency: int = 1,
) -> Schedule:
    """Zhu & Gupta (2017) gradual pruning as an Optax schedule.

    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3`` for ``t0 <= t <= t1``,
    ``s_i`` before, ``s_f`` after; the step is rounded down to a multiple of ``frequency``
    so the sparsity (and the mask) changes every ``frequency`` updates.

    Example: ``cubic_sparsity_schedule(0.9, 100, 1000)(1000)`` -> ``0.9``.
    """
    _check_sparsity(final_sparsity)
    _check_sparsity(initial_sparsity)
    if not 0 <= begin_step < end_step or frequency < 1:
        raise ValueError(f"need 0 <= begin_step < end_step and frequency >= 1; got "
                         f"{begin_step}, {end_step}, {frequency}.")

    def schedule(count):
        t = (jnp.asarray(count) // frequency) * frequency
        frac = jnp.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3

    return schedule


def _check_sparsity(s):
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) or an Optax schedule; got {s!r}.")


def _paths(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    return names, [leaf for _, leaf in leaves], treedef


def _selected(params, filter_fn):
    names, leaves, _ = _paths(params)
    if filter_fn is None:
        chosen = [jnp.ndim(x) >= 2 for x in leaves]
    else:
        chosen = [bool(filter_fn(n, x)) for n, x in zip(names, leaves, strict=True)]
    if not any(chosen):
        raise ValueError(
            f"the filter selects no parameter to sparsify; leaves are: {', '.join(names)} "
            f"(default filter: leaves with 2 or more dimensions)."
        )
    return chosen


class _Projector:
    """The shared projection rule: which leaves, how many kept, the pattern, when."""

    def __init__(self, sparsity, per_leaf, filter_fn, pattern, update_every):
        if callable(sparsity):
            if pattern is not None:
                raise ValueError("an N:M pattern fixes the sparsity; do not pass a schedule.")
        else:
            _check_sparsity(sparsity)
        if pattern is not None:
            try:
                n, m = (int(v) for v in (pattern.split(":") if isinstance(pattern, str)
                                         else pattern))
            except (TypeError, ValueError):
                raise ValueError(f"pattern must be 'n:m' like '2:4'; got {pattern!r}.") from None
            if not 0 < n < m:
                raise ValueError(f"pattern n:m needs 0 < n < m; got {pattern!r}.")
            pattern = (n, m)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or \
                update_every < 1:
            raise ValueError(f"update_every must be an int >= 1; got {update_every!r}.")
        self.sparsity, self.per_leaf, self.filter = sparsity, bool(per_leaf), filter_fn
        self.pattern, self.every = pattern, update_every

    def init_masks(self, params):
        chosen = _selected(params, self.filter)
        if self.pattern is not None:
            m = self.pattern[1]
            names, leaves, _ = _paths(params)
            for name, leaf, c in zip(names, leaves, chosen, strict=True):
                if c and np.ndim(leaf) < 2:
                    raise ValueError(f"pattern {self.pattern[0]}:{m} needs kernels (2+ dims); "
                                     f"{name} has shape {np.shape(leaf)}.")
                if c and np.shape(leaf)[-2] % m:
                    raise ValueError(f"pattern {self.pattern[0]}:{m}: {name} has "
                                     f"{np.shape(leaf)[-2]} inputs, not a multiple of {m}.")
        return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)

    def masks(self, scores, old_masks, count):
        """New masks from ``scores`` (a pytree like params) at mask-update steps."""
        if self.every == 1:
            return self._fresh(scores, count)
        # Between mask updates skip the selection entirely (a sort per step otherwise).
        return jax.lax.cond(count % self.every == 0, lambda: self._fresh(scores, count),
                            lambda: old_masks)

    def _fresh(self, scores, count):
        names, leaves, treedef = _paths(scores)
        chosen = _selected(scores, self.filter)
        picked = [s.astype(jnp.float32) for s, c in zip(leaves, chosen, strict=True) if c]
        if self.pattern is not None:
            new = [nm_mask(s, *self.pattern, axis=-2) for s in picked]
        elif self.per_leaf:
            new = [self._topk(s.ravel(), count).reshape(s.shape) for s in picked]
        else:
            flat = self._topk(jnp.concatenate([s.ravel() for s in picked]), count)
            new, start = [], 0
            for s in picked:
                new.append(flat[start : start + s.size].reshape(s.shape))
                start += s.size
        it = iter(new)
        out = [next(it) if c else jnp.ones(jnp.shape(x), bool)
               for x, c in zip(leaves, chosen, strict=True)]
        return jax.tree.unflatten(treedef, out)

    def _topk(self, scores, count):
        size = scores.shape[0]
        if callable(self.sparsity):
            s = jnp.clip(jnp.asarray(self.sparsity(count), jnp.float32), 0.0, 1.0)
            return _topk_mask_dynamic(scores, size - jnp.round(s * size).astype(jnp.int32))
        return _topk_mask_flat(scores, size - int(round(float(self.sparsity) * size)))


def _need_params(params, who):
    if params is None:
        raise ValueError(f"{who} needs the current params: call tx.update(updates, state, "
                         f"params).")


def hard_threshold(
    sparsity: float | Schedule,
    *,
    per_leaf: bool = False,
    filter: Callable[[str, Any], bool] | None = None,  # noqa: A002
    pattern: str | tuple[int, int] | None = None,
    update_every: int = 1,
) -> optax.GradientTransformation:
    """Project every step onto the sparse set: ``params + u' = T_k(params + u)``.

    Chained after any optimizer this is IHT with that optimizer's step. The mask of
    ``T_k`` keeps the ``k`` largest ``|params + u|`` over the selected leaves (globally,
    or per leaf with ``per_leaf=True``; ``pattern="2:4"``: ``n`` of every ``m``
    consecutive inputs, along axis ``-2`` of each kernel). It is recomputed every
    ``update_every`` updates and held in between (weights outside stay exactly zero).

    Args:
      sparsity: fraction of the selected weights set to zero, in ``[0, 1)``, or an Optax
        schedule ``count -> sparsity`` (e.g. :func:`cubic_sparsity_schedule`); a number
        holds from the first update.
      per_leaf: the same sparsity in every leaf instead of one global threshold.
      filter: ``(path, leaf) -> bool`` choosing the leaves to sparsify (path like
        ``"Dense_0/kernel"``); default: leaves with two or more dimensions.
      pattern: ``"n:m"`` semi-structured sparsity instead of ``sparsity``'s count.
      update_every: recompute the mask every this many updates.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), hard_threshold(0.5))  # doctest: +SKIP
    """
    proj = _Projector(sparsity, per_leaf, filter, pattern, update_every)

    def init_fn(params):
        return SparsityState(jnp.zeros((), jnp.int32), proj.init_masks(params))

    def update_fn(updates, state, params=None):
        _need_params(params, "hard_threshold")
        target = optax.apply_updates(params, updates)
        masks = proj.masks(jax.tree.map(jnp.abs, target), state.masks, state.count)
        new = jax.tree.map(lambda t, p, m, u: (jnp.where(m, t, 0) - p).astype(u.dtype),
                           target, params, masks, updates)
        return new, SparsityState(optax.safe_increment(state.count), masks)

    return optax.GradientTransformation(init_fn, update_fn)


def iobs(
    learning_rate: float | Schedule,
    sparsity: float | Schedule,
    *,
    curvature: str = "fisher",
    damping: float = 1e-3,
    decay: float = 0.999,
    per_leaf: bool = False,
    filter: Callable[[str, Any], bool] | None = None,  # noqa: A002
    pattern: str | tuple[int, int] | None = None,
    update_every: int = 1,
    cg_tol: float = 1e-4,
    cg_maxiter: int = 20,
) -> optax.GradientTransformationExtraArgs:
    """I-OBS as an Optax transformation: Newton-like step, OBS-saliency mask, OBS correction.

    With curvature ``C`` (plus ``damping * I``) and gradient ``g`` of the batch loss:

        theta~ = theta - lr * C^{-1} g,    mask = top-k of theta~^2 / [C^{-1}]_jj,
        theta+ = argmin_{theta[~mask] = 0} (theta - theta~)^T C (theta - theta~),

    and the update is ``theta+ - theta`` (the learning rate is inside; do not chain
    another optimizer's step after it). Curvature sources, passed through Optax's extra
    arguments (``tx.update(grads, state, params, per_example_grads=...)``):

    - ``"fisher"``: empirical Fisher ``G^T G / m`` from ``per_example_grads`` (a pytree
      like params with a leading axis of ``m`` examples, e.g.
      ``jax.vmap(jax.grad(loss), (None, 0))(params, batch)``), inverted by Woodbury
      (``O(m^2 D)``); the saliency uses its exact inverse diagonal.
    - ``"cg"``: Hessian-vector products of ``loss_fn`` (``params -> scalar`` batch loss)
      solved by damped CG; the mask is top-k of ``|theta~|`` (Topk-I-OBS; the inverse
      diagonal is not available matrix-free) and the correction a masked CG solve.
    - ``"diagonal"``: an EMA (``decay``) of squared gradients, Adam's second moment:
      no extra arguments; the correction is then the mask itself.

    Masks, sparsity schedules, ``per_leaf``, ``filter``, ``pattern`` and ``update_every``
    are those of :func:`hard_threshold`. ``damping`` is absolute.
    """
    if curvature not in ("fisher", "cg", "diagonal"):
        raise ValueError(f"curvature must be 'fisher', 'cg' or 'diagonal'; got {curvature!r}.")
    if not (isinstance(damping, (int, float)) and damping > 0):
        raise ValueError(f"damping must be a number > 0; got {damping!r}.")
    proj = _Projector(sparsity, per_leaf, filter, pattern, update_every)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        masks = proj.init_masks(params)
        moment = jax.tree.map(jnp.zeros_like, params) if curvature == "diagonal" else None
        return IOBSTransformState(jnp.zeros((), jnp.int32), masks, moment)

    @highest_precision  # Woodbury and CG cancel; TF32 products would break them on GPU
    def update_fn(updates, state, params=None, *, per_example_grads=None, loss_fn=None,
                  **_extra):
        _need_params(params, "iobs")
        eta = lr(state.count)
        if curvature == "diagonal":
            moment = jax.tree.map(lambda v, g: decay * v + (1 - decay) * g**2,
                                  state.second_moment, updates)
            t = state.count.astype(jnp.float32) + 1
            inv = jax.tree.map(lambda v: 1.0 / (v / (1 - decay**t) + damping), moment)
            step = jax.tree.map(lambda g, i: g * i, updates, inv)
            target = jax.tree.map(lambda p, s: p - eta * s, params, step)
            scores = jax.tree.map(lambda x, i: x**2 / i, target, inv)
            masks = proj.masks(scores, state.masks, state.count)
            new = jax.tree.map(lambda x, m: jnp.where(m, x, 0), target, masks)
        else:
            flat_p, unravel = ravel_pytree(params)
            flat_g = ravel_pytree(updates)[0]
            if curvature == "fisher":
                if per_example_grads is None:
                    raise ValueError("iobs(curvature='fisher') needs per_example_grads= "
                                     "(jax.vmap(jax.grad(loss), (None, 0))(params, batch)).")
                curv = _Woodbury(per_example_grads, flat_p, damping)
            else:
                if loss_fn is None:
                    raise ValueError("iobs(curvature='cg') needs loss_fn= (params -> scalar "
                                     "batch loss) for Hessian-vector products.")
                curv = OperatorCurvature(
                    lambda v: ravel_pytree(hvp(loss_fn, params, unravel(v)))[0],
                    flat_p.size, flat_p.dtype, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
                )
            target = flat_p - eta * curv.solve(flat_g)
            if curvature == "fisher":
                scores = target**2 / curv.inverse_diag()
            else:
                scores = jnp.abs(target)
            # Leaves outside the filter get all-True masks: kept, and compensated by OBS.
            masks = proj.masks(unravel(scores), state.masks, state.count)
            flat_m = ravel_pytree(
                jax.tree.map(lambda m: m.astype(flat_p.dtype), masks))[0] > 0
            new = unravel(project(curv, target, flat_m))
            moment = None
        out = jax.tree.map(lambda n, p, u: (n - p).astype(u.dtype), new, params, updates)
        return out, IOBSTransformState(optax.safe_increment(state.count), masks, moment)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Woodbury:
    """``C = G^T G / m + lam I`` from ``m`` per-example gradients, solved by Woodbury."""

    def __init__(self, per_example, flat_params, lam):
        leaves = jax.tree.leaves(per_example)
        m = leaves[0].shape[0]
        rows = jax.vmap(lambda *ls: jnp.concatenate([jnp.ravel(x) for x in ls]))(*leaves)
        if rows.shape[1] != flat_params.size:
            raise ValueError("per_example_grads must be a pytree like params with a leading "
                             f"example axis; got {rows.shape[1]} entries per example for "
                             f"{flat_params.size} parameters.")
        self.u = rows.astype(flat_params.dtype) / jnp.sqrt(m)  # C = U^T U + lam I
        self.lam = jnp.asarray(lam, flat_params.dtype)
        self.size = flat_params.size

    def matvec(self, v):
        return self.u.T @ (self.u @ v) + self.lam * v

    def _small(self, u):
        k = u @ u.T + self.lam * jnp.eye(u.shape[0], dtype=u.dtype)
        return jax.scipy.linalg.cho_factor(k)

    def solve(self, b):
        # (lam I + U^T U)^{-1} b = (b - U^T (lam I + U U^T)^{-1} U b) / lam
        f = self._small(self.u)
        return (b - self.u.T @ jax.scipy.linalg.cho_solve(f, self.u @ b)) / self.lam

    def inverse_diag(self):
        f = self._small(self.u)
        w = jax.scipy.linalg.cho_solve(f, self.u)
        return (1.0 - jnp.sum(self.u * w, axis=0)) / self.lam

    def masked_solve(self, mask, b, size=None):
        # Restricted to Q the curvature is U_Q^T U_Q + lam I: Woodbury on the masked U.
        m = mask.astype(self.u.dtype)
        u = self.u * m[None, :]
        f = self._small(u)
        bq = b * m
        return (bq - u.T @ jax.scipy.linalg.cho_solve(f, u @ bq)) / self.lam * m
