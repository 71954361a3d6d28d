"""Run every sparse-training transform on parameters sharded over 4 forced host devices
and on one device; print one JSON line with the differences, the compiled train step's
memory per device and the largest 1-D buffer in its (per-device) program.

Run by tests/test_sharding.py in a subprocess (the device count is fixed at JAX start):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_sharded_check.py
"""

import json
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from iobs_jax import optax as iox  # noqa: E402

SIZES = [(64, 32), (32, 16), (16, 8)]
STEPS = 3


def problem():
    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]),
                                              jnp.float32),
                        "bias": jnp.asarray(0.1 * rng.standard_normal(s[1]), jnp.float32)}
              for i, s in enumerate(SIZES)}
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 8, 32), jnp.int32)

    def loss(p, xb=x, yb=y):
        h = xb
        for i in range(len(SIZES)):
            h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            h = jnp.tanh(h) if i < len(SIZES) - 1 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

    one = lambda p, xi, yi: loss(p, xi[None], yi[None])
    per_example = lambda p: jax.vmap(jax.grad(one), (None, 0, 0))(p, x[:8], y[:8])
    return params, loss, per_example


def transforms():
    key = jax.random.key(0)
    sched = iox.cubic_sparsity_schedule(0.8, 0, 2, initial_sparsity=0.5)
    adamw = optax.adamw(1e-2)
    return {
        "hard_threshold": optax.chain(adamw, iox.hard_threshold(sched)),
        "hard_threshold-erk-4x4": optax.chain(adamw, iox.hard_threshold(
            0.75, distribution="erk", pattern="4x4")),
        "hard_threshold-2:4": optax.chain(adamw, iox.hard_threshold(0.5, pattern="2:4")),
        "obs-fisher": optax.chain(adamw, iox.obs_projection(sched, "fisher")),
        "obs-fisher-masks": optax.chain(adamw, iox.obs_projection(
            sched, "fisher", update_every=2, compensate="mask_updates")),
        "obs-hvp": optax.chain(adamw, iox.obs_projection(0.75, "hvp", cg_maxiter=8)),
        "obs-diagonal": optax.chain(adamw, iox.obs_projection(sched, "diagonal")),
        "ste": optax.chain(adamw, iox.ste(sched, distribution="uniform")),
        "rigl": iox.rigl(adamw, 0.75, key=key, end_step=10, update_every=2),
        "set-channel": iox.sparse_evolutionary(adamw, 0.5, key=key, update_every=2,
                                               pattern="channel", distribution="uniform"),
        "iobs-fisher": iox.iobs(0.1, sched, curvature="fisher", damping=1e-2),
        "iobs-diagonal": iox.iobs(1e-2, 0.75, curvature="diagonal"),
    }


def run(tx, params, loss, per_example):
    """Three jitted train steps; returns the params, the state and the compiled step
    (its memory analysis and per-device program)."""
    state = tx.init(params)

    def step(p, s):
        g = jax.grad(loss)(iox.masked_params(p, s))
        u, s = tx.update(g, s, p, per_example_grads=per_example(p), loss_fn=loss)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step)
    for _ in range(STEPS):
        last = params, state
        params, state = jitted(*last)
    # The executable of the last call (jit's caches make this a lookup, not a compile).
    return params, state, jitted.lower(*last).compile()


def _masks(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "masks"))
             if hasattr(s, "masks")]
    return found[0].masks


def largest_vector(hlo: str) -> int:
    """The longest 1-D array (any dtype) in a compiled (per-device) HLO module."""
    sizes = [int(n) for n in re.findall(r"\b(?:f|s|u|pred|bf)\d*\[(\d+)\]", hlo)]
    return max(sizes, default=0)


def main():
    # Auto axes: shardings are propagated by the compiler (GSPMD), the usual jit setup.
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    params, loss, per_example = problem()
    total = ravel_pytree(params)[0].size
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.ndim == 2 else P()))
    one = jax.devices()[0]
    sharded = jax.tree.map(shard, params)
    single = jax.tree.map(lambda x: jax.device_put(x, one), params)
    out = {"devices": jax.device_count(), "total_params": int(total), "transforms": {}}
    for name, tx in transforms().items():
        p1, s1, c1 = run(tx, single, loss, per_example)
        p4, s4, c4 = run(tx, sharded, loss, per_example)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True))
        masks_equal = all(np.array_equal(a, b) for a, b in
                          zip(jax.tree.leaves(_masks(s1)), jax.tree.leaves(_masks(s4)),
                              strict=True))
        kernel_sharded = len(p4["l0"]["kernel"].sharding.device_set) == 4
        m4, m1 = c4.memory_analysis(), c1.memory_analysis()
        out["transforms"][name] = {
            "max_abs_diff": diff, "masks_equal": masks_equal, "kernel_sharded": kernel_sharded,
            "largest_vector_sharded": largest_vector(c4.as_text()),
            "bytes_per_device_sharded": {k: int(getattr(m4, k + "_size_in_bytes"))
                                         for k in ("argument", "output", "temp")},
            "bytes_one_device": {k: int(getattr(m1, k + "_size_in_bytes"))
                                 for k in ("argument", "output", "temp")},
        }
    # A control: raveling the sharded params makes the full vector on a device.
    control = jax.jit(lambda p: ravel_pytree(p)[0] * 2.0).lower(sharded).compile()
    out["control_largest_vector"] = largest_vector(control.as_text())
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
