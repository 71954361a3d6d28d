"""Block-by-block pruning of a chain of Linen blocks (the layers of a Transformer).

:func:`prune_blocks` is a thin wrapper over :func:`iobs_jax.prune`: the blocks are
composed into one function of ``{"block_i": params_i}`` and pruned sequentially in one
pass (the engine carries each block's activations to the next, as SparseGPT does by
hand), so nothing is re-run per block and modules need not be hashable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flax import linen as nn

from iobs_jax.core.curvature import highest_precision
from iobs_jax.pruning.driver import PruneReport, prune

__all__ = ["prune_blocks"]


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
    for name in ("dense_batches", "variables", "apply_kwargs"):
        if name in prune_kwargs:
            raise ValueError(f"prune_blocks does not take {name}=.")
    carry = _default_carry if carry is None else carry
    args = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib_batches]
    if not args:
        raise ValueError("calib_batches is empty.")
    names = [f"block_{i}" for i in range(len(blocks))]

    def chain(tree, batch):
        out = None
        for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
            out = block.apply({"params": tree[name]}, *batch)
            if i + 1 < len(blocks):
                batch = carry(out, batch)
        return out

    pruned, report = prune(chain, dict(zip(names, params, strict=True)), args,
                           sample_mask=sample_mask, target=target, verbose=verbose,
                           **prune_kwargs)
    masks = [report.masks[name] for name in names]
    return ([pruned[name] for name in names],
            report._replace(masks=masks, time_s=time.perf_counter() - start))
