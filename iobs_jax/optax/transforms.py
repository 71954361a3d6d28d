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
import optax

from iobs_jax.core.curvature import OperatorCurvature, WoodburyCurvature, highest_precision, hvp
from iobs_jax.core.obs import project, saliency_rank
from iobs_jax.core.sparsity import Projector, check_schedule_start, check_sparsity, is_float
from iobs_jax.core.validation import check_curvature_options

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
    check_sparsity(final_sparsity, "final_sparsity")
    check_sparsity(initial_sparsity, "initial_sparsity")
    if not 0 <= begin_step < end_step or frequency < 1:
        raise ValueError(f"need 0 <= begin_step < end_step and frequency >= 1; got "
                         f"{begin_step}, {end_step}, {frequency}.")

    def schedule(count):
        t = (jnp.asarray(count) // frequency) * frequency
        frac = jnp.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3

    return schedule


def _all_finite(tree) -> jax.Array:
    floats = [u for u in jax.tree.leaves(tree) if is_float(u)]
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


def _finish_second_order(updates, new, floats, where, masks, state, bad, target, moment,
                         old_moment):
    """The updates ``new - params`` on the float leaves at ``where``, guarded by
    :func:`_finish`; a running curvature ``moment`` (a list, or ``None``) keeps its old
    value on a skipped step, which must not poison the estimate either. Returns
    ``(updates, masks, moment, skipped, bad_sparsity)``."""
    out = jax.tree.leaves(updates)
    for i, n, p in zip(where, new, floats, strict=True):
        out[i] = n - p
    out = jax.tree.unflatten(jax.tree.structure(updates), out)
    out, masks, skipped, bad = _finish(out, updates, masks, state, bad, target)
    if moment is not None:
        ok = skipped == state.skipped
        moment = [jnp.where(ok, m, old) for m, old in zip(moment, old_moment, strict=True)]
    return out, masks, moment, skipped, bad


def _distribution(per_leaf, distribution):
    """``per_leaf=True`` is the older spelling of ``distribution="uniform"``."""
    if distribution is None:
        return "uniform" if per_leaf else "global"
    if per_leaf and distribution != "uniform":
        raise ValueError(f"per_leaf=True means distribution='uniform'; got both per_leaf=True "
                         f"and distribution={distribution!r}: pass only distribution=.")
    return distribution


def _need_params(params, who):
    if params is None:
        raise ValueError(f"{who} needs the current params: call tx.update(updates, state, "
                         f"params).")


def hard_threshold(
    sparsity: float | Schedule,
    *,
    per_leaf: bool = False,
    filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
    pattern: Any = None,
    update_every: int = 1,
    distribution: str | None = None,
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
      per_leaf: the same sparsity in every leaf instead of one global threshold (the
        same as ``distribution="uniform"``).
      filter: ``(path, leaf) -> bool`` choosing the leaves to sparsify (path like
        ``"Dense_0/kernel"``), or a regex searched in the path; default: floating leaves
        with two or more dimensions.
      pattern: ``"n:m"`` semi-structured sparsity instead of ``sparsity``'s count;
        ``"HxW"`` / ``Block(h, w)`` blocks or ``"channel"`` / ``Channel(axis)`` (see
        ``iobs_jax.optax``).
      update_every: recompute the mask every this many updates.
      distribution: ``"global"`` (default), ``"uniform"`` or ``"erk"``: how the removed
        count is shared among leaves (see ``iobs_jax.optax``).

    Failures are guarded, not returned: an update that would be NaN/inf is returned as
    zeros (params and masks stay as they are) and counted in ``state.skipped``; a
    schedule value that is NaN or outside ``[0, 1)`` keeps the previous masks and is
    counted in ``state.bad_sparsity``. Integer leaves are never selected (their updates
    pass through unchanged).

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), hard_threshold(0.5))
      >>> params = {"w": jnp.array([[0.5, -2.0], [1.0, 0.1]])}
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([[ 0. , -1.8],
             [ 0.9,  0. ]], dtype=float32)
    """
    proj = Projector(sparsity, _distribution(per_leaf, distribution), filter, pattern,
                     update_every)

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
    filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
    pattern: Any = None,
    update_every: int = 1,
    cg_tol: float = 1e-4,
    cg_maxiter: int = 20,
    distribution: str | None = None,
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
    proj = Projector(sparsity, _distribution(per_leaf, distribution), filter, pattern,
                     update_every)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    step = {"fisher": _second_order_target, "cg": _second_order_target,
            "diagonal": _diagonal_target}[curvature]
    options = dict(curvature=curvature, damping=damping, decay=decay, cg_tol=cg_tol,
                   cg_maxiter=cg_maxiter)

    def init_fn(params):
        return _init_state(IOBSTransformState, proj, params, curvature == "diagonal")

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
        full_scores = rebuild(scores, fill="ones")
        masks, bad = proj.masks(full_scores, state.masks, state.count, like=params)
        new = _apply_masks(target, masks, where, curv)
        out, masks, moment, skipped, bad = _finish_second_order(
            updates, new, floats, where, masks, state, bad, target, moment, state.second_moment)
        return out, IOBSTransformState(optax.safe_increment(state.count), masks, moment,
                                       skipped, bad)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_options(learning_rate, curvature, damping, decay, cg_tol, cg_maxiter) -> None:
    """Everything about :func:`iobs` that can be checked before the first step."""
    if curvature not in ("fisher", "cg", "diagonal"):
        raise ValueError(f"curvature must be 'fisher', 'cg' or 'diagonal'; got {curvature!r}.")
    rate = (check_schedule_start(learning_rate, "learning_rate") if callable(learning_rate)
            else learning_rate)
    check_curvature_options(damping, decay, cg_tol, cg_maxiter, learning_rate=rate)


def _init_state(state_cls, proj, params, diagonal: bool):
    """``state_cls(count, masks, moment, counter, counter)`` of a second-order transform:
    the initial masks, a zero diagonal moment per float leaf for the diagonal curvature
    (else ``None``) and distinct zero counters (distinct buffers, for donation)."""
    masks = proj.init_masks(params)
    floats, _, _ = _float_leaves(params)
    moment = [jnp.zeros_like(x) for x in floats] if diagonal else None
    zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]
    return state_cls(zeros[0], masks, moment, zeros[1], zeros[2])


def _float_leaves(tree):
    """``(floating leaves, their positions, rebuild)``: ``rebuild(values, fill=None)`` is
    ``tree`` with ``values`` at those positions and its other leaves (or float ones of
    their shape when ``fill="ones"``: scores that are never selected)."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if is_float(x)]

    def rebuild(values, fill=None):
        out = list(leaves) if fill is None else [jnp.ones(jnp.shape(x)) for x in leaves]
        values = jax.tree.leaves(values)
        for i, v in zip(where, values, strict=True):
            out[i] = v
        return jax.tree.unflatten(treedef, out)

    return [leaves[i] for i in where], where, rebuild


def _per_example_rows(per_example, where, floats):
    """The per-example gradients of the floating leaves: a pytree like params (its
    floating positions are taken) or one holding only the floating leaves; each leaf is
    checked to be ``(m, *shape)`` of its parameter."""
    leaves = jax.tree.leaves(per_example)
    if len(leaves) != len(floats):
        leaves = [leaves[i] for i in where] if len(leaves) > max(where, default=-1) else None
    if leaves is None or any(jnp.shape(g)[1:] != jnp.shape(p) for g, p in
                             zip(leaves, floats, strict=True)) or \
            len({jnp.shape(g)[0] for g in leaves}) != 1:
        got = [jnp.shape(g) for g in jax.tree.leaves(per_example)]
        raise ValueError("per_example_grads must be a pytree like params with a leading "
                         "example axis (jax.vmap(jax.grad(loss), (None, 0))(params, batch)); "
                         f"got leaves of shapes {got} for parameters of shapes "
                         f"{[jnp.shape(p) for p in floats]}.")
    return leaves


def fisher_rows(per_example, where, floats):
    """The rows of ``U`` with ``U^T U`` the empirical Fisher ``G^T G / m``."""
    rows = _per_example_rows(per_example, where, floats)
    m = rows[0].shape[0]
    return [g.astype(p.dtype) / jnp.sqrt(jnp.asarray(m, p.dtype))
            for g, p in zip(rows, floats, strict=True)]


def hvp_operator(loss_fn, floats, rebuild):
    """``v -> H v`` over the floating leaves (lists) of ``loss_fn(params)``; integer leaves
    keep their values."""
    f = lambda fl: loss_fn(rebuild(fl))
    return lambda v: [h.astype(p.dtype) for h, p in zip(hvp(f, floats, v), floats,
                                                          strict=True)]


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
    """Fisher (Woodbury) or HVP (CG) curvature on the floating leaves (kept as a list,
    never raveled): ``theta~ = theta - eta C^{-1} g`` and its selection scores."""
    grads = [g.astype(p.dtype) for g, p in zip(grads, floats, strict=True)]
    if curvature == "fisher":
        if extra["per_example_grads"] is None:
            raise ValueError("iobs(curvature='fisher') needs per_example_grads= "
                             "(jax.vmap(jax.grad(loss), (None, 0))(params, batch)).")
        curv = WoodburyCurvature(fisher_rows(extra["per_example_grads"], extra["where"],
                                             floats), damping)
    else:
        if extra["loss_fn"] is None:
            raise ValueError("iobs(curvature='cg') needs loss_fn= (params -> scalar "
                             "batch loss) for Hessian-vector products.")
        size = sum(p.size for p in floats)
        curv = OperatorCurvature(
            hvp_operator(extra["loss_fn"], floats, extra["rebuild"]), size, floats[0].dtype,
            damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
            truncate=True,  # networks have indefinite Hessians: Newton-CG, documented
        )
    step = curv.solve(grads)
    target = [p - eta * d.astype(p.dtype) for p, d in zip(floats, step, strict=True)]
    if curvature == "fisher":
        scores = [saliency_rank(x, g) for x, g in zip(target, curv.inverse_diag(),
                                                      strict=True)]
    else:
        scores = [jnp.abs(x) for x in target]
    return target, scores, curv, None


def _apply_masks(target, masks, where, curv):
    """The kept weights: ``target`` on the masks (diagonal curvature) or its OBS
    projection onto them (Fisher, CG); leaves outside the filter have all-True masks."""
    mask_leaves = [jax.tree.leaves(masks)[i] for i in where]
    if curv is None:
        return [jnp.where(m, x, 0) for x, m in zip(target, mask_leaves, strict=True)]
    out = project(curv, target, mask_leaves)
    return [o.astype(t.dtype) for o, t in zip(out, target, strict=True)]
