"""Sparse training transforms that go last in an Optax chain: the OBS projection of the
optimizer's candidate, straight-through (STE) magnitude pruning, and the one-shot
:func:`sparsify`. Dynamic sparse training (SET, RigL) lives in ``_dynamic_sparse``.

Conventions (those of :func:`~iobs_jax.optax.hard_threshold`): the masks live in the
state (True = kept), schedules/filters/patterns/distributions/``update_every`` are the
shared :class:`~iobs_jax.core.sparsity.Projector`'s, an update that would be NaN/inf is
returned as zeros and counted in ``state.skipped``, a schedule value outside ``[0, 1)``
keeps the masks and is counted in ``state.bad_sparsity``. Nothing is called after
``optax.apply_updates`` except for STE, whose forward pass needs :func:`masked_params`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iobs_jax.core.curvature import (
    OperatorCurvature,
    WoodburyCurvature,
    highest_precision,
    tree_mean_diag,
)
from iobs_jax.core.obs import saliency_rank
from iobs_jax.core.sparsity import Projector
from iobs_jax.core.validation import check_choice, check_curvature_options
from iobs_jax.optax.transforms import (
    Schedule,
    SparsityState,
    _apply_masks,
    _finish,
    _finish_second_order,
    _float_leaves,
    _init_state,
    _need_params,
    fisher_rows,
    hvp_operator,
)

CURVATURES = ("fisher", "hvp", "diagonal")
COMPENSATE = ("every_update", "mask_updates")


class OBSProjectionState(NamedTuple):
    """State of :func:`obs_projection`: ``count``, ``masks`` (True = kept), ``diagonal``
    (the running diagonal curvature, a list over the floating leaves; ``None`` unless
    ``curvature="diagonal"``), ``skipped`` and ``bad_sparsity`` (int32 counters, zero in a
    healthy run: see :class:`~iobs_jax.optax.SparsityState`)."""

    count: jax.Array
    masks: Any
    diagonal: Any
    skipped: jax.Array
    bad_sparsity: jax.Array


def obs_projection(
    sparsity: float | Schedule,
    curvature: str = "diagonal",
    *,
    damping: float = 1e-2,
    damping_mode: str = "relative",
    decay: float = 0.99,
    distribution: str = "global",
    filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
    pattern: Any = None,
    update_every: int = 1,
    cg_tol: float = 1e-4,
    cg_maxiter: int = 20,
    compensate: str = "every_update",
) -> optax.GradientTransformationExtraArgs:
    """Land the optimizer's step on its OBS projection: goes last in any chain.

    With ``theta~ = params + u`` the candidate of the optimizers before it and a curvature
    ``C`` (plus damping), the update returned is ``theta+ - params`` with

        mask   = top-k of the OBS saliency theta~_j^2 / [C^{-1}]_jj   (every update_every)
        theta+ = argmin_{theta[~mask] = 0} (theta - theta~)^T C (theta - theta~)
               = theta~ - C^{-1}[:, P] ([C^{-1}]_PP)^{-1} theta~_P      (P = ~mask)

    (the OBS formula: the kept weights absorb the removed ones through ``C``; computed
    by ``_obs.project``). Curvature sources, extra arguments of ``update`` (Optax passes
    them through ``optax.chain``):

    - ``"fisher"``: empirical Fisher ``G^T G / m`` of ``per_example_grads=`` (a pytree
      like params with a leading axis of ``m`` examples, at ``params``, or a function of
      no arguments returning one, run at the caller's matmul precision and, with
      ``compensate="mask_updates"``, only at mask updates), solved by Woodbury in
      ``O(m^2 d)``; exact inverse diagonal for the saliency.
    - ``"hvp"``: the loss Hessian through Hessian-vector products of ``loss_fn=``
      (``params -> scalar``, at ``params``); the kept weights are corrected by truncated
      CG on the masked operator. Matrix-free curvature has no inverse diagonal, so the
      mask is top-k of ``|theta~|`` (Topk-I-OBS).
    - ``"diagonal"`` (default): no extra arguments: an EMA (``decay``, bias-corrected) of
      the squared updates it receives, ``v``, and ``C = diag(v)``. After plain SGD this is
      the empirical Fisher diagonal times ``lr^2`` (the scale cancels with relative
      damping); pass ``grads=`` to use squared gradients instead whatever the optimizer.
      The saliency is ``theta~^2 C`` and the projection of a diagonal curvature is the
      mask. The default because it needs nothing but the chain, and because it is the
      curvature that measured best: on the MNIST MLP after AdamW it beats gradual
      magnitude pruning at 90% and 95%, the Fisher at neither with
      ``compensate="every_update"`` (``docs/sparse_training.md``). Until December 2026
      the default was ``"fisher"``: pass it by name (``per_example_grads=`` is ignored
      by the other curvatures, as Optax chains offer extra arguments to every member).

    ``damping``: with ``damping_mode="relative"`` (default) ``lambda = damping * mean(diag
    C)`` (exact for Fisher and diagonal, a 4-probe Hutchinson estimate of ``|trace|`` for
    the Hessian), the convention of ``iobs_jax``; ``"absolute"``: ``lambda = damping``.
    ``sparsity``, ``distribution``, ``filter``, ``pattern`` and ``update_every`` are those
    of :func:`hard_threshold` (between mask updates the held mask is projected onto).
    With a Block/Channel pattern a group's score is the 2-norm of its members' saliency
    ranks, i.e. ``sqrt`` of the summed single-weight saliencies (the diagonal
    approximation of a group's OBS cost).

    ``compensate``: ``"every_update"`` (default) projects every candidate as above;
    ``"mask_updates"`` applies the OBS correction only at mask updates (when weights are
    newly removed, as gradual OBS pruning does) and in between zeroes the pruned
    coordinates as :func:`hard_threshold` does. Between mask updates the removed part of
    the candidate is only the optimizer's step on pruned coordinates; with a Fisher of a
    few dozen gradients, folding it into the kept weights every step adds noise (on the
    MNIST MLP at 95% one seed lost 1.8 points in its last epoch that way). The curvature
    is then computed only at mask updates (a ``lax.cond``: ``loss_fn`` and a callable
    ``per_example_grads`` are traced but not run in between; under ``vmap`` with a
    batched step count both branches run), so a Fisher of many more examples, as
    WoodFisher uses, costs time only there. Neither is better everywhere: on the MNIST
    CNN at 98% ``"mask_updates"`` lost 4 points to ``"every_update"``
    (``docs/sparse_training.md``). With ``"diagonal"`` the two are the same (its
    projection is the mask).

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), obs_projection(0.5, "diagonal"))
      >>> params = {"w": jnp.array([[0.5, -2.0], [1.0, 0.1]])}
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> int(jnp.sum(optax.apply_updates(params, updates)["w"] != 0))
      2
    """
    _check_obs_options(curvature, damping, damping_mode, decay, cg_tol, cg_maxiter)
    check_choice(compensate, "compensate", COMPENSATE)
    proj = Projector(sparsity, distribution, filter, pattern, update_every)
    options = dict(damping=damping, relative=damping_mode == "relative", decay=decay,
                   cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    build = {"fisher": _fisher_curvature, "hvp": _hvp_curvature,
             "diagonal": _diagonal_curvature}[curvature]

    def init_fn(params):
        return _init_state(OBSProjectionState, proj, params, curvature == "diagonal")

    def update_fn(updates, state, params=None, *, per_example_grads=None, loss_fn=None,
                  grads=None, **_extra):
        if _is_function(per_example_grads):  # the user's model, at the user's precision
            per_example_grads = _at_callers_precision(per_example_grads)
        return update_at_highest(updates, state, params, per_example_grads, loss_fn, grads)

    @highest_precision  # Woodbury and CG cancel; TF32 products would break them on GPU
    def update_at_highest(updates, state, params, per_example_grads, loss_fn, grads):
        _need_params(params, "obs_projection")
        floats, where, rebuild = _float_leaves(params)
        leaves = jax.tree.leaves(updates)
        steps = [leaves[i].astype(p.dtype) for i, p in zip(where, floats, strict=True)]
        target = [p + u for p, u in zip(floats, steps, strict=True)]
        extra = dict(per_example_grads=per_example_grads, loss_fn=loss_fn, grads=grads,
                     where=where, rebuild=rebuild, steps=steps)

        def project():
            curv, scores, diagonal = build(floats, target, state, extra, **options)
            masks, bad = proj.masks(lambda: rebuild(scores(), fill="ones"), state.masks,
                                    state.count, like=params)
            return _apply_masks(target, masks, where, curv), masks, bad, diagonal

        if compensate == "mask_updates" and curvature != "diagonal":
            # The curvature (and a callable per_example_grads) only at mask updates; a
            # bad schedule value there keeps the masks, so nothing is newly removed.
            _, recompute, bad = proj.step(state.count)
            hold = lambda: (_apply_masks(target, state.masks, where, None), state.masks, bad)
            new, masks, bad = jax.lax.cond(recompute, lambda: project()[:3], hold)
            diagonal = None
        else:
            new, masks, bad, diagonal = project()
        out, masks, diagonal, skipped, bad = _finish_second_order(
            updates, new, floats, where, masks, state, bad, target, diagonal, state.diagonal)
        return out, OBSProjectionState(optax.safe_increment(state.count), masks, diagonal,
                                       skipped, bad)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_function(x) -> bool:
    """A function to call, not data: a callable pytree (an Equinox module of per-example
    gradients, as ``jax.vmap(jax.grad(...))`` returns for an Equinox model) is data."""
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def _at_callers_precision(fn: Callable) -> Callable:
    """``fn`` run at the matmul precision in force where it was passed (the projection
    itself runs at ``"highest"``; the user's forward and backward passes should not)."""
    precision = jax.config.jax_default_matmul_precision

    def call():
        with jax.default_matmul_precision(precision):
            return fn()

    return call


def _check_obs_options(curvature, damping, damping_mode, decay, cg_tol, cg_maxiter):
    """Everything about :func:`obs_projection` that can be checked before the first step."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}; got "
                         f"{curvature!r} ('fisher' needs per_example_grads=, 'hvp' needs "
                         f"loss_fn=, 'diagonal' nothing).")
    if damping_mode not in ("relative", "absolute"):
        raise ValueError(f"damping_mode must be 'relative' (lambda = damping * mean diag C) "
                         f"or 'absolute'; got {damping_mode!r}.")
    check_curvature_options(damping, decay, cg_tol, cg_maxiter)


def _fisher_curvature(floats, target, state, extra, *, damping, relative, **_):
    per_example = extra["per_example_grads"]
    if per_example is None:
        raise ValueError("obs_projection(curvature='fisher') needs per_example_grads= "
                         "(jax.vmap(jax.grad(loss), (None, 0))(params, batch), or a "
                         "function of no arguments returning them), passed to update "
                         "(optax.chain forwards it).")
    rows = fisher_rows(per_example() if _is_function(per_example) else per_example,
                       extra["where"], floats)
    lam = damping * WoodburyCurvature(rows, 0.0).mean_diag() if relative else damping
    curv = WoodburyCurvature(rows, lam)
    return curv, lambda: [saliency_rank(x, g) for x, g in
                          zip(target, curv.inverse_diag(), strict=True)], None


def _hvp_curvature(floats, target, state, extra, *, damping, relative, cg_tol, cg_maxiter,
                   **_):
    if extra["loss_fn"] is None:
        raise ValueError("obs_projection(curvature='hvp') needs loss_fn= (params -> scalar "
                         "batch loss) for Hessian-vector products, passed to update.")
    op = hvp_operator(extra["loss_fn"], floats, extra["rebuild"])
    lam = damping * jnp.abs(tree_mean_diag(op, floats)) if relative else damping
    curv = OperatorCurvature(op, sum(p.size for p in floats), floats[0].dtype, lam,
                             cg_tol=cg_tol, cg_maxiter=cg_maxiter,
                             truncate=True)  # network Hessians are indefinite: Newton-CG
    return curv, lambda: [jnp.abs(x) for x in target], None


def _diagonal_curvature(floats, target, state, extra, *, damping, relative, decay, **_):
    source = extra["steps"] if extra["grads"] is None else [
        jax.tree.leaves(extra["grads"])[i].astype(p.dtype)
        for i, p in zip(extra["where"], floats, strict=True)]
    diagonal = [decay * v + (1 - decay) * jnp.square(g)
                for v, g in zip(state.diagonal, source, strict=True)]
    t = state.count.astype(jnp.float32) + 1
    v = [d / (1 - decay**t) for d in diagonal]
    if relative:
        mean = sum(jnp.sum(x) for x in v) / sum(x.size for x in v)
        # No curvature seen yet (all-zero steps): rank by magnitude, C = I.
        lam = jnp.where(mean > 0, damping * mean, 1.0)
    else:
        lam = damping
    return None, lambda: [saliency_rank(x, 1.0 / (c + lam))
                          for x, c in zip(target, v, strict=True)], diagonal


# ------------------------------------------------------------------ STE and one-shot


def ste(
    sparsity: float | Schedule,
    *,
    distribution: str = "global",
    filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
    pattern: Any = None,
    update_every: int = 1,
    refine: float = 0.0,
) -> optax.GradientTransformation:
    """Straight-through magnitude pruning (STE; SR-STE with ``refine > 0``): last in a chain.

    The parameters stay dense; the forward pass uses ``W * M`` with ``M`` the top-k of
    ``|W|`` and the gradient taken as if ``M`` were the identity (Bengio et al. 2013's
    straight-through estimator, as in Zhou et al. 2021 and JaxPruner's STE pruners).
    Compute the loss on ``masked_params(params, opt_state)``, which returns ``W * M``
    with exactly that gradient; the state's ``M`` is the mask of the current params
    (recomputed from ``|params + u|`` every ``update_every`` updates, from ``|params|`` at
    ``init``). ``refine``: SR-STE's sparse-refined term, applied decoupled:
    ``u' = u - refine * (1 - M) * W``; with ``optax.sgd(lr)`` before it,
    ``refine = lr * lambda_W`` is exactly Zhou et al.'s ``g + lambda_W (1 - M) W``.
    Patterns, distributions, filters and schedules as in :func:`hard_threshold`.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1), ste(0.5))
      >>> params = {"w": jnp.array([[0.5, -2.0], [1.0, 0.1]])}
      >>> state = tx.init(params)
      >>> masked_params(params, state)["w"]
      Array([[ 0., -2.],
             [ 1.,  0.]], dtype=float32)
    """
    if isinstance(refine, bool) or not isinstance(refine, numbers.Real) or not (
            np.isfinite(refine) and refine >= 0):
        raise ValueError(f"refine must be a finite number >= 0 (SR-STE's decay of the "
                         f"pruned weights per update); got {refine!r}.")
    proj = Projector(sparsity, distribution, filter, pattern, update_every)

    def init_fn(params):
        proj.init_masks(params)
        s, _ = proj.sparsity_at(jnp.zeros((), jnp.int32))
        masks = proj.fresh(jax.tree.map(jnp.abs, params), s, proj.chosen(params))
        zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]
        return SparsityState(zeros[0], masks, zeros[1], zeros[2])

    def update_fn(updates, state, params=None):
        _need_params(params, "ste")
        target = optax.apply_updates(params, updates)
        masks, bad = proj.masks(jax.tree.map(jnp.abs, target), state.masks, state.count)
        new = jax.tree.map(
            lambda u, p, m: (u - refine * jnp.where(m, 0, p)).astype(u.dtype)
            if jnp.issubdtype(u.dtype, jnp.floating) else u, updates, params, state.masks)
        new, masks, skipped, bad = _finish(new, updates, masks, state, bad, target)
        return new, SparsityState(optax.safe_increment(state.count), masks, skipped, bad)

    return optax.GradientTransformation(init_fn, update_fn)


def masked_params(params: Any, opt_state: Any) -> Any:
    """``params`` times the masks held in ``opt_state``, with a straight-through gradient.

    The one helper of the sparse-training transforms, needed only for a masked forward
    pass (:func:`ste`; elsewhere the params are already zero off the mask, and this is an
    identity). ``opt_state`` is the state of the whole chain: the one sparse-training
    state inside it is found. The value is ``where(M, W, 0)``; its derivative with
    respect to ``W`` is the identity (``W + stop_gradient(where(M, W, 0) - W)``), so
    ``jax.grad(lambda p: loss(masked_params(p, state)))`` is the STE gradient.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_sparse_state)
             if _is_sparse_state(s)]
    if len(found) != 1:
        raise ValueError(f"masked_params needs exactly one sparse-training state (with masks) "
                         f"inside opt_state; found {len(found)}. Pass the state of the chain "
                         f"that holds one iobs_jax.optax transform.")
    return jax.tree.map(
        lambda p, m: p + jax.lax.stop_gradient(jnp.where(m, p, 0) - p)
        if jnp.issubdtype(jnp.result_type(p), jnp.floating) else p, params, found[0].masks)


def _is_sparse_state(x) -> bool:
    from iobs_jax.optax.dynamic import DynamicSparseState
    from iobs_jax.optax.transforms import IOBSTransformState
    return isinstance(x, SparsityState | OBSProjectionState | IOBSTransformState |
                      DynamicSparseState)


def sparsify(
    params: Any,
    sparsity: float,
    *,
    distribution: str = "global",
    filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
    pattern: Any = None,
    scores: Any = None,
) -> tuple[Any, Any]:
    """One-shot magnitude pruning: ``(sparse_params, masks)``.

    Keeps the largest ``|params|`` (or ``scores``, a pytree like params) under the same
    rules as the transforms: ``sparsity`` removed over the ``filter``-selected leaves,
    shared by ``distribution`` (``"global"``, ``"uniform"``, ``"erk"``), in ``pattern``
    (unstructured, ``"2:4"``, ``"4x4"`` blocks, ``"channel"``). Works inside ``jit`` (the
    sparsity may be traced). JaxPruner's ``instant_sparsify``.

    Example:
      >>> p, m = sparsify({"w": jnp.array([[0.5, -2.0], [1.0, 0.1]])}, 0.5)
      >>> p["w"]
      Array([[ 0., -2.],
             [ 1.,  0.]], dtype=float32)
    """
    proj = Projector(sparsity if isinstance(sparsity, numbers.Real) else 0.0, distribution,
                     filter, pattern, 1)
    proj.init_masks(params)
    scores = jax.tree.map(jnp.abs, params) if scores is None else scores
    if jax.tree.structure(scores) != jax.tree.structure(params):
        raise ValueError("scores must be a pytree like params.")
    masks = proj.fresh(scores, jnp.asarray(sparsity, jnp.float32), proj.chosen(params))
    sparse = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)
    return sparse, masks
