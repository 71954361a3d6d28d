"""iobs_jax: sparse optimization with second-order information in JAX.

The Iterative Optimal Brain Surgeon (I-OBS, Wu et al., NeurIPS 2024) and its family:
k-sparse projections, the OBS projection and greedy OBS, Hessian-vector-product
curvature, IHT / I-OBS solvers that jit, vmap and take pytrees, and post-training
pruning of Flax models (magnitude, Wanda, SparseGPT, OBC, I-OBS), and Optax
transformations for sparse training (``iobs_jax.optax``).
"""

from . import bert, corpus, mnist, optax, problems, sweep
from ._base import Status, raise_if_failed, trajectory
from ._blocks import prune_blocks
from ._curvature import (
    DenseCurvature,
    OperatorCurvature,
    conjugate_gradient,
    dense_hessian,
    hvp,
    make_curvature,
    newton_direction,
    power_iteration,
)
from ._fisher import FisherReport, fisher_prune
from ._iht import IHT, IHTState
from ._iobs import IOBS, IOBSState
from ._masks import hard_threshold, nm_mask, topk_mask
from ._obs import greedy_obs, obs_project, obs_project_from_inverse, obs_saliency
from ._plan import Plan, PlanEntry
from ._prune import LayerReport, PruneReport, prune, prune_plan
from ._pursuit import OBSPursuit, OBSPursuitState

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
