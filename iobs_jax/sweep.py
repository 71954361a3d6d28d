"""Recovery sweeps, their figures and the paper's synthetic experiments.

``iobs_jax.sweep`` gathers what researchers use to study sparse recovery on many random
instances (see :mod:`iobs_jax.problems` for the generators):

- :func:`sweep` runs solvers over an ``n x k x noise`` grid, one compiled, vmapped,
  device-sharded program per solver for the whole grid (``k`` and ``n`` traced), and
  returns a :class:`SweepResult` (CSV/JSON table);
  :func:`make_solver` builds the named solvers of :data:`SOLVER_NAMES`.
- :func:`convergence` records loss and distance to ``x*`` per step;
  :func:`recover_signals` solves given signals (the MNIST prior).
- :func:`plot_phase_transition`, :func:`plot_convergence`, :func:`plot_image_grid`
  (matplotlib, an optional dependency).
- :func:`paper_gaussian`, :func:`paper_mnist`: the paper's two synthetic figures.

Example:
  >>> from iobs_jax import sweep as sw
  >>> res = sw.sweep(["htp", "obs-pursuit"], d=256, n=[64, 128], k=[8, 16], trials=100,
  ...                key=jax.random.key(0))
  >>> res.save("results/"); sw.plot_phase_transition(res.rows, "results/phase.png")
"""

from ._paper import paper_gaussian, paper_mnist
from ._plots import plot_convergence, plot_image_grid, plot_phase_transition
from ._sweep import (
    PROBLEMS,
    SOLVER_NAMES,
    SweepResult,
    convergence,
    make_solver,
    mse_hessian,
    recover_signals,
    sweep,
)

__all__ = [
    "PROBLEMS",
    "SOLVER_NAMES",
    "SweepResult",
    "convergence",
    "make_solver",
    "mse_hessian",
    "paper_gaussian",
    "paper_mnist",
    "plot_convergence",
    "plot_image_grid",
    "plot_phase_transition",
    "recover_signals",
    "sweep",
]
