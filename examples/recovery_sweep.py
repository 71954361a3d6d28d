"""A small compressed-sensing phase transition: HTP, Topk-I-OBS and OBSPursuit side by side.

Every (n, k*) cell solves ``--trials`` random noiseless Gaussian instances (d = 128) in one
compiled, vmapped program; the same key gives every solver the same instances. Prints the
success-rate table and writes results.csv / results.json and phase.png into ``--out``.
Takes about 8 minutes on 2 CPU cores (36 cells); ``--quick`` (4 cells, 10 trials) about
a minute. A progress bar on stderr counts the cells.

    OPENBLAS_NUM_THREADS=1 python examples/recovery_sweep.py [--quick] [--trials 50]
"""

import argparse

import jax

from iobs_jax import sweep as sw
from iobs_jax.core.progress import sweep_progress

jax.config.update("jax_enable_x64", True)  # success = relative error < 1e-3 on float64 fits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="instances per cell")
    parser.add_argument("--out", default="results/recovery_sweep", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="2 x 2 cells, 10 trials (about a minute)")
    opts = parser.parse_args()

    methods = ["htp", "topk-iobs", "obs-pursuit"]
    ns, ks = ([32, 64], [4, 12]) if opts.quick else ([32, 48, 64], [4, 8, 12, 16])
    trials = 10 if opts.quick else opts.trials
    report, bar = sweep_progress(True)
    with bar:
        res = sw.sweep(methods, d=128, n=ns, k=ks, trials=trials, key=jax.random.key(0),
                       progress=report)
    rate = {(r["method"], r["n"], r["k"]): r["success_rate"] for r in res.rows}
    print("success rate (%), d = 128, noiseless Gaussian design")
    print(f"{'method':>12} " + " ".join(f"n={n:<3}k={k:<3}" for n in ns for k in ks))
    for m in methods:
        print(f"{m:>12} " + " ".join(f"{100 * rate[m, n, k]:>9.0f}" for n in ns for k in ks))
    csv_path, json_path = res.save(opts.out)
    print(f"wrote {csv_path} and {json_path}")
    print(f"wrote {sw.plot_phase_transition(res.rows, f'{opts.out}/phase.png')}")


if __name__ == "__main__":
    main()
