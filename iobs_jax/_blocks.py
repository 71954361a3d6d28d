"""Block-by-block pruning of deep models (the layers of a Transformer).

``prune(model, ...)`` with ``sequential=True`` recomputes the whole prefix of the model for
every group of layers: for ``B`` blocks of ``g`` groups that is ``O(g B^2)`` block passes.
:func:`prune_blocks` keeps the calibration activations between blocks instead
(SparseGPT's own scheme): each block is pruned on the inputs the already pruned blocks
produce, then those inputs are pushed through the pruned block once, ``O(g B)`` passes,
and identical blocks share every compiled function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from flax import linen as nn

from ._curvature import highest_precision
from ._prune import PruneReport, _sample_masks, prune

__all__ = ["prune_blocks"]

_APPLY: dict = {}


def jitted_apply(module):
    """``(params, args, kwargs) -> module.apply({"params": params}, *args, **kwargs)``,
    jitted once per (equal) module."""
    if module not in _APPLY:
        _APPLY[module] = jax.jit(lambda p, args, kw: module.apply({"params": p}, *args, **kw))
    return _APPLY[module]


def _default_carry(output, args):
    return (output,) + tuple(args[1:])


@highest_precision
def prune_blocks(
    blocks: Sequence[nn.Module],
    params: Sequence[Any],
    calib_batches: Iterable[Any],
    *,
    carry: Callable[[Any, tuple], tuple] | None = None,
    sample_mask: Any = None,
    target: str = "local",
    verbose: bool = False,
    **prune_kwargs: Any,
) -> tuple[list[Any], PruneReport]:
    """Prune a chain of Linen blocks in order, each on the outputs of the pruned ones.

    Block ``i`` maps its inputs ``args_i`` (a tuple of positional arguments) to
    ``out_i = blocks[i].apply({"params": params[i]}, *args_i)`` and the next block gets
    ``args_{i+1} = carry(out_i, args_i)`` (default: ``out_i`` replaces the first
    argument, e.g. the hidden states, and the rest, e.g. an attention mask, are kept).
    Each block is pruned by :func:`prune` (sequentially within the block) on its own
    calibration inputs; with ``target="dense"`` the layers reconstruct the outputs of the
    dense model, whose activations are propagated alongside through the dense blocks.

    Args:
      blocks: Linen modules, one per block (equal modules share compiled functions).
      params: their ``"params"`` collections, in the same order.
      calib_batches: the first block's calibration inputs: tuples of positional
        arguments (or single arrays).
      carry: ``(block_output, block_args) -> next_block_args``.
      sample_mask: as in :func:`prune`, evaluated on the first block's batches and used
        for every block (e.g. the token mask of padded sequences).
      target: ``"local"`` or ``"dense"`` (see :func:`prune`).
      verbose: print one line per block.
      **prune_kwargs: every other option of :func:`prune` (``sparsity``, ``method``,
        ``pattern``, ``scope``, ``damping``, ``rounds``, ``iterations``, ...).

    Returns:
      ``(pruned_params, report)``: a list like ``params`` and one :class:`PruneReport`
      whose layer names are prefixed with ``block_{i}/`` and whose ``masks`` is a list of
      mask trees, one per block.

    Example:
      >>> blocks = model.blocks()                                   # doctest: +SKIP
      >>> inputs = [model.embeddings(params, b) for b in batches]   # doctest: +SKIP
      >>> new, report = prune_blocks(blocks, [params[f"layer_{i}"] for i in
      ...                            range(len(blocks))], inputs, sparsity=0.5)  # doctest: +SKIP
    """
    start = time.perf_counter()
    blocks, params = list(blocks), list(params)
    if not blocks or len(blocks) != len(params):
        raise ValueError(f"blocks and params must be non-empty lists of equal length; got "
                         f"{len(blocks)} and {len(params)}.")
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{i}] must be a flax.linen Module; got {type(block)}.")
    if prune_kwargs.get("sequential", True) is False:
        raise ValueError("prune_blocks is sequential by construction; drop sequential=False.")
    for name in ("dense_batches", "variables"):
        if name in prune_kwargs:
            raise ValueError(f"prune_blocks does not take {name}=.")
    carry = _default_carry if carry is None else carry
    args = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib_batches]
    if not args:
        raise ValueError("calib_batches is empty.")
    masks = _sample_masks(sample_mask, args)
    dense_args = args if target == "dense" else None

    new_params, layers, mask_trees = [], [], []
    for i, (block, p) in enumerate(zip(blocks, params, strict=True)):
        pruned, report = prune(
            block, p, args, sample_mask=masks, target=target, dense_batches=dense_args,
            **prune_kwargs,
        )
        new_params.append(pruned)
        mask_trees.append(report.masks)
        layers.extend(r._replace(name=f"block_{i}/{r.name}") for r in report.layers)
        if verbose:
            print(f"block {i}: {len(report.layers)} layers, layer loss "
                  f"{report.total_loss:.4e}, {report.time_s:.1f} s")
        if i + 1 < len(blocks):
            forward = jitted_apply(block)
            args = [carry(forward(pruned, a, {}), a) for a in args]
            if dense_args is not None:
                dense_args = [carry(forward(p, a, {}), a) for a in dense_args]
    method = prune_kwargs.get("method", "iobs")
    return new_params, PruneReport(method, layers, mask_trees, time.perf_counter() - start)
