"""Optax gradient transformations: hard thresholding (IHT) and I-OBS for sparse training.

Both return updates ``u'`` such that ``params + u'`` is sparse, so they compose with any
optimizer and need nothing after ``optax.apply_updates``::

    tx = optax.chain(optax.adamw(1e-3), iobs_jax.optax.hard_threshold(sparsity=0.9))
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ._curvature import OperatorCurvature, highest_precision, hvp
from ._masks import _topk_mask_dynamic, _topk_mask_flat, nm_mask
from ._obs import project, saliency_rank

Schedule = Callable[[jax.Array], jax.Array]


class SparsityState(NamedTuple):
    """``count``: updates so far; ``masks``: bool pytree like params (True = kept);
    ``skipped``: updates returned as zeros because they were not finite; ``bad_sparsity``:
    mask updates at which the sparsity schedule gave a value outside ``[0, 1)`` (the
    previous masks were kept). Both are int32 counts, zero in a healthy run."""

    count: jax.Array
    masks: Any
    skipped: jax.Array
    bad_sparsity: jax.Array


class IOBSTransformState(NamedTuple):
    """State of :func:`iobs`: the projection state plus the diagonal curvature EMA;
    ``skipped`` and ``bad_sparsity`` as in :class:`SparsityState`."""

    count: jax.Array
    masks: Any
    second_moment: Any
    skipped: jax.Array
    bad_sparsity: jax.Array


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


def _check_sparsity(s, name="sparsity"):
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= float(s) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) or an Optax schedule; got {s!r}.")


def _check_schedule_start(schedule, name):
    """A schedule is checked where it can be, at step 0 (later steps are guarded inside
    the update and counted in the state)."""
    try:
        value = schedule(jnp.zeros((), jnp.int32))
    except Exception as err:  # re-raised naming the argument
        raise TypeError(f"{name}: the schedule failed at step 0: {type(err).__name__}: "
                        f"{err}") from err
    arr = jnp.asarray(value)
    if arr.shape != () or not jnp.issubdtype(arr.dtype, jnp.number):
        raise TypeError(f"{name}: the schedule must return a scalar number; got {value!r}.")
    return float(arr)


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _paths(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    return names, [leaf for _, leaf in leaves], treedef


def _selected(params, filter_fn):
    names, leaves, _ = _paths(params)
    if filter_fn is None:
        chosen = [jnp.ndim(x) >= 2 and _is_float(x) for x in leaves]
    else:
        chosen = [bool(filter_fn(n, x)) for n, x in zip(names, leaves, strict=True)]
    if not any(chosen):
        raise ValueError(
            f"the filter selects no parameter to sparsify; leaves are: {', '.join(names)} "
            f"(default filter: floating leaves with 2 or more dimensions)."
        )
    for name, leaf, c in zip(names, leaves, chosen, strict=True):
        if c and not _is_float(leaf):
            raise TypeError(f"filter selects {name!r} of dtype {jnp.result_type(leaf)}; only "
                            f"floating leaves can be sparsified (integer leaves are left as "
                            f"they are).")
    return chosen


class _Projector:
    """The shared projection rule: which leaves, how many kept, the pattern, when."""

    def __init__(self, sparsity, per_leaf, filter_fn, pattern, update_every):
        if callable(sparsity):
            if pattern is not None:
                raise ValueError("an N:M pattern fixes the sparsity; do not pass a schedule.")
            start = _check_schedule_start(sparsity, "sparsity")
            if not 0.0 <= start < 1.0:
                raise ValueError(f"sparsity: the schedule gives {start} at step 0; it must "
                                 f"return fractions in [0, 1).")
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

    def masks(self, scores, old_masks, count, like=None):
        """``(masks, bad)``: new masks from ``scores`` (a pytree like params) at mask-update
        steps, else ``old_masks``. ``bad``: the schedule's sparsity is NaN or outside
        ``[0, 1)`` at a mask-update step; the old masks are kept then (pruning everything
        or nothing is never what a schedule meant). ``like``: the params, whose leaves
        the filter sees (default: ``scores``)."""
        chosen = _selected(scores if like is None else like, self.filter)
        due = count % self.every == 0
        if not callable(self.sparsity):
            if self.every == 1:
                return self._fresh(scores, None, chosen), jnp.array(False)
            # Between mask updates skip the selection entirely (a sort per step otherwise).
            return jax.lax.cond(due, lambda: self._fresh(scores, None, chosen),
                                lambda: old_masks), jnp.array(False)
        s = jnp.asarray(self.sparsity(count), jnp.float32)
        bad = due & ~(jnp.isfinite(s) & (s >= 0) & (s < 1))
        safe = jnp.where(bad, 0.0, s)
        new = jax.lax.cond(due & ~bad, lambda: self._fresh(scores, safe, chosen),
                           lambda: old_masks)
        return new, bad

    def _fresh(self, scores, s, chosen):
        names, leaves, treedef = _paths(scores)
        picked = [x.astype(jnp.float32) for x, c in zip(leaves, chosen, strict=True) if c]
        if self.pattern is not None:
            new = [nm_mask(x, *self.pattern, axis=-2) for x in picked]
        elif self.per_leaf:
            new = [self._topk(x.ravel(), s).reshape(x.shape) for x in picked]
        else:
            flat = self._topk(jnp.concatenate([x.ravel() for x in picked]), s)
            new, start = [], 0
            for x in picked:
                new.append(flat[start : start + x.size].reshape(x.shape))
                start += x.size
        it = iter(new)
        out = [next(it) if c else jnp.ones(jnp.shape(x), bool)
               for x, c in zip(leaves, chosen, strict=True)]
        return jax.tree.unflatten(treedef, out)

    def _topk(self, scores, s):
        size = scores.shape[0]
        # NaN scores (a NaN step) would rank arbitrarily; such an update is skipped anyway.
        scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
        if s is not None:
            return _topk_mask_dynamic(scores, size - jnp.round(s * size).astype(jnp.int32))
        return _topk_mask_flat(scores, size - int(round(float(self.sparsity) * size)))


def _all_finite(tree) -> jax.Array:
    floats = [u for u in jax.tree.leaves(tree) if _is_float(u)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in floats])) if floats \
        else jnp.array(True)


def _finish(new_updates, updates, masks, state, bad, target):
    """Guard an update: if any floating leaf of ``new_updates`` or of the unmasked
    ``target`` is NaN/inf the update is skipped (zeros, the previous masks kept,
    ``skipped`` counted). The target matters: a NaN weight would otherwise rank last,
    be masked to zero and pass as a finite update. Returns ``(updates, masks, skipped,
    bad_sparsity)``."""
    finite = _all_finite(new_updates) & _all_finite(target)
    out = jax.tree.map(lambda n, u: jnp.where(finite, n, jnp.zeros_like(n)).astype(u.dtype),
                       new_updates, updates)
    masks = jax.tree.map(lambda m, old: jnp.where(finite, m, old), masks, state.masks)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    return out, masks, skipped, state.bad_sparsity + bad.astype(jnp.int32)


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

    Failures are guarded, not returned: an update that would be NaN/inf is returned as
    zeros (params and masks stay as they are) and counted in ``state.skipped``; a
    schedule value that is NaN or outside ``[0, 1)`` keeps the previous masks and is
    counted in ``state.bad_sparsity``. Integer leaves are never selected (their updates
    pass through unchanged).

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), hard_threshold(0.5))  # doctest: +SKIP
    """
    proj = _Projector(sparsity, per_leaf, filter, pattern, update_every)

    def init_fn(params):
        zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers (donation)
        return SparsityState(zeros[0], proj.init_masks(params), zeros[1], zeros[2])

    def update_fn(updates, state, params=None):
        _need_params(params, "hard_threshold")
        target = optax.apply_updates(params, updates)
        masks, bad = proj.masks(jax.tree.map(jnp.abs, target), state.masks, state.count)
        new = jax.tree.map(lambda t, p, m, u: (jnp.where(m, t, 0) - p).astype(u.dtype),
                           target, params, masks, updates)
        new, masks, skipped, bad = _finish(new, updates, masks, state, bad, target)
        return new, SparsityState(optax.safe_increment(state.count), masks, skipped, bad)

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
      solved by damped, truncated CG (Newton-CG: a direction of negative curvature, common
      in networks, ends the solve; if it is the first, the step is a gradient step); the
      mask is top-k of ``|theta~|`` (Topk-I-OBS; the inverse
      diagonal is not available matrix-free) and the correction a masked CG solve.
    - ``"diagonal"``: an EMA (``decay``) of squared gradients, Adam's second moment:
      no extra arguments; the correction is then the mask itself.

    Masks, sparsity schedules, ``per_leaf``, ``filter``, ``pattern`` and ``update_every``
    are those of :func:`hard_threshold`, and so is the guard: a step that is not finite
    (one NaN per-example gradient, a curvature that is not positive definite, a learning
    rate schedule returning NaN) is skipped, returned as zeros and counted in
    ``state.skipped``, instead of turning every parameter into NaN. Integer leaves
    (step counters, say) are left out of the curvature and their updates pass through
    unchanged. ``damping`` is absolute.
    """
    _check_options(learning_rate, curvature, damping, decay, cg_tol, cg_maxiter)
    proj = _Projector(sparsity, per_leaf, filter, pattern, update_every)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    step = {"fisher": _second_order_target, "cg": _second_order_target,
            "diagonal": _diagonal_target}[curvature]
    options = dict(curvature=curvature, damping=damping, decay=decay, cg_tol=cg_tol,
                   cg_maxiter=cg_maxiter)

    def init_fn(params):
        masks = proj.init_masks(params)
        floats, _, _ = _float_leaves(params)
        moment = [jnp.zeros_like(x) for x in floats] if curvature == "diagonal" else None
        zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers (donation)
        return IOBSTransformState(zeros[0], masks, moment, zeros[1], zeros[2])

    @highest_precision  # Woodbury and CG cancel; TF32 products would break them on GPU
    def update_fn(updates, state, params=None, *, per_example_grads=None, loss_fn=None,
                  **_extra):
        _need_params(params, "iobs")
        floats, where, rebuild = _float_leaves(params)
        grads = [jax.tree.leaves(updates)[i] for i in where]
        extra = dict(per_example_grads=per_example_grads, loss_fn=loss_fn, rebuild=rebuild,
                     where=where)
        target, scores, curv, moment = step(floats, grads, state, lr(state.count),
                                            extra, **options)
        full_scores = rebuild(jax.tree.leaves(scores), fill="ones")
        masks, bad = proj.masks(full_scores, state.masks, state.count, like=params)
        new = _apply_masks(target, masks, where, curv)
        out = jax.tree.leaves(updates)
        for i, n, p in zip(where, new, floats, strict=True):
            out[i] = n - p
        out = jax.tree.unflatten(jax.tree.structure(updates), out)
        unmasked = target if curv is None else target[0]  # (flat, unravel) for Fisher/CG
        out, masks, skipped, bad = _finish(out, updates, masks, state, bad, unmasked)
        if moment is not None:  # a skipped step must not poison the moment either
            ok = skipped == state.skipped
            moment = [jnp.where(ok, m, old) for m, old in zip(moment, state.second_moment,
                                                               strict=True)]
        return out, IOBSTransformState(optax.safe_increment(state.count), masks, moment,
                                       skipped, bad)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_options(learning_rate, curvature, damping, decay, cg_tol, cg_maxiter) -> None:
    """Everything about :func:`iobs` that can be checked before the first step."""
    if curvature not in ("fisher", "cg", "diagonal"):
        raise ValueError(f"curvature must be 'fisher', 'cg' or 'diagonal'; got {curvature!r}.")
    rate = (_check_schedule_start(learning_rate, "learning_rate") if callable(learning_rate)
            else learning_rate)
    for name, value, test, want in (
        ("learning_rate", rate, lambda v: v > 0, "> 0"),
        ("damping", damping, lambda v: v > 0, "> 0"),
        ("decay", decay, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("cg_tol", cg_tol, lambda v: v >= 0, ">= 0"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                np.isfinite(value) and test(value)):
            raise ValueError(f"{name} must be a finite number {want}; got {value!r}.")
    if isinstance(cg_maxiter, bool) or not isinstance(cg_maxiter, numbers.Integral) or \
            cg_maxiter < 1:
        raise ValueError(f"cg_maxiter must be an int >= 1; got {cg_maxiter!r}.")


def _float_leaves(tree):
    """``(floating leaves, their positions, rebuild)``: ``rebuild(values, fill=None)`` is
    ``tree`` with ``values`` at those positions and its other leaves (or float ones of
    their shape when ``fill="ones"``: scores that are never selected)."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if _is_float(x)]

    def rebuild(values, fill=None):
        out = list(leaves) if fill is None else [jnp.ones(jnp.shape(x)) for x in leaves]
        for i, v in zip(where, values, strict=True):
            out[i] = v
        return jax.tree.unflatten(treedef, out)

    return [leaves[i] for i in where], where, rebuild


def _per_example_rows(per_example, where, num_floats):
    """The per-example gradients of the floating leaves: a pytree like params (its
    floating positions are taken) or one holding only the floating leaves."""
    leaves = jax.tree.leaves(per_example)
    if len(leaves) == num_floats:
        return leaves
    if len(leaves) > max(where, default=-1):
        return [leaves[i] for i in where]
    raise ValueError(f"per_example_grads must be a pytree like params with a leading example "
                     f"axis; got {len(leaves)} leaves for {num_floats} floating parameters.")


def _diagonal_target(floats, grads, state, eta, extra, *, damping, decay, **_):
    """Adam's second moment as a diagonal curvature: ``theta~ = theta - eta g / C``,
    scores ``theta~^2 C`` (OBS saliency with a diagonal inverse)."""
    moment = [decay * v + (1 - decay) * g**2 for v, g in zip(state.second_moment, grads,
                                                             strict=True)]
    t = state.count.astype(jnp.float32) + 1
    inv = [1.0 / (v / (1 - decay**t) + damping) for v in moment]
    target = [p - eta * g * i for p, g, i in zip(floats, grads, inv, strict=True)]
    scores = [saliency_rank(x, i) for x, i in zip(target, inv, strict=True)]
    return target, scores, None, moment


def _second_order_target(floats, grads, state, eta, extra, *, curvature, damping, cg_tol,
                         cg_maxiter, **_):
    """Fisher (Woodbury) or HVP (CG) curvature on the flat floating parameters:
    ``theta~ = theta - eta C^{-1} g`` and its selection scores."""
    flat_p, unravel = ravel_pytree(floats)
    flat_g = ravel_pytree(grads)[0].astype(flat_p.dtype)
    if curvature == "fisher":
        if extra["per_example_grads"] is None:
            raise ValueError("iobs(curvature='fisher') needs per_example_grads= "
                             "(jax.vmap(jax.grad(loss), (None, 0))(params, batch)).")
        rows = _per_example_rows(extra["per_example_grads"], extra["where"], len(floats))
        curv = _Woodbury(rows, flat_p, damping)
    else:
        loss_fn = extra["loss_fn"]
        if loss_fn is None:
            raise ValueError("iobs(curvature='cg') needs loss_fn= (params -> scalar "
                             "batch loss) for Hessian-vector products.")
        rebuild = extra["rebuild"]
        f = lambda fl: loss_fn(rebuild(fl))  # integer leaves keep their values
        curv = OperatorCurvature(
            lambda v: ravel_pytree(hvp(f, floats, unravel(v)))[0].astype(flat_p.dtype),
            flat_p.size, flat_p.dtype, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
            truncate=True,  # networks have indefinite Hessians: Newton-CG, documented
        )
    target = flat_p - eta * curv.solve(flat_g).astype(flat_p.dtype)
    scores = saliency_rank(target, curv.inverse_diag()) if curvature == "fisher" \
        else jnp.abs(target)
    return (target, unravel), unravel(scores), curv, None


def _apply_masks(target, masks, where, curv):
    """The kept weights: ``target`` on the masks (diagonal curvature) or its OBS
    projection onto them (Fisher, CG); leaves outside the filter have all-True masks."""
    mask_leaves = [jax.tree.leaves(masks)[i] for i in where]
    if curv is None:
        return [jnp.where(m, x, 0) for x, m in zip(target, mask_leaves, strict=True)]
    flat_t, unravel = target
    flat_m = ravel_pytree([m.astype(flat_t.dtype) for m in mask_leaves])[0] > 0
    return unravel(project(curv, flat_t, flat_m))


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
