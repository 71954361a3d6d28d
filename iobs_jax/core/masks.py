"""Sparsity masks: the one top-k of the library, hard thresholding and N:M patterns.

Every selection rule in iobs_jax (magnitude, OBS saliency, greedy OBS's safeguard, the
solvers' supports) ends in :func:`topk_mask` or :func:`nm_mask` (or their unchecked flat
core), so tie-breaking and validation live in exactly one place. The unchecked family,
for library code that has validated its inputs: :func:`topk_static` (a static ``k``, by
sort), :func:`topk_traced` (a traced ``k``, by threshold search), :func:`topk_any` (either)
and :func:`topk_leaves` (one ``k`` over a list of arrays, e.g. sharded leaves).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iobs_jax.core.validation import check_axis, check_finite, check_float_array, check_int

__all__ = ["topk_mask", "hard_threshold", "nm_mask", "tree_size", "flatten", "unflatten_like"]


def _leaf_sizes(tree: Any) -> list[int]:
    return [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for leaf in jax.tree.leaves(tree)]


def tree_size(tree: Any) -> int:
    """Total number of entries over all leaves of a pytree (a static Python int)."""
    return sum(_leaf_sizes(tree))


def flatten(tree: Any, dtype: Any = None) -> jax.Array:
    """Concatenate the raveled leaves of a pytree (masks, scores) into one vector.

    Unlike ``ravel_pytree`` it keeps booleans boolean; ``dtype`` (default: the leaves'
    common type) is the vector's dtype. Inverse: :func:`unflatten_like`.
    """
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    dtype = jnp.result_type(*leaves) if dtype is None else dtype
    return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])


def unflatten_like(flat: jax.Array, tree: Any) -> Any:
    """Split a flat vector into a pytree shaped like ``tree``, keeping ``flat``'s dtype.

    ``ravel_pytree``'s ``unravel`` casts back to each leaf's dtype (and refuses a boolean
    vector when the leaves' dtypes differ); masks need their own dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    pieces = jnp.split(flat, np.cumsum(_leaf_sizes(tree))[:-1])
    return jax.tree.unflatten(
        treedef, [p.reshape(jnp.shape(leaf)) for p, leaf in zip(pieces, leaves, strict=True)]
    )


def topk_static(scores: jax.Array, k: int) -> jax.Array:
    """Boolean vector with exactly ``k`` True at the largest entries of a 1-D ``scores``."""
    size = scores.shape[0]
    if k == 0:
        return jnp.zeros((size,), bool)
    if k == size:
        return jnp.ones((size,), bool)
    # lax.top_k returns the lower index first among equal values, which is the
    # deterministic tie-break we document: equal scores keep the earliest entries.
    _, idx = lax.top_k(scores, k)
    return jnp.zeros((size,), bool).at[idx].set(True)


def _order_keys(scores: jax.Array) -> jax.Array:
    """Unsigned integers ordered exactly like the float ``scores`` (NaN lowest, ``-0 == +0``).

    The IEEE bit pattern of a non-negative float grows with its value; a negative one
    shrinks. Setting the sign bit of non-negatives and flipping every bit of negatives
    gives one unsigned order for all values, so a threshold can be searched on integers
    with an exact answer in ``nbits`` halvings. 16-bit scores are ranked in float32.
    """
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)  # -0.0 ties with +0.0
    bits = jnp.finfo(scores.dtype).bits
    utype = jnp.uint64 if bits == 64 else jnp.uint32
    u = lax.bitcast_convert_type(scores, utype)
    top = jnp.asarray(1, utype) << (bits - 1)
    return jnp.where(u >= top, ~u, u | top)


def _flat_positions(shape: tuple[int, ...], offset: int) -> jax.Array:
    """Row-major flat index of every entry of a leaf, plus ``offset`` (int32).

    Built from broadcasted iotas rather than ``arange(size).reshape``: each device makes
    its own shard of it, so nothing of full size exists under sharding.
    """
    pos = jnp.full(shape, offset, jnp.int32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        pos = pos + stride * lax.broadcasted_iota(jnp.int32, shape, axis)
        stride *= shape[axis]
    return pos


def _count(leaves, predicate) -> jax.Array:
    # One int32 per leaf, summed: under sharding each is a local count plus an all-reduce.
    return sum(jnp.sum(predicate(i, x), dtype=jnp.int32) for i, x in enumerate(leaves))


def topk_leaves(scores: list[jax.Array], k: Any) -> list[jax.Array]:
    """Masks of the ``k`` largest entries over a list of score arrays, by threshold search.

    The same answer as :func:`topk_static` on the concatenated scores (exactly
    ``k`` True, ties to the lower flat index, earlier leaves first), but nothing is
    concatenated or sorted: the ``k``-th largest value ``tau`` is found by bisection on
    the order keys of :func:`_order_keys` (``nbits`` counting passes), and when more
    entries tie at ``tau`` than are needed, the cut among them is found by a second
    bisection on the flat index (``log2(d)`` passes, skipped without ties). Every pass
    is an elementwise comparison and a sum, so with sharded scores each device counts
    its shard and only scalars cross devices (the global top-k of sharded parameters
    without gathering them). ``k`` may be traced (a sparsity schedule); it is clipped
    to ``[0, d]``; NaN scores rank lowest.
    """
    work = jnp.promote_types(jnp.result_type(*scores), jnp.float32)
    # Materialize the keys once: XLA would otherwise fuse the producer of the scores
    # into every counting pass (measured 2x slower for a saliency from a solve).
    keys = lax.optimization_barrier([_order_keys(jnp.asarray(s, work)) for s in scores])
    sizes = [int(np.prod(x.shape, dtype=np.int64)) for x in keys]
    total = sum(sizes)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
    utype = keys[0].dtype
    nbits = jnp.iinfo(utype).bits

    def halve(_, bounds):
        # Invariant: count(key >= lo) >= k > count(key >= hi + 1).
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1)
        ok = _count(keys, lambda _, x: x >= mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    start = (jnp.zeros((), utype), jnp.asarray(np.iinfo(utype).max, utype))
    tau = lax.fori_loop(0, nbits, halve, start)[0]
    need = k - _count(keys, lambda _, x: x > tau)
    ties = _count(keys, lambda _, x: x == tau)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    positions = [_flat_positions(x.shape, int(o)) for x, o in zip(keys, offsets, strict=True)]

    def cut():
        # The smallest j with count(tied and position < j) >= need.
        def halve_index(_, bounds):
            lo, hi = bounds
            mid = (lo + hi) // 2
            ok = _count(keys, lambda i, x: (x == tau) & (positions[i] < mid)) >= need
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        steps = max(1, int(np.ceil(np.log2(total + 1))))
        return lax.fori_loop(0, steps, halve_index, (jnp.int32(0), jnp.int32(total)))[1]

    limit = lax.cond(ties > need, cut, lambda: jnp.int32(total))
    return [jnp.where(k > 0, (x > tau) | ((x == tau) & (p < limit)), False)
            for x, p in zip(keys, positions, strict=True)]


def topk_traced(scores: jax.Array, k: Any) -> jax.Array:
    """:func:`topk_static` for a traced ``k`` (a sparsity schedule inside ``jit``): the
    threshold search of :func:`topk_leaves` on one vector, no sort (a sort-based
    version cost ~45x more on a 400k-entry layer block)."""
    return topk_leaves([scores], k)[0]


def topk_any(scores: jax.Array, k: Any) -> jax.Array:
    """:func:`topk_static` for a static ``k``, :func:`topk_traced` for a traced one.

    The solvers' sparsity may be a traced value (``max_k`` set: sweeps compile one program
    for every ``k``); both select the same entries (ties to the lower index) for scores
    without ``-0.0`` (the threshold search ties ``-0.0`` with ``+0.0``), which magnitudes
    and saliencies never are, so a traced ``k`` gives the static program's supports.
    """
    if isinstance(k, int | np.integer):
        return topk_static(scores, int(k))
    return topk_traced(scores, k)


# The family's former private names (imported by earlier code).
_topk_mask_flat, _topk_mask_dynamic = topk_static, topk_traced
_topk_mask_any, _topk_mask_leaves = topk_any, topk_leaves


def topk_mask(scores: Any, k: int) -> Any:
    """Mask of the ``k`` largest scores.

    ``mask[i] = True`` iff ``scores[i]`` is among the ``k`` largest. Ties are broken
    deterministically in favour of the lower flat index (for a pytree: earlier leaves in
    ``jax.tree.leaves`` order first, then lower index inside a leaf).

    Args:
      scores: an array of any shape, or a pytree of arrays. For a pytree ``k`` counts
        globally across all leaves (the "global" sparsity of pruning).
      k: static Python int with ``0 <= k <= size``.

    Returns:
      A boolean array (or pytree of boolean arrays) shaped like ``scores`` with exactly
      ``k`` True entries.

    Example:
      >>> topk_mask(jnp.array([0.1, 3.0, -2.0, 3.0]), 2)
      Array([False,  True, False,  True], dtype=bool)
    """
    # +-inf scores are ordered (an infinite saliency means "never prune"); NaN is not.
    scores = jax.tree.map(
        lambda s: check_finite(check_float_array(s, "scores"), "scores", allow_inf=True), scores
    )
    return _topk_tree(scores, k)


def _topk_tree(scores: Any, k: int) -> Any:
    """:func:`topk_mask` on float arrays already checked."""
    if not jax.tree.leaves(scores):
        raise ValueError("topk_mask got an empty pytree of scores.")
    k = check_int(k, "k", low=0, high=tree_size(scores))
    return unflatten_like(topk_static(flatten(scores), k), scores)


def hard_threshold(x: Any, k: int) -> Any:
    """The k-sparse projection ``T_k``: keep the ``k`` entries of largest magnitude.

    ``T_k(x)_i = x_i`` if ``|x_i|`` is among the ``k`` largest magnitudes, else ``0``.
    For a pytree the ``k`` entries are chosen globally across leaves. Dtypes are kept.

    Example:
      >>> hard_threshold(jnp.array([0.5, -2.0, 1.0]), 2)
      Array([ 0., -2.,  1.], dtype=float32)
    """
    x = jax.tree.map(lambda leaf: jnp.asarray(check_float_array(leaf, "x") if isinstance(
        leaf, str) else leaf), x)
    # Integers are allowed (and kept); magnitudes are compared in floating point.
    magnitudes = jax.tree.map(
        lambda leaf: jnp.abs(check_finite(check_float_array(leaf, "x"), "x")), x
    )
    mask = _topk_tree(magnitudes, k)
    return jax.tree.map(lambda leaf, m: jnp.where(m, leaf, jnp.zeros_like(leaf)), x, mask)


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
    """N:M semi-structured mask: exactly ``n`` kept in every ``m`` consecutive entries.

    Groups are ``m`` consecutive entries along ``axis`` (for a Dense kernel of shape
    ``(inputs, outputs)`` use ``axis=0``: groups of inputs, as sparse tensor cores expect).
    Inside a group the ``n`` largest scores are kept, ties to the lower index.

    Args:
      scores: array of any rank.
      n, m: static ints with ``0 <= n <= m`` and ``m >= 1``; the length of ``axis`` must be
        divisible by ``m``.
      axis: the axis along which groups are formed.

    Example:
      >>> nm_mask(jnp.array([4., 1., 3., 2., 0., 5., 6., 7.]), 2, 4)
      Array([ True, False,  True, False, False, False,  True,  True], dtype=bool)
    """
    scores = check_finite(check_float_array(scores, "scores"), "scores", allow_inf=True)
    if scores.ndim == 0:
        raise ValueError("nm_mask needs an array with at least one axis; got a scalar.")
    m = check_int(m, "m", low=1)
    n = check_int(n, "n", low=0, high=m)
    axis = check_axis(axis, scores.ndim)
    length = scores.shape[axis]
    if length % m:
        raise ValueError(
            f"nm_mask: the length of axis {axis} ({length}) must be divisible by m={m}; "
            f"pad the scores or choose another m."
        )
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], length // m, m)
    if n == 0:
        mask = jnp.zeros(groups.shape, bool)
    elif n == m:
        mask = jnp.ones(groups.shape, bool)
    else:
        _, idx = lax.top_k(groups, n)  # lower index first among ties
        mask = jnp.any(jax.nn.one_hot(idx, m, dtype=jnp.int8) > 0, axis=-2)
    return jnp.moveaxis(mask.reshape(moved.shape), -1, axis)
