"""Sparse training transforms: obs_projection, STE, SET, RigL, sparsify, patterns,
distributions and the threshold top-k (iobs_jax.optax)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from iobs_jax import optax as iox
from iobs_jax.core.masks import topk_leaves

# ------------------------------------------------------------------ a small problem


def _problem(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), dtype),
                        "bias": jnp.asarray(0.1 * rng.standard_normal(4), dtype)},
              "out": {"kernel": jnp.asarray(rng.standard_normal((4, 4)), dtype)}}
    x = jnp.asarray(rng.standard_normal((16, 8)), dtype)
    y = jnp.asarray(rng.standard_normal((16, 4)), dtype)

    def loss(p, xb=x, yb=y):
        h = jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] - yb) ** 2)

    per_example = jax.vmap(jax.grad(lambda p, xi, yi: loss(p, xi[None], yi[None])),
                           (None, 0, 0))
    return params, loss, lambda p: per_example(p, x, y)


SHAPES = [(8, 4), (4, 4)]  # the kernels, in tree order


def _kernels(tree):
    return [np.asarray(tree[k]["kernel"]) for k in ("dense", "out")]


def np_erk(s, shapes):
    """Erdos-Renyi-Kernel densities by the fixed-point rule, in float64 NumPy."""
    n = np.array([np.prod(sh) for sh in shapes], float)
    raw = np.array([np.sum(sh) / np.prod(sh) for sh in shapes], float)
    dense = np.zeros(len(shapes), bool)
    while True:
        eps = ((1 - s) * n.sum() - n[dense].sum()) / (raw * n)[~dense].sum()
        grow = ~dense & (eps * raw > 1)
        if not grow.any():
            return np.where(dense, 1.0, eps * raw)
        dense |= grow


def expected_kept(s, pattern, distribution):
    """Kept weights per kernel under the one rounding rule (G - round(s G) groups)."""
    group = {"none": 1, "2x2": 4, "2:4": None, "channel": None}[pattern]
    if pattern == "2:4":
        return [np.prod(sh) // 2 for sh in SHAPES]
    if pattern == "channel":
        sizes = [sh[-1] for sh in SHAPES]
        return [(g - round(s * g)) * sh[0] for g, sh in zip(sizes, SHAPES, strict=True)]
    groups = [np.prod(sh) // group for sh in SHAPES]
    if distribution == "global":
        total = sum(groups)
        return [(total - round(s * total)) * group]  # one number: the total
    dens = np_erk(s, SHAPES) if distribution == "erk" else np.full(2, 1 - s)
    return [(g - round((1 - d) * g)) * group for g, d in zip(groups, dens, strict=True)]


# ------------------------------------------------------------------ the threshold top-k


def test_threshold_topk_equals_stable_sort_on_ties_infinities_and_nan():
    rng = np.random.default_rng(1)
    f = jax.jit(topk_leaves)  # k is traced: one compilation per shape set
    shape_sets = [[(3, 4)], [(2, 3), (1,), (4, 2)]]
    for trial in range(48):
        shapes, kind = shape_sets[trial % 2], (trial // 2) % 3
        leaves = []
        for sh in shapes:
            if kind == 0:
                x = rng.integers(-2, 3, size=sh).astype(float)  # many ties
            elif kind == 1:
                x = rng.choice([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0], size=sh)
            else:
                x = rng.standard_normal(sh)
            leaves.append(jnp.asarray(x, jnp.float64 if trial >= 42 else jnp.float32))
        flat = np.concatenate([np.asarray(v, float).ravel() for v in leaves])
        k = int(rng.integers(0, flat.size + 1))
        ref = np.zeros(flat.size, bool)
        ref[np.argsort(-np.where(np.isnan(flat), -np.inf, flat), kind="stable")[:k]] = True
        got = np.concatenate([np.asarray(m).ravel() for m in f(leaves, k)])
        np.testing.assert_array_equal(got, ref, err_msg=f"trial {trial}, k {k}")


# ------------------------------------------------------------------ counts after every update

OPTIMIZERS = [
    lambda: optax.adamw(1e-2, weight_decay=1e-3),
    lambda: optax.sgd(0.05, momentum=0.9),
    lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1)),
]
SCHEDULE = iox.cubic_sparsity_schedule(0.75, 1, 4, initial_sparsity=0.25)
KEY = jax.random.key(3)

# (name, pattern, distribution): every transform with every pattern it supports, the
# optimizer cycling so that each transform follows adamw, sgd+momentum and clipping.
CASES = [(t, p, d) for t in ("hard_threshold", "obs-fisher", "obs-hvp", "obs-diagonal", "ste")
         for p, d in (("none", "global"), ("2:4", "global"), ("2x2", "erk"),
                      ("channel", "uniform"))] + \
        [(t, p, d) for t in ("rigl", "set") for p, d in
         (("none", "erk"), ("2x2", "uniform"), ("channel", "uniform"))]


def _make(name, pattern, distribution, inner):
    pat = None if pattern == "none" else pattern
    s = 0.5 if pattern == "2:4" else SCHEDULE
    kw = dict(pattern=pat, distribution=distribution)
    if name == "hard_threshold":
        return optax.chain(inner, iox.hard_threshold(s, **kw))
    if name.startswith("obs-"):
        return optax.chain(inner, iox.obs_projection(s, name[4:], **kw))
    if name == "ste":
        return optax.chain(inner, iox.ste(s, **kw))
    if name == "rigl":
        return iox.rigl(inner, 0.75, key=KEY, end_step=6, update_every=2, **kw)
    return iox.sparse_evolutionary(inner, 0.75, key=KEY, update_every=2, **kw)


def _find_masks(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "masks"))
             if hasattr(s, "masks")]
    return found[0].masks


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{t}-{p}-{d}" for t, p, d in CASES])
def test_exactly_the_scheduled_nonzeros_after_every_update(case):
    name, pattern, distribution = CASES[case]
    params, loss, per_example = _problem()
    tx = _make(name, pattern, distribution, OPTIMIZERS[case % 3]())
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(iox.masked_params(p, s))
        u, s = tx.update(g, s, p, per_example_grads=per_example(p), loss_fn=loss)
        return optax.apply_updates(p, u), s

    for t in range(6):
        params, state = step(params, state)
        masks = _kernels(_find_masks(state))
        seen = _kernels(iox.masked_params(params, state))  # STE: the masked forward
        s = 0.5 if pattern == "2:4" else (0.75 if name in ("rigl", "set") else
                                          float(SCHEDULE(t)))
        want = expected_kept(s, pattern, distribution)
        kept = [int(m.sum()) for m in masks]
        assert (sum(kept) if len(want) == 1 else kept) == (want[0] if len(want) == 1
                                                            else want), (t, kept, want)
        assert all(np.all(v[~m] == 0) for v, m in zip(seen, masks, strict=True))
        nonzero = sum(int((v != 0).sum()) for v in seen)
        if name in ("rigl", "set"):
            # Regrown weights start at exactly zero, so right after a connectivity
            # update fewer than the mask's count may be nonzero.
            assert nonzero <= sum(kept)
        else:
            assert nonzero == sum(kept), (t, nonzero, kept)
        if pattern == "2:4":
            groups = (masks[0] != 0).T.reshape(4, 2, 4).sum(-1)
            assert np.all(groups == 2)
        if pattern == "2x2":
            tiles = masks[0].reshape(4, 2, 2, 2).transpose(0, 2, 1, 3).reshape(8, 4)
            assert np.all((tiles.sum(1) == 0) | (tiles.sum(1) == 4))
        if pattern == "channel":
            per_col = masks[0].sum(0)
            assert np.all((per_col == 0) | (per_col == 8))
    assert np.isfinite(float(loss(iox.masked_params(params, state))))


# ------------------------------------------------------------------ OBS projection oracles


def _reference_projection(theta, curv, keep_scores, kernel_slots, keep):
    """Dense float64 OBS projection: keep the ``keep`` best kernel entries by
    ``keep_scores`` (biases always kept), then theta - G[:, P] G_PP^-1 theta_P."""
    mask = np.ones(theta.size, bool)
    order = kernel_slots[np.argsort(-keep_scores[kernel_slots], kind="stable")]
    mask[order[keep:]] = False
    g = np.linalg.inv(curv)
    p = ~mask
    out = theta - g[:, p] @ np.linalg.solve(g[np.ix_(p, p)], theta[p])
    return np.where(mask, out, 0.0), mask


@pytest.fixture(scope="module")
def f64_problem():
    params, loss, per_example = _problem(jnp.float64, seed=4)
    flat, unravel = ravel_pytree(params)
    is_kernel = ravel_pytree({"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
                              "out": {"kernel": jnp.ones((4, 4))}})[0] > 0
    return params, loss, per_example, flat, unravel, np.flatnonzero(np.asarray(is_kernel))


def _one_step(tx, params, loss, **extra):
    grads = jax.grad(loss)(params)
    fn = extra.pop("loss_fn", None)
    kw = {} if fn is None else {"loss_fn": fn}
    # jit: eagerly, the loops of the top-k and of CG would compile op by op
    update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e, **kw))
    updates, state = update(grads, tx.init(params), params, extra)
    return ravel_pytree(optax.apply_updates(params, updates))[0], grads, state


def test_obs_projection_fisher_equals_dense_reference(f64_problem):
    params, loss, per_example, flat, _, slots = f64_problem
    tx = optax.chain(optax.sgd(0.3), iox.obs_projection(0.75, "fisher", damping=0.05))
    pe = per_example(params)
    got, grads, _ = _one_step(tx, params, loss, per_example_grads=pe)
    theta = np.asarray(flat) - 0.3 * np.asarray(ravel_pytree(grads)[0])
    rows = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(pe))
    fisher = rows.T @ rows / rows.shape[0]
    curv = fisher + 0.05 * np.trace(fisher) / flat.size * np.eye(flat.size)
    sal = theta**2 / np.diag(np.linalg.inv(curv))
    want, mask = _reference_projection(theta, curv, sal, slots, 12)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-10, rtol=1e-9)
    assert np.all(np.asarray(got)[~mask] == 0)


def test_obs_projection_hvp_equals_dense_reference():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((6, 4))), "b": jnp.zeros(4)}
    x, y = jnp.asarray(rng.standard_normal((30, 6))), jnp.asarray(rng.standard_normal((30, 4)))
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)  # PSD Hessian
    tx = optax.chain(optax.sgd(0.1), iox.obs_projection(
        0.5, "hvp", damping=0.1, damping_mode="absolute", cg_tol=1e-13, cg_maxiter=200))
    got, grads, _ = _one_step(tx, params, loss, loss_fn=loss)
    flat, unravel = ravel_pytree(params)
    theta = np.asarray(flat) - 0.1 * np.asarray(ravel_pytree(grads)[0])
    hess = np.asarray(jax.hessian(lambda z: loss(unravel(z)))(flat)) + 0.1 * np.eye(28)
    slots = np.arange(4, 28)  # ravel order: "b" then "w"
    want, _ = _reference_projection(theta, hess, np.abs(theta), slots, 12)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-9, rtol=1e-8)


def test_obs_projection_diagonal_equals_dense_reference_over_two_steps(f64_problem):
    params, loss, _, flat, _, slots = f64_problem
    tx = optax.chain(optax.sgd(0.2), iox.obs_projection(0.5, "diagonal", decay=0.9,
                                                        damping=0.1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    ema, p = np.zeros(flat.size), params
    for t in (1, 2):
        grads = jax.grad(loss)(p)
        u = -0.2 * np.asarray(ravel_pytree(grads)[0])
        theta = np.asarray(ravel_pytree(p)[0]) + u
        ema = 0.9 * ema + 0.1 * u**2
        v = ema / (1 - 0.9**t)
        curv = np.diag(v + 0.1 * v.mean())
        want, _ = _reference_projection(theta, curv, theta**2 * np.diag(curv), slots, 24)
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(np.asarray(ravel_pytree(p)[0]), want, atol=1e-12)


def test_obs_projection_compensates_only_at_mask_updates_when_asked(f64_problem):
    # update_every=2: step 0 recomputes the mask (full OBS projection, as by default),
    # step 1 holds it and only zeroes the pruned coordinates of the candidate.
    params, loss, per_example, *_ = f64_problem
    make = lambda c: optax.chain(optax.sgd(0.3), iox.obs_projection(
        0.75, "fisher", damping=0.05, update_every=2, compensate=c))
    runs = {}
    for c in ("every_update", "mask_updates"):
        tx, p = make(c), params
        state, update, flats = tx.init(params), jax.jit(tx.update), []
        for _ in range(2):
            grads = jax.grad(loss)(p)
            candidate = np.asarray(ravel_pytree(p)[0]) - 0.3 * np.asarray(
                ravel_pytree(grads)[0])
            updates, state = update(grads, state, p, per_example_grads=per_example(p))
            p = optax.apply_updates(p, updates)
            flats.append((candidate, np.asarray(ravel_pytree(p)[0])))
        runs[c] = flats
    (_, every0), (_, every1) = runs["every_update"]
    (_, mask0), (cand1, mask1) = runs["mask_updates"]
    np.testing.assert_allclose(mask0, every0, rtol=1e-12, atol=1e-14)  # a mask update
    kept = mask0 != 0
    np.testing.assert_allclose(mask1, np.where(kept, cand1, 0.0), rtol=1e-12, atol=1e-14)
    assert not np.allclose(every1[kept], cand1[kept])  # the default corrects them


def test_obs_projection_calls_a_per_example_function_only_where_the_curvature_is_used(
        f64_problem):
    # A function for per_example_grads= gives the array's result; with
    # compensate="mask_updates" it is not evaluated between mask updates (a NaN there
    # would be counted as a skipped step), with the default it is, every update.
    params, loss, per_example, *_ = f64_problem
    grads = jax.grad(loss)(params)
    poison = lambda: jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), per_example(params))
    for when, skipped in (("mask_updates", 0), ("every_update", 1)):
        tx = optax.chain(optax.sgd(0.3), iox.obs_projection(
            0.75, "fisher", damping=0.05, update_every=2, compensate=when))
        update = jax.jit(lambda g, s, p, f, tx=tx: tx.update(g, s, p, per_example_grads=f),
                         static_argnums=3)
        state = tx.init(params)
        by_array, _ = jax.jit(tx.update)(grads, state, params,
                                         per_example_grads=per_example(params))
        by_function, state = update(grads, state, params, lambda: per_example(params))
        for a, b in zip(jax.tree.leaves(by_array), jax.tree.leaves(by_function),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14)
        p = optax.apply_updates(params, by_function)
        _, state = update(jax.grad(loss)(p), state, p, poison)  # step 1: no mask update
        assert int(state[1].skipped) == skipped, when


def test_obs_projection_evaluates_loss_fn_only_at_mask_updates_when_asked(f64_problem):
    params, loss, *_ = f64_problem
    nan_loss = lambda p: loss(p) * jnp.nan
    for when, skipped in (("mask_updates", 0), ("every_update", 1)):
        tx = optax.chain(optax.sgd(0.1), iox.obs_projection(
            0.5, "hvp", damping=0.1, update_every=2, compensate=when))
        state, p = tx.init(params), params
        for fn in (loss, nan_loss):  # step 0 updates the mask, step 1 holds it
            updates, state = jax.jit(lambda g, s, q, fn=fn, tx=tx: tx.update(
                g, s, q, loss_fn=fn))(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        assert int(state[1].skipped) == skipped, when


def test_obs_projection_default_is_the_diagonal_curvature_with_no_extra_arguments(
        f64_problem):
    params, loss, *_ = f64_problem
    grads = jax.grad(loss)(params)

    def first_update(last):
        tx = optax.chain(optax.adamw(0.1), last)
        return jax.tree.leaves(tx.update(grads, tx.init(params), params)[0])

    default, diagonal = (first_update(iox.obs_projection(0.5)),
                         first_update(iox.obs_projection(0.5, "diagonal")))
    for a, b in zip(default, diagonal, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_obs_projection_mask_updates_with_a_bad_schedule_value_only_hold_the_masks(
        f64_problem):
    # At a due step whose schedule value is unusable the masks are kept, nothing is newly
    # removed, so nothing is OBS-corrected and the Fisher is not run (a NaN one would be
    # counted as skipped); the bad value is counted.
    params, loss, per_example, *_ = f64_problem
    sched = lambda count: jnp.where(count >= 2, jnp.nan, 0.75)
    tx = optax.chain(optax.sgd(0.3), iox.obs_projection(
        sched, "fisher", damping=0.05, update_every=2, compensate="mask_updates"))
    state, p = tx.init(params), params
    nan_rows = lambda: jax.tree.map(lambda g: g * jnp.nan, per_example(params))
    for step in range(3):
        grads = jax.grad(loss)(p)
        fn = nan_rows if step == 2 else (lambda q=p: per_example(q))
        held = state[1].masks
        updates, state = jax.jit(lambda g, s, q, fn=fn: tx.update(
            g, s, q, per_example_grads=fn))(grads, state, p)
        candidate = optax.apply_updates(p, jax.tree.map(lambda g: -0.3 * g, grads))
        p = optax.apply_updates(p, updates)
    assert int(state[1].bad_sparsity) == 1 and int(state[1].skipped) == 0
    for got, c, m in zip(jax.tree.leaves(p), jax.tree.leaves(candidate),
                         jax.tree.leaves(held), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.where(m, c, 0.0), rtol=1e-12)


def test_obs_projection_takes_an_equinox_module_of_per_example_grads_as_data():
    # vmap(grad) of an Equinox model gives a callable pytree: data, not a function.
    import equinox as eqx

    mlp = eqx.nn.MLP(6, 3, 8, 1, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (5, 6))
    loss = lambda p, xb: jnp.mean(jax.vmap(eqx.combine(p, static))(xb) ** 2)
    per_example = jax.vmap(lambda xi: jax.grad(loss)(params, xi[None]))(x)
    assert callable(per_example)  # the case being tested
    tx = optax.chain(optax.sgd(0.1), iox.obs_projection(0.5, "fisher"))
    grads = jax.grad(loss)(params, x)
    by_module, _ = tx.update(grads, tx.init(params), params, per_example_grads=per_example)
    as_function, _ = tx.update(grads, tx.init(params), params,
                               per_example_grads=lambda: per_example)
    for a, b in zip(jax.tree.leaves(by_module), jax.tree.leaves(as_function), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_obs_projection_runs_a_per_example_function_at_the_callers_precision(f64_problem):
    # The projection runs at "highest" matmul precision; the user's model must not.
    params, loss, per_example, *_ = f64_problem
    tx = optax.chain(optax.sgd(0.3), iox.obs_projection(0.75, "fisher"))
    seen = []

    def rows():
        seen.append(jax.config.jax_default_matmul_precision)
        return per_example(params)

    for precision in (None, "bfloat16"):
        with jax.default_matmul_precision(precision):
            tx.update(jax.grad(loss)(params), tx.init(params), params,
                      per_example_grads=rows)
    assert seen == [None, "bfloat16"]


def test_obs_projection_guards_a_nan_step_and_counts_it(f64_problem):
    params, loss, per_example, *_ = f64_problem
    tx = optax.chain(optax.sgd(0.1), iox.obs_projection(0.5, "fisher"))
    state = tx.init(params)
    pe = per_example(params)
    pe["out"]["kernel"] = pe["out"]["kernel"].at[0, 0, 0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params,
                                        per_example_grads=pe)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(state[1].skipped) == 1 and int(state[1].count) == 1


# ------------------------------------------------------------------ RigL and SET


def _np_rewire(mask, weight, grow_score, fraction):
    """One leaf's drop-and-grow by the papers' rule, in NumPy (float32 fraction)."""
    m, w, g = mask.ravel(), np.abs(weight).ravel(), grow_score.ravel()
    k = int(m.sum())
    n = int(np.float32(fraction) * np.float32(k))
    drop_order = np.argsort(-np.where(m, w, -np.inf), kind="stable")
    remain = np.zeros(m.size, bool)
    remain[drop_order[: k - n]] = True
    grow_order = np.argsort(-np.where(remain, -np.inf, g), kind="stable")
    grown = np.zeros(m.size, bool)
    grown[grow_order[:n]] = True
    return (remain | grown).reshape(mask.shape), n


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_drop_and_grow_follow_the_schedule_and_reset_moments(method):
    params, loss, _ = _problem(seed=2)
    inner = optax.adam(1e-2)
    common = dict(key=KEY, update_every=3, distribution="uniform")
    tx = iox.rigl(inner, 0.5, end_step=20, **common) if method == "rigl" else \
        iox.sparse_evolutionary(inner, 0.5, **common)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for _ in range(3):  # three optimizer steps (counts 0, 1, 2)
        updates, state = step(params, state, jax.grad(loss)(params))
        params = optax.apply_updates(params, updates)
    # Moments everywhere, so that a missing reset would show.
    filled = optax.tree_utils.tree_map_params(inner, lambda v: v + 1.0, state.inner_state)
    state = state._replace(inner_state=filled)
    grads = jax.grad(loss)(params)
    updates, new_state = step(params, state, grads)  # count 3: a connectivity update
    new_params = optax.apply_updates(params, updates)
    fraction = 0.3 * 0.5 * (1 + np.cos(np.pi * 3 / 20)) if method == "rigl" else 0.3
    _, sub = jax.random.split(state.key)
    for i, k in ((1, "dense"), (2, "out")):  # leaf positions in tree order (bias first)
        old = np.asarray(state.masks[k]["kernel"])
        if method == "rigl":
            score = np.abs(np.asarray(grads[k]["kernel"]))
        else:
            score = np.asarray(jax.random.uniform(jax.random.fold_in(sub, i), old.shape))
        want, n = _np_rewire(old, np.asarray(params[k]["kernel"]), score, fraction)
        got = np.asarray(new_state.masks[k]["kernel"])
        np.testing.assert_array_equal(got, want)
        assert n >= 1 and got.sum() == old.sum()
        born = got & ~old
        assert (old & ~got).sum() == born.sum() <= n
        w = np.asarray(new_params[k]["kernel"])
        assert np.all(w[born] == 0) and np.all(w[~got] == 0)
        stay = got & ~born  # no optimizer step at a connectivity update
        np.testing.assert_array_equal(w[stay], np.asarray(params[k]["kernel"])[stay])
        adam = new_state.inner_state[0]
        for moment, before in ((adam.mu, filled[0].mu), (adam.nu, filled[0].nu)):
            mom, prev = np.asarray(moment[k]["kernel"]), np.asarray(before[k]["kernel"])
            assert np.all(mom[born] == 0)
            np.testing.assert_array_equal(mom[~born], prev[~born])
    assert int(new_state.inner_state[0].count) == int(filled[0].count)


def test_rigl_resets_momentum_of_sgd_inside_a_chain():
    params, loss, _ = _problem(seed=6)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    tx = iox.rigl(inner, 0.75, key=KEY, end_step=10, update_every=1, drop_fraction=0.5,
                  distribution="uniform")
    state = tx.init(params)
    state = state._replace(inner_state=optax.tree_utils.tree_map_params(
        inner, lambda v: v + 1.0, state.inner_state))
    state = state._replace(count=jnp.ones((), jnp.int32))
    _, new = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
    born = np.asarray(new.masks["dense"]["kernel"] & ~state.masks["dense"]["kernel"])
    trace = np.asarray(new.inner_state[1][0].trace["dense"]["kernel"])
    assert born.any() and np.all(trace[born] == 0) and np.all(trace[~born] == 1)


def test_rigl_cosine_drop_fraction_and_no_updates_after_end():
    params, loss, _ = _problem()
    tx = iox.rigl(optax.sgd(0.1), 0.5, key=KEY, end_step=4, update_every=2,
                  distribution="uniform")
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    masks = [state.masks]
    for _ in range(8):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        masks.append(state.masks)
    same = [all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks[t]),
                                                     jax.tree.leaves(masks[t + 1]), strict=True))
            for t in range(8)]
    assert same[4:] == [True] * 4  # count >= end_step: the topology is frozen
    assert not same[2]  # count 2 rewires (drop fraction 0.15 of 16 and 8)


def test_dynamic_sparse_skips_a_nan_gradient_and_keeps_its_state():
    params, loss, _ = _problem()
    tx = iox.sparse_evolutionary(optax.adam(1e-2), 0.5, key=KEY, update_every=1)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    grads["out"]["kernel"] = grads["out"]["kernel"].at[0, 0].set(jnp.nan)
    state = state._replace(count=jnp.ones((), jnp.int32))
    updates, new = jax.jit(tx.update)(grads, state, params)
    assert int(new.skipped) == 1
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, new.masks, state.masks)


# ------------------------------------------------------------------ STE, sparsify, misuse


def test_ste_keeps_dense_weights_and_passes_the_gradient_straight_through():
    params, loss, _ = _problem()
    tx = optax.chain(optax.sgd(0.1), iox.ste(0.75, refine=0.5))
    state = tx.init(params)
    masked = iox.masked_params(params, state)
    g_ste = jax.grad(lambda p: loss(iox.masked_params(p, state)))(params)
    g_dense = jax.grad(loss)(masked)  # the gradient at the masked point, everywhere
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_ste, g_dense)
    updates, new = jax.jit(tx.update)(g_ste, state, params)
    m = np.asarray(state[1].masks["dense"]["kernel"])
    u = np.asarray(updates["dense"]["kernel"])
    w = np.asarray(params["dense"]["kernel"])
    g = np.asarray(g_ste["dense"]["kernel"])
    np.testing.assert_allclose(u[m], -0.1 * g[m], rtol=1e-6)
    np.testing.assert_allclose(u[~m], -0.1 * g[~m] - 0.5 * w[~m], rtol=1e-5)  # SR-STE
    assert np.all(np.asarray(optax.apply_updates(params, updates)["dense"]["kernel"]) != 0)


@pytest.mark.parametrize("pattern,distribution", [
    ("none", "global"), ("none", "uniform"), ("none", "erk"), ("2:4", "global"),
    ("2x2", "global"), ("2x2", "erk"), ("channel", "uniform")])
def test_sparsify_one_shot_counts_and_largest_kept(pattern, distribution):
    params, _, _ = _problem(seed=7)
    sparse, masks = iox.sparsify(params, 0.75, pattern=None if pattern == "none" else
                                 pattern, distribution=distribution)
    want = expected_kept(0.75, pattern, distribution)
    kept = [int(m.sum()) for m in _kernels(masks)]
    assert (sum(kept) if len(want) == 1 else kept) == (want[0] if len(want) == 1 else want)
    assert np.all(np.asarray(masks["dense"]["bias"]))
    if (pattern, distribution) == ("none", "global"):
        w = np.concatenate([np.abs(k).ravel() for k in _kernels(params)])
        m = np.concatenate([k.ravel() for k in _kernels(masks)])
        assert w[m].min() > w[~m].max()
    for v, m in zip(_kernels(sparse), _kernels(masks), strict=True):
        assert np.all(v[~m] == 0) and np.all(v[m] != 0)


def test_erk_matches_numpy_and_makes_small_leaves_dense():
    shapes = [(784, 300), (300, 100), (100, 10)]
    got = 1 - np.asarray(iox.erk_sparsities(0.9, shapes))
    np.testing.assert_allclose(got, np_erk(0.9, shapes), rtol=1e-5)
    n = np.array([np.prod(s) for s in shapes])
    assert abs((got * n).sum() / n.sum() - 0.1) < 1e-6
    assert got[2] > got[1] > got[0]
    assert np.isclose(1 - np.asarray(iox.erk_sparsities(0.5, [(2, 2), (400, 400)]))[0], 1)


def test_regex_filter_and_misuse_errors():
    params, _, _ = _problem()
    _, masks = iox.sparsify(params, 0.5, filter="^out/")
    assert np.all(np.asarray(masks["dense"]["kernel"])) and int(masks["out"]["kernel"].sum()) == 8
    inner = optax.sgd(0.1)
    cases = [
        (lambda: iox.obs_projection(0.5, "newton"), "curvature"),
        (lambda: iox.obs_projection(0.5, damping_mode="rel"), "damping_mode"),
        (lambda: iox.obs_projection(0.5, compensate="sometimes"), "compensate"),
        (lambda: iox.obs_projection(1.5), "sparsity"),
        (lambda: iox.hard_threshold(0.5, pattern="3x"), "pattern"),
        (lambda: iox.hard_threshold(0.5, distribution="erdos"), "distribution"),
        (lambda: iox.hard_threshold(0.5, pattern="channel"), "distribution='uniform'"),
        (lambda: iox.hard_threshold(0.5, per_leaf=True, distribution="erk"), "per_leaf"),
        (lambda: iox.ste(0.5, refine=-1.0), "refine"),
        (lambda: iox.rigl(inner, 0.5, key=KEY, end_step=10, pattern="2:4"), "N:M"),
        (lambda: iox.rigl(inner, 0.5, key=KEY, end_step=10, distribution="global"),
         "distribution"),
        (lambda: iox.rigl(inner, SCHEDULE, key=KEY, end_step=10), "fixed sparsity"),
        (lambda: iox.rigl(inner, 0.5, key=KEY, end_step=0), "end_step"),
        (lambda: iox.rigl(inner, 0.5, key=KEY, end_step=5, drop_fraction=2.0),
         "drop_fraction"),
        (lambda: iox.sparse_evolutionary(inner, 0.5, key=KEY, decay="cosine"), "end_step"),
        (lambda: iox.rigl("adam", 0.5, key=KEY, end_step=5), "inner"),
        (lambda: iox.hard_threshold(0.5, filter="(").init(params), "regular expression"),
    ]
    for make, words in cases:
        with pytest.raises((ValueError, TypeError), match=words):
            make()
    with pytest.raises(ValueError, match="tile"):
        iox.sparsify({"k": jnp.ones((6, 3))}, 0.5, pattern="4x4")
    tx = optax.chain(inner, iox.obs_projection(0.5, "fisher"))
    with pytest.raises(ValueError, match="per_example_grads"):
        tx.update(params, tx.init(params), params)
    tx = optax.chain(inner, iox.obs_projection(0.5, "hvp"))
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="exactly one"):
        iox.masked_params(params, optax.sgd(0.1).init(params))
