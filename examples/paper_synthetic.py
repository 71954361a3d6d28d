"""The paper's synthetic sparse regression, solved by IHT and I-OBS.

Setting (Wu et al. 2024, section 4): A has iid N(0, 1/n) entries, x* has k* = 16 nonzero
N(0, 1) entries, y = A x*, loss = mean squared error, n = 256, d = 128, training
sparsity k = 64. Prints, per solver, the iterations ``run`` used and the first iteration
at which ||x_t - x*|| / ||x*|| < 1e-6, averaged over a few random instances that are
solved in one vmapped, jitted batch.

    python examples/paper_synthetic.py [--trials 5] [--seed 0]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from iobs_jax.problems import mse_loss, sparse_linear_regression

import iobs_jax as ij

jax.config.update("jax_enable_x64", True)  # relative error 1e-6 is a float64 target


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="random instances (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    opts = parser.parse_args()

    n, d, k_star, k, tol = 256, 128, 16, 64, 1e-6
    keys = jax.random.split(jax.random.key(opts.seed), opts.trials)
    probs = jax.vmap(functools.partial(sparse_linear_regression, n=n, d=d, k=k_star))(keys)
    x0 = jnp.zeros(d)

    solvers = {
        "k-IHT (step 1/L)": (ij.IHT(mse_loss, k, maxiter=3000, tol=1e-12), 1500),
        "NIHT": (ij.IHT(mse_loss, k, variant="niht", maxiter=3000, tol=1e-12), 500),
        "Topk-I-OBS (exact Hessian)": (ij.IOBS(mse_loss, k, tol=1e-12), 10),
    }
    print(f"n={n} d={d} k*={k_star} k={k}, {opts.trials} instances, tolerance {tol:g}\n")
    header = ("solver", "run: iterations", "iterations to tol", "final error")
    print(f"{header[0]:28s} {header[1]:>16s} {header[2]:>18s} {header[3]:>12s}")
    for name, (solver, steps) in solvers.items():
        batched_run = jax.jit(jax.vmap(solver.run, in_axes=(None, 0, 0)))
        x, state = batched_run(x0, probs.design, probs.observations)
        traj = jax.jit(jax.vmap(functools.partial(ij.trajectory, solver, num_steps=steps),
                                in_axes=(None, 0, 0)))
        xs, _ = traj(x0, probs.design, probs.observations)
        errs = jnp.linalg.norm(xs - probs.x_true[:, None], axis=-1) / jnp.linalg.norm(
            probs.x_true, axis=-1, keepdims=True
        )
        reached = np.asarray(errs < tol)
        first = np.where(reached.any(1), reached.argmax(1) + 1, np.nan)
        final = jnp.linalg.norm(x - probs.x_true, axis=1) / jnp.linalg.norm(probs.x_true, axis=1)
        print(f"{name:28s} {float(jnp.mean(state.iter_num)):16.1f} {np.nanmean(first):18.1f} "
              f"{float(jnp.max(final)):12.2e}")


if __name__ == "__main__":
    main()
