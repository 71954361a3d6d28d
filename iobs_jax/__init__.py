"""iobs_jax: sparse optimization with second-order information in JAX.

The Iterative Optimal Brain Surgeon (I-OBS, Wu et al., NeurIPS 2024) and its family:
k-sparse projections, the OBS projection and greedy OBS, Hessian-vector-product
curvature, IHT / I-OBS solvers that jit, vmap and take pytrees, and post-training
pruning of Flax models (magnitude, Wanda, SparseGPT, OBC, I-OBS), and Optax
transformations for sparse training (``iobs_jax.optax``).
"""

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that `import iobs_jax` and
# `iobs-jax --help` do not load JAX, Flax, tokenizers or matplotlib until needed.
_SUBMODULES = ("bert", "corpus", "mnist", "models", "optax", "problems", "sweep")
_NAMES = {
    "._base": ("Status", "raise_if_failed", "trajectory"),
    "._blocks": ("prune_blocks",),
    "._curvature": ("DenseCurvature", "OperatorCurvature", "conjugate_gradient",
                    "dense_hessian", "hvp", "make_curvature", "newton_direction",
                    "power_iteration"),
    "._fisher": ("FisherReport", "fisher_prune"),
    "._iht": ("IHT", "IHTState"),
    "._iobs": ("IOBS", "IOBSState"),
    "._masks": ("hard_threshold", "nm_mask", "topk_mask"),
    "._obs": ("greedy_obs", "obs_project", "obs_project_from_inverse", "obs_saliency"),
    "._plan": ("Plan", "PlanEntry"),
    "._prune": ("LayerReport", "PruneReport", "prune", "prune_plan"),
    "._pursuit": ("OBSPursuit", "OBSPursuitState"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    else:
        raise AttributeError(f"module 'iobs_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "OBSPursuit",
    "OBSPursuitState",
    "problems",
    "sweep",
    "IHT",
    "IHTState",
    "IOBS",
    "IOBSState",
    "LayerReport",
    "PruneReport",
    "Status",
    "DenseCurvature",
    "FisherReport",
    "OperatorCurvature",
    "conjugate_gradient",
    "dense_hessian",
    "fisher_prune",
    "greedy_obs",
    "hard_threshold",
    "hvp",
    "make_curvature",
    "mnist",
    "models",
    "optax",
    "newton_direction",
    "nm_mask",
    "obs_project",
    "obs_project_from_inverse",
    "obs_saliency",
    "power_iteration",
    "prune",
    "prune_plan",
    "Plan",
    "PlanEntry",
    "prune_blocks",
    "bert",
    "corpus",
    "raise_if_failed",
    "topk_mask",
    "trajectory",
]
