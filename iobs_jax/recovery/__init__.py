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
  >>> import jax, tempfile
  >>> from iobs_jax import sweep as sw
  >>> res = sw.sweep(["htp"], d=32, n=[16, 24], k=[2, 4], trials=4, key=jax.random.key(0))
  >>> out = tempfile.mkdtemp()
  >>> paths = res.save(out)                              # results.csv, results.json
  >>> figure = sw.plot_phase_transition(res.rows, out + "/phase.png")
"""

from iobs_jax.recovery.grid import (
    PROBLEMS,
    SOLVER_NAMES,
    SweepResult,
    convergence,
    make_solver,
    mse_hessian,
    recover_signals,
    sweep,
)
from iobs_jax.recovery.paper import paper_gaussian, paper_mnist
from iobs_jax.recovery.plots import plot_convergence, plot_image_grid, plot_phase_transition

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
