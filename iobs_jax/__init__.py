"""iobs_jax: sparse optimization with second-order information in JAX.

The Iterative Optimal Brain Surgeon (I-OBS, Wu et al., NeurIPS 2024) and its family:
k-sparse projections, the OBS projection and greedy OBS, Hessian-vector-product
curvature, IHT / I-OBS solvers that jit, vmap and take pytrees, and post-training
pruning of Flax models (magnitude, Wanda, SparseGPT, OBC, I-OBS), and Optax
transformations for sparse training (``iobs_jax.optax``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# The layout, floor by floor (each imports only from the floors below it):
#   core/      masks (the one top-k), obs (the OBS projection), curvature (CG, Woodbury,
#              inverses), sparsity patterns, validation, progress bars
#   solvers/   IHT / NIHT / HTP, I-OBS, OBSPursuit
#   recovery/  problem generators, sweeps, figures, the paper's experiments
#   optax/     sparse-training transformations
#   pruning/   the model-agnostic pruning driver, layer-wise methods, Fisher pruning
#   models/    MNIST nets, BERT, the decoder LM, corpora (no pruning inside)
#   cli/       the iobs-jax command
# Names are imported on first use (PEP 562), so that `import iobs_jax` and
# `iobs-jax --help` do not load JAX, Flax, tokenizers or matplotlib until needed.
_SUBMODULES = ("bert", "cli", "core", "corpus", "mnist", "models", "optax", "problems",
               "pruning", "recovery", "solvers", "sweep")
_NAMES = {
    ".solvers.base": ("Status", "raise_if_failed", "trajectory"),
    ".pruning.blocks": ("prune_blocks",),
    ".core.curvature": ("DenseCurvature", "OperatorCurvature", "conjugate_gradient",
                        "dense_hessian", "hvp", "make_curvature", "newton_direction",
                        "power_iteration"),
    ".pruning.fisher": ("FisherReport", "fisher_prune"),
    ".solvers.iht": ("IHT", "IHTState"),
    ".solvers.iobs": ("IOBS", "IOBSState"),
    ".core.masks": ("hard_threshold", "nm_mask", "topk_mask"),
    ".core.obs": ("greedy_obs", "obs_project", "obs_project_from_inverse", "obs_saliency"),
    ".pruning.plan": ("Plan", "PlanEntry"),
    ".pruning.driver": ("LayerReport", "PruneReport", "prune", "prune_plan"),
    ".solvers.pursuit": ("OBSPursuit", "OBSPursuitState"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

# Old module names (before the subpackages) stay importable and are the same module
# objects: `iobs_jax.problems is iobs_jax.recovery.problems`, `iobs_jax._prune is
# iobs_jax.pruning.driver`. (`iobs_jax.bert` is a small module of its own: the pruning of
# an encoder moved out of the model, to `iobs_jax.pruning.encoder`.)
_MOVED = {
    "problems": "recovery.problems", "sweep": "recovery", "mnist": "models.mnist",
    "corpus": "models.corpus",
    "_masks": "core.masks", "_obs": "core.obs", "_curvature": "core.curvature",
    "_validation": "core.validation", "_support": "core.support",
    "_sparsity": "core.sparsity", "_progress": "core.progress",
    "_base": "solvers.base", "_iht": "solvers.iht", "_iobs": "solvers.iobs",
    "_pursuit": "solvers.pursuit",
    "_sweep": "recovery.grid", "_plots": "recovery.plots", "_paper": "recovery.paper",
    "_transforms": "optax.transforms", "_sparse_training": "optax.projection",
    "_dynamic_sparse": "optax.dynamic",
    "_prune": "pruning.driver", "_layerwise": "pruning.layerwise", "_fisher": "pruning.fisher",
    "_blocks": "pruning.blocks", "_engine": "pruning.engine", "_maps": "pruning.maps",
    "_passes": "pruning.passes", "_plan": "pruning.plan", "_program": "pruning.program",
    "_checkpoint": "pruning.checkpoint",
    "_cli": "cli.main", "_cli_common": "cli.common", "_cli_lm": "cli.lm",
    "_cli_sweep": "cli.sweep", "_cli_transformer": "cli.transformer",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``iobs_jax.<old name>`` as the module it became."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix == __name__ and rest in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module):
        """Nothing to run: the module was executed once, under its new name."""


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldNames())  # before any path finder


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
