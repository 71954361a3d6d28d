"""Sparse training on MNIST with iobs_jax.optax: GMP, the OBS projection, STE, SET, RigL.

    python examples/sparse_training_mnist.py                       # MLP, 90%, 3 seeds
    python examples/sparse_training_mnist.py --quick               # 1 seed, 3 epochs
    python examples/sparse_training_mnist.py --model cnn --sparsity 0.95 --methods gmp,rigl

Data: the 10,000 MNIST test images shipped with the package (``--data`` for others); the
first 8,000 train, the other 2,000 test. Every method gets the same budget (``--epochs``
of batch 128, AdamW lr 1e-3, the same initialisation and batch order per seed) and ends
with the same fraction of zeros in the kernels (biases stay dense). One epoch is one
jitted ``lax.scan`` of train steps. The methods, all ``optax.adamw(1e-3)`` underneath:

- ``dense``: AdamW alone.
- ``gmp``: gradual magnitude pruning (Zhu & Gupta), ``chain(adamw, hard_threshold(cubic,
  update_every=F))``: the cubic schedule from epoch 1 to 70% of training, the mask
  recomputed every ``F`` = a quarter epoch and held in between.
- ``obs-fisher``: ``chain(adamw, obs_projection(cubic, "fisher", update_every=F))``: the
  same schedule, the mask by OBS saliency under the empirical Fisher of 32 per-example
  gradients of the batch (``per_example_grads=``, passed as a function so that it is
  run only where it is used), the kept weights corrected by the OBS formula at every
  update.
- ``obs-fisher-masks``: ``obs-fisher`` with ``compensate="mask_updates"``: the OBS
  correction (and the Fisher) only when the mask is recomputed, the pruned coordinates
  zeroed in between.
- ``obs-diagonal``: the same with the running diagonal estimate (no extra arguments).
- ``ste``: straight-through magnitude pruning with the cubic schedule: dense weights, a
  masked forward pass (``masked_params``), the mask recomputed every step; after the last
  update the model is evaluated masked.
- ``set``/``rigl``: SET and RigL wrapping AdamW at the final sparsity from the first step
  (random ERK topology), connectivity updated every half epoch until 75% of training,
  drop fraction 0.3 (RigL: cosine-decayed).

Also available with ``--methods``: ``iht`` (AdamW + ``hard_threshold(s)`` from the first
step) and ``iobs`` (``iobs(1e-3, cubic, curvature="diagonal", damping=1e-3)``, I-OBS with
its own diagonal Newton-like step, no AdamW).
Results: ``docs/sparse_training.md`` (written by ``benchmarks/sparse_training.py``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import iobs_jax.optax as iox
from iobs_jax import mnist

BATCH = 128
LR = 1e-3
FISHER_EXAMPLES = 32
METHODS = ("dense", "gmp", "obs-fisher", "obs-fisher-masks", "obs-diagonal", "ste", "set",
           "rigl")
# IHT at the final sparsity and I-OBS (diagonal, its own Newton-like step).
EXTRA = ("iht", "iobs")


def build(method, sparsity, steps_per_epoch, total_steps, seed):
    """``(transformation, needs per-example gradients, needs a masked forward)``."""
    adamw = optax.adamw(LR)
    freq = max(1, steps_per_epoch // 4)
    cubic = iox.cubic_sparsity_schedule(sparsity, steps_per_epoch,
                                        max(steps_per_epoch + 1, int(0.7 * total_steps)),
                                        frequency=freq)
    dynamic = dict(key=jax.random.key(1000 + seed), update_every=max(1, steps_per_epoch // 2),
                   end_step=int(0.75 * total_steps), distribution="erk")
    if method == "dense":
        return adamw, False, False
    if method == "gmp":
        return optax.chain(adamw, iox.hard_threshold(cubic, update_every=freq)), False, False
    if method in ("obs-fisher", "obs-diagonal", "obs-fisher-masks"):
        curvature = method.split("-")[1]
        when = "mask_updates" if method.endswith("-masks") else "every_update"
        return optax.chain(adamw, iox.obs_projection(cubic, curvature, update_every=freq,
                                                     compensate=when)), \
            curvature == "fisher", False
    if method == "ste":
        return optax.chain(adamw, iox.ste(cubic)), False, True
    if method == "set":
        return iox.sparse_evolutionary(adamw, sparsity, **dynamic), False, False
    if method == "iht":
        return optax.chain(adamw, iox.hard_threshold(sparsity)), False, False
    if method == "iobs":
        return iox.iobs(1e-3, cubic, curvature="diagonal", damping=1e-3), False, False
    if method == "rigl":
        return iox.rigl(adamw, sparsity, **dynamic), False, False
    raise ValueError(f"unknown method {method!r}; choose from "
                     f"{', '.join(METHODS + EXTRA)}.")


def make_epoch(model, tx, n, needs_pe, masked_forward):
    """One jitted epoch: a ``lax.scan`` of train steps over a random permutation."""
    nb = n // BATCH

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(params, opt_state, images, labels, key):
        batches = jax.random.permutation(key, n)[: nb * BATCH].reshape(nb, BATCH)

        def step(carry, idx):
            p, s = carry
            x, y = images[idx], labels[idx]
            seen = iox.masked_params(p, s) if masked_forward else p
            extra = {}
            if needs_pe:
                one = lambda q, xi, yi: loss(q, xi[None], yi[None])
                # A function: obs_projection runs it only where it uses the Fisher
                # (every update, or only at mask updates with compensate="mask_updates").
                extra["per_example_grads"] = lambda: jax.vmap(jax.grad(one), (None, 0, 0))(
                    p, x[:FISHER_EXAMPLES], y[:FISHER_EXAMPLES])
            updates, s = tx.update(jax.grad(loss)(seen, x, y), s, p, **extra)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, opt_state), batches)[0]

    return epoch


def kernel_sparsity(params):
    kernels = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
    return sum(int(jnp.sum(x == 0)) for x in kernels) / sum(x.size for x in kernels)


def run(model, method, sparsity, seed, epochs, train, test):
    """Train one method from one seed; returns accuracy (%), sparsity, wall seconds."""
    n = len(train.labels)
    spe = n // BATCH
    tx, needs_pe, masked_forward = build(method, sparsity, spe, spe * epochs, seed)
    epoch = make_epoch(model, tx, n, needs_pe, masked_forward)
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    params = model.init(init_key, images[:1])["params"]
    state = tx.init(params)
    start = time.perf_counter()
    for k in jax.random.split(shuffle_key, epochs):
        params, state = epoch(params, state, images, labels, k)
    jax.block_until_ready(params)
    wall = time.perf_counter() - start
    final = iox.masked_params(params, state) if masked_forward else params
    acc = 100 * mnist.accuracy(model, final, test.images, test.labels)
    return {"accuracy": acc, "sparsity": kernel_sparsity(final), "wall_s": wall}


def load(data=None):
    full = mnist.load_mnist(data)
    return mnist.split_train_test(full, min(8000, len(full.labels) - 500))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MNIST idx folder (default: packaged)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = "0", 3
    train, test = load(args.data)
    model = mnist.MLP() if args.model == "mlp" else mnist.CNN()
    print(f"{args.model}, {args.sparsity:.0%} kernel sparsity, {args.epochs} epochs, "
          f"train {len(train.labels)}, test {len(test.labels)}")
    print(f"{'method':<14} {'test acc (%)':>15} {'zeros':>7} {'s/seed':>7}")
    for method in args.methods.split(","):
        runs = [run(model, method, args.sparsity, int(s), args.epochs, train, test)
                for s in args.seeds.split(",")]
        acc = [r["accuracy"] for r in runs]
        print(f"{method:<14} {np.mean(acc):8.2f} ± {np.std(acc):4.2f} "
              f"{np.mean([r['sparsity'] for r in runs]):7.3f} "
              f"{np.mean([r['wall_s'] for r in runs]):7.1f}", flush=True)


if __name__ == "__main__":
    main()
