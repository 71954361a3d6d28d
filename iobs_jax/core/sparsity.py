"""The sparsity rule shared by every Optax transform: which leaves, which pattern, how
many weights each leaf keeps, and the selection itself (the one top-k of ``_masks``).

Vocabulary (``iobs_jax.optax``):

- ``sparsity``: the fraction of the selected weights set to zero, in ``[0, 1)``, or an
  Optax schedule ``count -> sparsity``. Traced, never static: a schedule does not
  recompile anything.
- ``filter``: ``(path, leaf) -> bool`` with ``path`` like ``"Dense_0/kernel"``, or a
  regular expression searched in the path; default: floating leaves with 2+ dimensions.
- ``pattern``: :class:`Unstructured` (default), :class:`NM` (``"2:4"``), :class:`Block`
  (``"4x4"``) or :class:`Channel` (``"channel"``).
- ``distribution``: how the removed count is shared among leaves: ``"global"`` (one
  threshold over all selected weights), ``"uniform"`` (the same sparsity in every leaf)
  or ``"erk"`` (Erdos-Renyi-Kernel, Evci et al. 2020: leaf density proportional to
  ``sum(shape) / prod(shape)``, leaves that would exceed density 1 kept dense).

Rounding, the one rule: a leaf (or the whole selection) of ``G`` groups keeps
``G - round(s * G)`` groups (round half to even, ``s`` in float32).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iobs_jax.core.masks import nm_mask, topk_leaves

DISTRIBUTIONS = ("global", "uniform", "erk")


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Any weights may be removed (the default pattern)."""


@dataclasses.dataclass(frozen=True)
class NM:
    """``n`` kept in every ``m`` consecutive inputs (axis ``-2`` of a kernel): ``"2:4"``.
    The pattern fixes the sparsity at ``1 - n / m``."""

    n: int
    m: int


@dataclasses.dataclass(frozen=True)
class Block:
    """Whole ``height x width`` tiles of the last two axes (inputs x outputs of a Dense
    kernel, of each kernel position of a Conv) are kept or removed: ``"4x4"``. A block's
    score is the 2-norm of its entries' scores."""

    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class Channel:
    """Whole slices along ``axis`` (default ``-1``: output channels / neurons) are kept
    or removed: ``"channel"``. A channel's score is the 2-norm of its entries' scores."""

    axis: int = -1


Pattern = Unstructured | NM | Block | Channel


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def parse_pattern(pattern: Any) -> Pattern:
    """A typed pattern from ``None``, a pattern object, ``"n:m"``/``(n, m)``, ``"HxW"``
    or ``"channel"``; ValueError naming ``pattern`` and the accepted spellings."""
    hint = ("pattern must be None, 'n:m' like '2:4', 'HxW' like '4x4', 'channel', or "
            "NM(n, m) / Block(h, w) / Channel(axis)")
    if pattern is None or isinstance(pattern, Unstructured):
        return Unstructured()
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if text == "channel":
            return Channel()
        nums = re.fullmatch(r"(\d+)\s*([:x])\s*(\d+)", text)
        if nums is None:
            raise ValueError(f"{hint}; got {pattern!r}.")
        a, sep, b = int(nums[1]), nums[2], int(nums[3])
        pattern = NM(a, b) if sep == ":" else Block(a, b)
    elif isinstance(pattern, tuple) and len(pattern) == 2:
        pattern = NM(*pattern)
    if isinstance(pattern, NM):
        if not (_positive_int(pattern.n) and _positive_int(pattern.m) and pattern.n < pattern.m):
            raise ValueError(f"pattern n:m needs integers 0 < n < m; got {pattern!r}.")
        return pattern
    if isinstance(pattern, Block):
        if not (_positive_int(pattern.height) and _positive_int(pattern.width)):
            raise ValueError(f"pattern Block(h, w) needs integers >= 1; got {pattern!r}.")
        return pattern
    if isinstance(pattern, Channel):
        if not isinstance(pattern.axis, numbers.Integral) or isinstance(pattern.axis, bool):
            raise ValueError(f"pattern Channel(axis) needs an int axis; got {pattern!r}.")
        return pattern
    raise ValueError(f"{hint}; got {pattern!r}.")


def parse_filter(filter: Any) -> Callable[[str, Any], bool] | None:  # noqa: A002
    """``None`` (default rule), a callable ``(path, leaf) -> bool``, or a regex string."""
    if filter is None or callable(filter):
        return filter
    if isinstance(filter, str):
        try:
            rx = re.compile(filter)
        except re.error as err:
            raise ValueError(f"filter: {filter!r} is not a valid regular expression "
                             f"({err}).") from None
        return lambda path, leaf: rx.search(path) is not None
    raise TypeError(f"filter must be a callable (path, leaf) -> bool or a regex string; "
                    f"got {type(filter).__name__}.")


def check_sparsity(s, name="sparsity"):
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= float(s) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) or an Optax schedule; got {s!r}.")


def check_schedule_start(schedule, name):
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


def is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def paths(tree):
    """``(names, leaves, treedef)`` with names like ``"Dense_0/kernel"``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    return names, [leaf for _, leaf in leaves], treedef


def selected(params, filter_fn) -> list[bool]:
    """Which leaves are sparsified; errors name the filter and the leaves."""
    names, leaves, _ = paths(params)
    if filter_fn is None:
        chosen = [jnp.ndim(x) >= 2 and is_float(x) for x in leaves]
    else:
        chosen = [bool(filter_fn(n, x)) for n, x in zip(names, leaves, strict=True)]
    if not any(chosen):
        raise ValueError(
            f"the filter selects no parameter to sparsify; leaves are: {', '.join(names)} "
            f"(default filter: floating leaves with 2 or more dimensions)."
        )
    for name, leaf, c in zip(names, leaves, chosen, strict=True):
        if c and not is_float(leaf):
            raise TypeError(f"filter selects {name!r} of dtype {jnp.result_type(leaf)}; only "
                            f"floating leaves can be sparsified (integer leaves are left as "
                            f"they are).")
    return chosen


# ------------------------------------------------------------------ groups of a pattern


def group_scores(pattern: Pattern, x: jax.Array) -> jax.Array:
    """A leaf of scores reduced to one score per group of ``pattern`` (2-norm)."""
    if isinstance(pattern, Block):
        h, w = pattern.height, pattern.width
        a, b = x.shape[-2:]
        tiles = x.reshape(*x.shape[:-2], a // h, h, b // w, w)
        return jnp.sqrt(jnp.sum(jnp.square(tiles), axis=(-3, -1)))
    if isinstance(pattern, Channel):
        axis = pattern.axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != axis)
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=others))
    return x


def expand_groups(pattern: Pattern, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`group_scores` for masks: each group's value on its entries."""
    if isinstance(pattern, Block):
        h, w = pattern.height, pattern.width
        tiles = jnp.broadcast_to(g[..., :, None, :, None],
                                 (*g.shape[:-2], g.shape[-2], h, g.shape[-1], w))
        return tiles.reshape(shape)
    if isinstance(pattern, Channel):
        axis = pattern.axis % len(shape)
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return jnp.broadcast_to(g.reshape(view), shape)
    return g


def num_groups(pattern: Pattern, shape: tuple[int, ...]) -> int:
    size = int(np.prod(shape, dtype=np.int64))
    if isinstance(pattern, Block):
        return size // (pattern.height * pattern.width)
    if isinstance(pattern, Channel):
        return shape[pattern.axis % len(shape)]
    return size


def check_pattern_fits(pattern: Pattern, name: str, shape: tuple[int, ...]) -> None:
    """ValueError naming the leaf when ``pattern`` cannot tile it."""
    if isinstance(pattern, Unstructured):
        return
    if len(shape) < (1 if isinstance(pattern, Channel) else 2):
        raise ValueError(f"pattern {pattern} needs kernels (2+ dims); {name} has shape "
                         f"{shape}. Leave it out with filter=.")
    if isinstance(pattern, NM) and shape[-2] % pattern.m:
        raise ValueError(f"pattern {pattern.n}:{pattern.m}: {name} has {shape[-2]} inputs, "
                         f"not a multiple of {pattern.m}.")
    if isinstance(pattern, Block) and (shape[-2] % pattern.height or shape[-1] % pattern.width):
        raise ValueError(f"pattern {pattern}: {name} of shape {shape} does not tile into "
                         f"{pattern.height}x{pattern.width} blocks over its last two axes.")
    if isinstance(pattern, Channel) and not -len(shape) <= pattern.axis < len(shape):
        raise ValueError(f"pattern {pattern}: {name} of shape {shape} has no axis "
                         f"{pattern.axis}.")


# ------------------------------------------------------------------ how many are kept


def erk_sparsities(s: Any, shapes: list[tuple[int, ...]]) -> jax.Array:
    """Per-leaf sparsities of the Erdos-Renyi-Kernel distribution at overall sparsity ``s``.

    Leaf ``l`` with ``n_l`` weights gets density ``min(1, eps * r_l)``, ``r_l =
    sum(shape_l) / prod(shape_l)``, with ``eps`` chosen so that the kept weights total
    ``(1 - s) * sum(n_l)``; a leaf whose density would exceed 1 is made dense and ``eps``
    solved again over the others (at most one pass per leaf). Works with a traced ``s``.
    """
    n = np.array([float(np.prod(sh)) for sh in shapes])
    raw = np.array([float(np.sum(sh)) / float(np.prod(sh)) for sh in shapes])
    s = jnp.asarray(s, jnp.float32)
    dense = jnp.zeros(len(shapes), bool)
    eps = jnp.zeros((), jnp.float32)
    for _ in range(len(shapes)):
        budget = (1.0 - s) * n.sum() - jnp.sum(jnp.where(dense, n, 0.0))
        eps = budget / jnp.sum(jnp.where(dense, 0.0, raw * n))
        dense = dense | (eps * raw > 1.0)
    density = jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))
    return (1.0 - density).astype(jnp.float32)


def keep_counts(distribution: str, s: Any, groups: list[int],
                shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """Groups kept per leaf (``"uniform"``/``"erk"``), or one global count in a list of
    one (``"global"``): ``G - round(s * G)``."""
    s = jnp.asarray(s, jnp.float32)
    if distribution == "global":
        total = sum(groups)
        return [total - jnp.round(s * total).astype(jnp.int32)]
    per_leaf = erk_sparsities(s, shapes) if distribution == "erk" else \
        jnp.full(len(groups), s)
    return [g - jnp.round(per_leaf[i] * g).astype(jnp.int32) for i, g in enumerate(groups)]


def select(pattern: Pattern, distribution: str, scores: list[jax.Array], s: Any
           ) -> list[jax.Array]:
    """Masks (True = kept) for the selected leaves' ``scores`` at sparsity ``s``."""
    if isinstance(pattern, NM):
        return [nm_mask(x.astype(jnp.float32), pattern.n, pattern.m, axis=-2) for x in scores]
    shapes = [tuple(x.shape) for x in scores]
    grouped = [group_scores(pattern, x) for x in scores]
    counts = keep_counts(distribution, s, [g.size for g in grouped], shapes)
    if distribution == "global":
        masks = topk_leaves(grouped, counts[0])
    else:
        masks = [topk_leaves([g], k)[0] for g, k in zip(grouped, counts, strict=True)]
    return [expand_groups(pattern, m, sh) for m, sh in zip(masks, shapes, strict=True)]


def check_distribution(distribution: Any, pattern: Pattern) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}; "
                         f"got {distribution!r}.")
    if isinstance(pattern, Channel) and distribution == "global":
        raise ValueError("pattern 'channel': channels of different leaves differ in size, so "
                         "one global count is ill-defined; pass distribution='uniform' or "
                         "'erk'.")
    return distribution


def check_update_every(update_every: Any) -> int:
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1; got {update_every!r}.")
    return update_every


class Projector:
    """The shared projection rule of the transforms: which leaves, how many kept, the
    pattern, when. Options are validated here, at construction (the boundary)."""

    def __init__(self, sparsity, distribution, filter_fn, pattern, update_every):
        self.pattern = parse_pattern(pattern)
        if callable(sparsity):
            if isinstance(self.pattern, NM):
                raise ValueError("an N:M pattern fixes the sparsity; do not pass a schedule.")
            start = check_schedule_start(sparsity, "sparsity")
            if not 0.0 <= start < 1.0:
                raise ValueError(f"sparsity: the schedule gives {start} at step 0; it must "
                                 f"return fractions in [0, 1).")
        else:
            check_sparsity(sparsity)
        self.distribution = check_distribution(distribution, self.pattern)
        self.sparsity, self.filter = sparsity, parse_filter(filter_fn)
        self.every = check_update_every(update_every)

    def chosen(self, params) -> list[bool]:
        return selected(params, self.filter)

    def init_masks(self, params):
        """All-True masks like ``params``, after checking that the pattern fits."""
        names, leaves, _ = paths(params)
        for name, leaf, c in zip(names, leaves, self.chosen(params), strict=True):
            if c:
                check_pattern_fits(self.pattern, name, tuple(np.shape(leaf)))
        return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)

    def sparsity_at(self, count) -> tuple[jax.Array, jax.Array]:
        """``(s, bad)``: the scheduled sparsity (float32, traced) and whether it is unusable
        (NaN or outside ``[0, 1)``; then ``s`` is 0 and the caller keeps its masks)."""
        if not callable(self.sparsity):
            return jnp.float32(self.sparsity), jnp.array(False)
        s = jnp.asarray(self.sparsity(count), jnp.float32)
        bad = ~(jnp.isfinite(s) & (s >= 0) & (s < 1))
        return jnp.where(bad, 0.0, s), bad

    def step(self, count) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(s, recompute, bad)`` of update ``count``: the scheduled sparsity, whether the
        masks are recomputed (every ``update_every``-th update, with a usable ``s``), and
        whether a due update has an unusable ``s`` (then the masks are kept)."""
        s, unusable = self.sparsity_at(count)
        due = count % self.every == 0
        return s, due & ~unusable, due & unusable

    def masks(self, scores, old_masks, count, like=None):
        """``(masks, bad)``: new masks from ``scores`` (a pytree like params) at mask-update
        steps, else ``old_masks``. ``bad``: the schedule's sparsity is NaN or outside
        ``[0, 1)`` at a mask-update step; the old masks are kept then (pruning everything
        or nothing is never what a schedule meant). ``like``: the params, whose leaves
        the filter sees (default: ``scores``). ``scores`` may be a function returning
        them: then they are computed only at mask updates (an OBS saliency needs the
        inverse curvature's diagonal, which the projection itself does not)."""
        thunk = scores if callable(scores) else (lambda: scores)
        chosen = self.chosen(like if like is not None else scores)
        s, recompute, bad = self.step(count)
        if self.every == 1 and not callable(self.sparsity):
            return self.fresh(thunk(), s, chosen), bad
        # Between mask updates skip the scores and the selection entirely.
        new = jax.lax.cond(recompute, lambda: self.fresh(thunk(), s, chosen),
                           lambda: old_masks)
        return new, bad

    def fresh(self, scores, s, chosen):
        """Masks like ``scores``: selected leaves by the pattern and distribution at
        sparsity ``s``, the others all True."""
        _, leaves, treedef = paths(scores)
        picked = [x for x, c in zip(leaves, chosen, strict=True) if c]
        it = iter(select(self.pattern, self.distribution, picked, s))
        out = [next(it) if c else jnp.ones(jnp.shape(x), bool)
               for x, c in zip(leaves, chosen, strict=True)]
        return jax.tree.unflatten(treedef, out)
