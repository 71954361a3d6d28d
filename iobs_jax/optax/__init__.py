"""Optax transformations for sparse training (``iobs_jax.optax``).

Transforms that go last in a chain (``params + u'`` lands on the sparse set, nothing to
call after ``optax.apply_updates``):

- :func:`hard_threshold`: IHT inside any optimizer, ``params + u' = T_k(params + u)``;
  with :func:`cubic_sparsity_schedule` it is gradual magnitude pruning (GMP).
- :func:`obs_projection`: the OBS projection of the optimizer's candidate ``params + u``
  under an empirical Fisher, a Hessian (HVP) or a running diagonal curvature.
- :func:`ste`: straight-through magnitude pruning (SR-STE with ``refine``); its forward
  pass uses :func:`masked_params`, the one helper.

Wrappers around the inner optimizer (they reset its moments of regrown weights):
:func:`rigl` (RigL) and :func:`sparse_evolutionary` (SET). The whole optimizer:
:func:`iobs` (I-OBS with its own Newton-like step). One-shot: :func:`sparsify`.

Shared vocabulary: ``sparsity`` (fraction removed, a number or an Optax schedule),
``filter`` (``(path, leaf) -> bool`` or a regex), ``pattern`` (:class:`Unstructured`,
:class:`NM` / ``"2:4"``, :class:`Block` / ``"4x4"``, :class:`Channel` / ``"channel"``),
``distribution`` (``"global"``, ``"uniform"``, ``"erk"``), ``update_every``. The global
top-k is a threshold search on counts, so parameters sharded over devices are never
gathered.

Example::

    tx = optax.chain(optax.adamw(1e-3), iobs_jax.optax.obs_projection(0.9, "fisher"))
    updates, state = tx.update(grads, state, params, per_example_grads=pe)
"""

from iobs_jax.core.sparsity import NM, Block, Channel, Unstructured, erk_sparsities
from iobs_jax.optax.dynamic import DynamicSparseState, rigl, sparse_evolutionary
from iobs_jax.optax.projection import (
    OBSProjectionState,
    masked_params,
    obs_projection,
    sparsify,
    ste,
)
from iobs_jax.optax.transforms import (
    IOBSTransformState,
    SparsityState,
    cubic_sparsity_schedule,
    hard_threshold,
    iobs,
)

__all__ = [
    "NM",
    "Block",
    "Channel",
    "DynamicSparseState",
    "IOBSTransformState",
    "OBSProjectionState",
    "SparsityState",
    "Unstructured",
    "cubic_sparsity_schedule",
    "erk_sparsities",
    "hard_threshold",
    "iobs",
    "masked_params",
    "obs_projection",
    "rigl",
    "sparse_evolutionary",
    "sparsify",
    "ste",
]
