"""Pruning a BERT encoder (:mod:`iobs_jax.models.bert`) layer by layer.

The model knows nothing of pruning; this module is the pruning side of it: the
embeddings stay dense, each Transformer layer is a block for
:func:`iobs_jax.prune_blocks`, and padded token positions are left out of every
statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from iobs_jax.core.curvature import highest_precision
from iobs_jax.pruning.blocks import prune_blocks


@highest_precision
def prune_encoder(model: Any, params: Any, batches: Sequence[dict], **prune_kwargs):
    """Prune every Dense layer of the encoder's Transformer layers, layer by layer.

    ``batches`` are tokenizer outputs (dicts with ``input_ids`` and ``attention_mask``);
    padded positions are left out of the statistics. The embeddings are kept dense. Runs
    :func:`iobs_jax.prune_blocks` (the calibration activations flow through each pruned
    layer once) and takes every option of :func:`iobs_jax.prune` (``sparsity``,
    ``method``, ``pattern``, ``target``, ``damping``, ...).

    Returns:
      ``(pruned_params, report)``: params like ``params``; ``report.masks`` a mask tree
      like them (True = kept; all True on the embeddings).
    """
    batches = list(batches)
    for i, b in enumerate(batches):
        if not isinstance(b, dict) or "input_ids" not in b or "attention_mask" not in b:
            raise TypeError(f"batches[{i}] must be a tokenizer output: a dict with "
                            f"input_ids and attention_mask.")
    n = model.config.num_hidden_layers
    inputs = [model.embeddings(params, b) for b in batches]
    new, report = prune_blocks(
        model.blocks(), [params[f"layer_{i}"] for i in range(n)], inputs,
        sample_mask=[np.asarray(b["attention_mask"]) for b in batches], **prune_kwargs,
    )
    out = dict(params)
    masks = jax.tree.map(lambda v: np.ones(np.shape(v), bool), dict(params))
    for i in range(n):
        out[f"layer_{i}"] = new[i]
        masks[f"layer_{i}"] = report.masks[i]
    return out, report._replace(masks=masks)
