"""Sparsity masks: the one top-k of the library, hard thresholding and N:M patterns.

Every selection rule in iobs_jax (magnitude, OBS saliency, greedy OBS's safeguard, the
solvers' supports) ends in :func:`topk_mask` or :func:`nm_mask` (or their unchecked flat
core), so tie-breaking and validation live in exactly one place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._validation import check_axis, check_finite, check_float_array, check_int

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


def _topk_mask_flat(scores: jax.Array, k: int) -> jax.Array:
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


def _topk_mask_dynamic(scores: jax.Array, k: jax.Array) -> jax.Array:
    """:func:`_topk_mask_flat` for a traced ``k`` (a sparsity schedule inside ``jit``).

    Finds the ``k``-th largest score by a radix search on order-preserving integer keys
    (one counting pass per bit: ``O(32 d)`` for float32, no sort), then keeps everything
    above it and, among the scores equal to it, the lowest indices, exactly as
    ``lax.top_k`` breaks ties. A sort-based version cost ~45x more on a 400k-entry layer
    block, enough to dominate SparseGPT's mask selection.
    """
    keys = _ordered_keys(jnp.where(scores == 0, jnp.zeros_like(scores), scores))  # -0 == +0
    # Materialize the keys once: XLA would otherwise fuse the producer of the scores
    # into every counting pass (measured 2x slower for a saliency from a solve).
    keys = lax.optimization_barrier(keys)
    nbits = 8 * scores.dtype.itemsize
    one = jnp.asarray(1, keys.dtype)

    def bit(i, t):  # set bit i of the threshold if at least k keys reach it
        cand = t | (one << (nbits - 1 - i).astype(keys.dtype))
        return jnp.where(jnp.sum(keys >= cand) >= k, cand, t)

    t = lax.fori_loop(0, nbits, bit, jnp.zeros((), keys.dtype))
    above, tie = keys > t, keys == t
    need = k - jnp.sum(above)
    # Usually exactly the needed scores equal the threshold; otherwise keep the first ones.
    first = lambda: tie & (jnp.arange(tie.shape[0]) < _first_count(tie, need))  # noqa: E731
    return above | lax.cond(jnp.sum(tie) > need, first, lambda: tie)


def _first_count(flags: jax.Array, need: jax.Array) -> jax.Array:
    """The largest ``m`` with at most ``need`` True flags before index ``m`` (radix search;
    a cumulative sum compiled to a slow and large program on CPU)."""
    idx = jnp.arange(flags.shape[0])

    def bit(i, m):
        cand = m | (1 << (nbits - 1 - i))
        return jnp.where(jnp.sum(flags & (idx < cand)) <= need, cand, m)

    nbits = max(1, int(flags.shape[0]).bit_length())
    return lax.fori_loop(0, nbits, bit, jnp.zeros((), idx.dtype))


def _ordered_keys(scores: jax.Array) -> jax.Array:
    """Unsigned integers ordered like the float ``scores`` (IEEE sign-magnitude flipped)."""
    width = scores.dtype.itemsize
    u = lax.bitcast_convert_type(scores, {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[width])
    top = jnp.asarray(1, u.dtype) << (8 * width - 1)
    return jnp.where((u & top) != 0, ~u, u | top)


def _topk_mask_any(scores: jax.Array, k: Any) -> jax.Array:
    """:func:`_topk_mask_flat` for a static ``k``, :func:`_topk_mask_dynamic` for a traced one.

    The solvers' sparsity may be a traced value (``max_k`` set: sweeps compile one program
    for every ``k``); both branches select the same entries for scores without ``-0.0``
    (magnitudes and saliencies), so a traced ``k`` gives the static program's supports.
    """
    if isinstance(k, int | np.integer):
        return _topk_mask_flat(scores, int(k))
    return _topk_mask_dynamic(scores, k)


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
    return _topk_mask_tree(scores, k)


def _topk_mask_tree(scores: Any, k: int) -> Any:
    """:func:`topk_mask` on float arrays already checked."""
    if not jax.tree.leaves(scores):
        raise ValueError("topk_mask got an empty pytree of scores.")
    k = check_int(k, "k", low=0, high=tree_size(scores))
    return unflatten_like(_topk_mask_flat(flatten(scores), k), scores)


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
    mask = _topk_mask_tree(magnitudes, k)
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
