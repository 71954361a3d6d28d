"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020) as Optax
transformations that wrap the inner optimizer.

Why a wrapper and not a transform last in a chain: RigL and SET reset the optimizer
moments of regrown connections, and a transform that follows ``optax.adamw`` in a chain
cannot reach adamw's state. ``rigl(optax.adamw(1e-3), 0.9, ...)`` owns the inner state,
finds its parameter-shaped leaves with ``optax.tree_utils.tree_map_params`` (Adam's
``mu``/``nu``, SGD's momentum ``trace``, Lion's ``mu``, inside any chain, ``masked`` or
``inject_hyperparams``) and zeroes them at the regrown positions. Clipping and the like
go inside (``rigl(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9)), ...)``)
or before it in a chain.

At every update ``t`` (``count``), with ``M`` the masks in the state:

- a connectivity update when ``t > 0``, ``t % update_every == 0`` and ``t < end_step``:
  per selected leaf with ``k`` active connections, ``n = floor(f(t) * k)`` of them with
  the smallest ``|W|`` are dropped and ``n`` are grown among the rest (including the
  ones just dropped, as in both papers' code): those of largest ``|g|`` (RigL; ``g``
  the dense gradient passed to ``update``, zero-valued weights included) or uniformly
  at random (SET, a fresh key split from the state's). Newly activated connections
  (inactive before, active after) start at exactly zero with zeroed optimizer moments;
  a connection dropped and regrown in the same update keeps its weight and moments
  (RigL's ``reinit_when_same=False``). No optimizer step is taken at these updates
  (RigL's Algorithm 1; JaxPruner's ``skip_gradients``), so the inner state is only reset.
- otherwise an optimizer step on the active weights: the inner optimizer gets the
  masked gradient ``g * M`` (inactive weights' moments stay zero) and the result is
  masked, so ``params + u'`` is zero off ``M``.

``f(t)`` is ``drop_fraction`` decayed by a cosine to 0 at ``end_step`` (RigL, Evci et al.
Eq. 1: ``f(t) = alpha / 2 (1 + cos(pi t / T_end))``), or constant (SET as Mocanu et al.;
``sparse_evolutionary`` decays only when given ``decay="cosine"``), or any schedule.
The initial topology is random (both papers) with the per-leaf counts of
``distribution`` ("erk" by default: Evci et al.'s Erdos-Renyi-Kernel; "uniform"). The
first update zeroes the weights outside it: the gradient of that update is taken at the
dense initialisation unless the params are masked first (``masked_params(params,
state)`` right after ``init``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from iobs_jax.core.masks import topk_leaves
from iobs_jax.core.sparsity import (
    NM,
    Projector,
    expand_groups,
    group_scores,
    keep_counts,
    paths,
)
from iobs_jax.optax.transforms import _all_finite, _need_params


class DynamicSparseState(NamedTuple):
    """State of :func:`rigl` / :func:`sparse_evolutionary`: ``count``, ``masks`` (True =
    active), ``key`` (the PRNG key random choices are split from), ``inner_state`` (the
    wrapped optimizer's), ``skipped`` (updates returned as zeros because the gradient or
    the step was not finite; the state was kept) and ``bad_sparsity`` (connectivity
    updates skipped because the drop-fraction schedule gave a value outside [0, 1])."""

    count: jax.Array
    masks: Any
    key: jax.Array
    inner_state: Any
    skipped: jax.Array
    bad_sparsity: jax.Array


def rigl(inner: optax.GradientTransformation, sparsity: float, *, key: jax.Array,
         end_step: int, update_every: int = 100, drop_fraction: float | Schedule = 0.3,
         distribution: str = "erk", pattern: Any = None,
         filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
         ) -> optax.GradientTransformationExtraArgs:
    """RigL (Evci et al. 2020): drop the smallest weights, grow where the gradient is largest.

    ``inner``: the optimizer it wraps (its moments of regrown weights are reset).
    ``sparsity``: fixed fraction of the selected weights inactive, in [0, 1).
    ``key``: PRNG key of the random initial topology. ``end_step``: no connectivity
    update from this count on (the paper: 75% of training). ``update_every``: ``Delta T``
    (paper: 100). ``drop_fraction``: ``alpha`` (paper: 0.3), cosine-decayed to 0 at
    ``end_step``, or an Optax schedule ``count -> fraction``. ``pattern``: unstructured,
    ``"HxW"`` blocks or ``"channel"`` (whole groups dropped and grown, scored by the
    2-norm). See the module docstring for the exact rule and the differences.

    Example:
      >>> tx = rigl(optax.sgd(0.1), 0.5, key=jax.random.key(0), end_step=10,
      ...           update_every=2, distribution="uniform")
      >>> params = {"w": jnp.ones((4, 4))}
      >>> state = tx.init(params)
      >>> int(jnp.sum(state.masks["w"]))
      8
    """
    return _dynamic(inner, sparsity, key, end_step, update_every, drop_fraction, "cosine",
                    distribution, pattern, filter, grow="gradient")


def sparse_evolutionary(inner: optax.GradientTransformation, sparsity: float, *,
                        key: jax.Array, update_every: int = 100,
                        drop_fraction: float | Schedule = 0.3, end_step: int | None = None,
                        decay: str = "constant", distribution: str = "erk",
                        pattern: Any = None,
                        filter: Callable[[str, Any], bool] | str | None = None,  # noqa: A002
                        ) -> optax.GradientTransformationExtraArgs:
    """SET (Mocanu et al. 2018): drop the smallest weights, grow the same number at random.

    As :func:`rigl` but growth is uniform among the inactive connections, drawn from
    the state's key; ``drop_fraction`` (``zeta``, paper: 0.3) is constant unless
    ``decay="cosine"`` (the RigL paper's SET baseline; needs ``end_step``), and without
    ``end_step`` the topology keeps evolving to the end. Mocanu et al. initialise with
    the Erdos-Renyi distribution ``(n_in + n_out) / (n_in n_out)``; ``"erk"`` is its
    kernel extension (the same for Dense kernels).
    """
    if decay not in ("constant", "cosine"):
        raise ValueError(f"decay must be 'constant' or 'cosine'; got {decay!r}.")
    if decay == "cosine" and end_step is None:
        raise ValueError("decay='cosine' decays the drop fraction to 0 at end_step: pass "
                         "end_step=.")
    return _dynamic(inner, sparsity, key, end_step, update_every, drop_fraction, decay,
                    distribution, pattern, filter, grow="random")


Schedule = Callable[[jax.Array], jax.Array]


def _check_dynamic(inner, sparsity, key, end_step, drop_fraction, distribution, pattern):
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"inner must be an Optax GradientTransformation (the optimizer the "
                        f"method wraps, e.g. optax.adamw(1e-3)); got {type(inner).__name__}.")
    if callable(sparsity):
        raise ValueError("SET/RigL keep a fixed sparsity; for a schedule use hard_threshold, "
                         "ste or obs_projection.")
    if isinstance(pattern, NM) or (isinstance(pattern, str) and ":" in pattern) or \
            isinstance(pattern, tuple):
        raise ValueError("SET/RigL drop and grow single weights, blocks or channels; an N:M "
                         "pattern fixes every group's count: use ste or hard_threshold "
                         "with pattern='2:4'.")
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"SET/RigL keep each leaf's count fixed: distribution must be "
                         f"'uniform' or 'erk'; got {distribution!r}.")
    if not isinstance(key, jax.Array) or key.dtype == jnp.float32:
        raise TypeError("key must be a JAX PRNG key, e.g. jax.random.key(0).")
    if end_step is not None and (isinstance(end_step, bool) or
                                 not isinstance(end_step, numbers.Integral) or end_step < 1):
        raise ValueError(f"end_step must be an int >= 1; got {end_step!r}.")
    if not callable(drop_fraction) and (
            isinstance(drop_fraction, bool) or not isinstance(drop_fraction, numbers.Real)
            or not 0 <= drop_fraction <= 1):
        raise ValueError(f"drop_fraction must be a number in [0, 1] or a schedule; got "
                         f"{drop_fraction!r}.")


def _drop_schedule(drop_fraction, decay, end_step) -> Schedule:
    if callable(drop_fraction):
        return drop_fraction
    if decay == "cosine":
        return lambda t: drop_fraction * 0.5 * (
            1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end_step) / end_step))
    return lambda t: jnp.asarray(drop_fraction, jnp.float32)


def _dynamic(inner, sparsity, key, end_step, every, drop_fraction, decay, distribution,
             pattern, filter_fn, *, grow):
    _check_dynamic(inner, sparsity, key, end_step, drop_fraction, distribution, pattern)
    proj = Projector(sparsity, distribution, filter_fn, pattern, every)
    fraction = _drop_schedule(drop_fraction, decay, end_step)
    inner = optax.with_extra_args_support(inner)  # extra arguments are forwarded to it

    def init_fn(params):
        proj.init_masks(params)
        key_init, key_state = jax.random.split(key)
        zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers (donation)
        return DynamicSparseState(zeros[0], _random_masks(proj, params, key_init), key_state,
                                  inner.init(params), zeros[1], zeros[2])

    def update_fn(updates, state, params=None, **extra_args):
        _need_params(params, "rigl/sparse_evolutionary")
        due = (state.count > 0) & (state.count % every == 0)
        if end_step is not None:
            due = due & (state.count < end_step)
        f = jnp.asarray(fraction(state.count), jnp.float32)
        bad = due & ~(jnp.isfinite(f) & (f >= 0) & (f <= 1))
        key, sub = jax.random.split(state.key)
        out, masks, inner_state = jax.lax.cond(
            due & ~bad,
            lambda: _rewire(inner, proj, updates, state, params, f, sub, grow),
            lambda: _train_step(inner, updates, state, params, extra_args))
        # A NaN gradient would rank last and pass as a finite rewiring: check it too.
        finite = _all_finite(out) & _all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = jax.tree.map(lambda o: jnp.where(finite, o, jnp.zeros_like(o)), out)
        return out, DynamicSparseState(
            optax.safe_increment(state.count), keep(masks, state.masks), key,
            keep(inner_state, state.inner_state), state.skipped + (~finite).astype(jnp.int32),
            state.bad_sparsity + bad.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _random_masks(proj, params, key):
    """A random topology with each selected leaf's count from the distribution."""
    _, leaves, treedef = paths(params)
    chosen = proj.chosen(params)
    picked = [(i, x) for i, (x, c) in enumerate(zip(leaves, chosen, strict=True)) if c]
    shapes = [tuple(jnp.shape(x)) for _, x in picked]
    groups = [jax.eval_shape(lambda x: group_scores(proj.pattern, x), x).shape
              for _, x in picked]
    counts = keep_counts(proj.distribution, proj.sparsity,
                         [int(np.prod(g, dtype=np.int64)) for g in groups], shapes)
    out = [jnp.ones(jnp.shape(x), bool) for x in leaves]
    for (i, _), shape, g, k in zip(picked, shapes, groups, counts, strict=True):
        draw = jax.random.uniform(jax.random.fold_in(key, i), g)
        out[i] = expand_groups(proj.pattern, topk_leaves([draw], k)[0], shape)
    return jax.tree.unflatten(treedef, out)


def _train_step(inner, grads, state, params, extra_args):
    """The inner optimizer on the active weights: masked gradient in, masked step out."""
    masked = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, state.masks)
    step, inner_state = inner.update(masked, state.inner_state, params, **extra_args)
    out = jax.tree.map(lambda p, u, m: (jnp.where(m, p + u, 0) - p).astype(u.dtype),
                       params, step, state.masks)
    return out, state.masks, inner_state


def _rewire(inner, proj, grads, state, params, fraction, key, grow):
    """One connectivity update: drop, grow, zero the new weights and their moments."""
    _, leaves, treedef = paths(params)
    chosen = proj.chosen(params)
    masks, grads = jax.tree.leaves(state.masks), jax.tree.leaves(grads)
    new, activated = list(masks), [jnp.zeros(jnp.shape(m), bool) for m in masks]
    for i, (p, c) in enumerate(zip(leaves, chosen, strict=True)):
        if not c:
            continue
        active = group_scores(proj.pattern, masks[i].astype(jnp.float32)) > 0
        drop = jnp.where(active, group_scores(proj.pattern, jnp.abs(p)), -jnp.inf)
        if grow == "gradient":
            rise = group_scores(proj.pattern, jnp.abs(grads[i]))
        else:
            rise = jax.random.uniform(jax.random.fold_in(key, i), active.shape)
        kept, born = _drop_and_grow(active, drop, rise, fraction)
        new[i] = expand_groups(proj.pattern, kept, jnp.shape(p))
        activated[i] = expand_groups(proj.pattern, born, jnp.shape(p))
    new, activated = (jax.tree.unflatten(treedef, x) for x in (new, activated))
    out = jax.tree.map(lambda p, m, a, g: (jnp.where(m & ~a, p, 0) - p).astype(g.dtype),
                       params, new, activated, jax.tree.unflatten(treedef, grads))
    return out, new, _reset_moments(inner, state.inner_state, activated)


def _drop_and_grow(active, drop_score, grow_score, fraction):
    """``(new mask, newly activated)`` for one leaf's groups: the ``n = floor(f k)``
    smallest-scored of the ``k`` active are dropped, the ``n`` best-growing among all but
    the remaining ones are grown (the just-dropped included)."""
    k = jnp.sum(active, dtype=jnp.int32)
    n = (fraction * k.astype(jnp.float32)).astype(jnp.int32)
    remain = topk_leaves([drop_score], k - n)[0]
    grown = topk_leaves([jnp.where(remain, -jnp.inf, grow_score)], n)[0]
    new = remain | grown
    return new, new & ~active


def _reset_moments(inner, inner_state, activated):
    """Zero every parameter-shaped leaf of the inner state at the activated positions."""
    def reset(v, a):
        if isinstance(v, optax.MaskedNode) or jnp.shape(v) != jnp.shape(a):
            return v
        return jnp.where(a, jnp.zeros_like(v), v)

    return otu.tree_map_params(inner, reset, inner_state, activated,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))
