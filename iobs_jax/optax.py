"""Optax transformations for sparse training (``iobs_jax.optax``).

- :func:`hard_threshold`: IHT inside any optimizer, ``params + u' = T_k(params + u)``.
- :func:`iobs`: I-OBS, Newton-like step from curvature, OBS-saliency mask, OBS correction.
- :func:`cubic_sparsity_schedule`: Zhu & Gupta gradual pruning as an Optax schedule.

Example::

    tx = optax.chain(optax.adamw(1e-3), iobs_jax.optax.hard_threshold(sparsity=0.9))
"""

from ._transforms import (
    IOBSTransformState,
    SparsityState,
    cubic_sparsity_schedule,
    hard_threshold,
    iobs,
)

__all__ = [
    "IOBSTransformState",
    "SparsityState",
    "cubic_sparsity_schedule",
    "hard_threshold",
    "iobs",
]
