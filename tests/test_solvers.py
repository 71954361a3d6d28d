"""Contract suite run over every solver configuration, plus the solver-level oracles."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_states_match
from iobs_jax.problems import mse_loss, sparse_linear_regression

import iobs_jax as ij


def gram_hessian(x, design, observations):
    n = design.shape[0]
    return 2.0 * design.T @ design / n


SOLVERS = {
    "iht": lambda f, k: ij.IHT(f, k, maxiter=3000, tol=1e-12),
    "niht": lambda f, k: ij.IHT(f, k, variant="niht", maxiter=2000, tol=1e-12),
    "htp": lambda f, k: ij.IHT(f, k, variant="htp", tol=1e-12),
    "htp-cg": lambda f, k: ij.IHT(f, k, variant="htp", hessian="cg", cg_tol=1e-12, tol=1e-12),
    "iobs-topk": lambda f, k: ij.IOBS(f, k, tol=1e-12),
    "iobs-plain": lambda f, k: ij.IOBS(f, k, correction=False, tol=1e-12),
    "iobs-saliency": lambda f, k: ij.IOBS(f, k, selection="saliency", tol=1e-12),
    "iobs-greedy": lambda f, k: ij.IOBS(f, k, selection="greedy", tol=1e-12),
    "iobs-cg": lambda f, k: ij.IOBS(f, k, hessian="cg", cg_tol=1e-13, tol=1e-12),
    "iobs-operator": lambda f, k: ij.IOBS(
        f, k, hessian=lambda x, *a: (lambda v: ij.hvp(f, x, v, *a)), cg_tol=1e-13, tol=1e-12
    ),
}
solver_names = pytest.mark.parametrize("name", list(SOLVERS))


def make_problem(seed, n=40, d=20, k=4, noise=0.0, dtype=jnp.float64):
    return sparse_linear_regression(jax.random.key(seed), n, d, k, noise=noise, dtype=dtype)


def rel_err(x, x_true):
    return float(jnp.linalg.norm(x - x_true) / jnp.linalg.norm(x_true))


# --- the contract: every solver -----------------------------------------------------------


@solver_names
def test_recovers_sparse_signal_on_well_posed_problem(name):
    prob = make_problem(0)
    x, state = SOLVERS[name](mse_loss, 4).run(jnp.zeros(20), prob.design, prob.observations)
    assert rel_err(x, prob.x_true) < 1e-6
    assert int(state.status) == ij.Status.SUCCESSFUL
    np.testing.assert_array_equal(state.mask, prob.support)


@solver_names
def test_closed_form_on_isotropic_quadratic_is_hard_threshold(name, rng):
    # min ||x - c||^2 / 2 s.t. ||x||_0 <= k has the closed form T_k(c).
    c = jnp.asarray(rng.normal(size=12))
    f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)
    x, _ = SOLVERS[name](f, 5).run(jnp.zeros(12), c)
    np.testing.assert_allclose(x, ij.hard_threshold(c, 5), atol=1e-8)


@pytest.mark.parametrize("name", ["iobs-saliency", "iobs-greedy"])
def test_saliency_selection_is_exact_on_diagonal_quadratic(name, rng):
    # Separable quadratic: the best k-support maximizes q_i c_i^2, not |c_i|.
    q = jnp.asarray(rng.uniform(0.1, 10.0, size=10))
    c = jnp.asarray(rng.normal(size=10))
    f = lambda x: 0.5 * jnp.sum(q * (x - c) ** 2)
    x, _ = SOLVERS[name](f, 4).run(jnp.zeros(10))
    best = ij.topk_mask(q * c**2, 4)
    np.testing.assert_allclose(x, jnp.where(best, c, 0.0), atol=1e-10)


@solver_names
def test_jit_equals_no_jit(name):
    prob = make_problem(1)
    solver = SOLVERS[name](mse_loss, 4)
    args = (jnp.zeros(20), prob.design, prob.observations)
    # jit=False: run() is not wrapped in jit (set-up op by op, the loop as one primitive).
    x_eager, s_eager = dataclasses.replace(solver, jit=False).run(*args)
    x_jit, s_jit = jax.jit(solver.run)(*args)
    np.testing.assert_allclose(x_jit, x_eager, atol=1e-10)
    assert int(s_jit.iter_num) == int(s_eager.iter_num)


@solver_names
@pytest.mark.parametrize("how", ["jax.jit(solver.run)", "solver.run"])
def test_no_retrace_on_second_call(name, how):
    # Under a user's jit, and for a plain run() (compiled and cached per configuration,
    # even on a fresh but equal solver object), fun is traced on the first call only.
    traces = []

    def counted_loss(x, a, y):
        traces.append(1)
        return mse_loss(x, a, y)

    solver = SOLVERS[name](counted_loss, 4)
    if how == "solver.run":
        first_run, second_run = solver.run, dataclasses.replace(solver).run
    else:
        first_run = second_run = jax.jit(solver.run)
    p1, p2 = make_problem(2), make_problem(3)
    first_run(jnp.zeros(20), p1.design, p1.observations)[0].block_until_ready()
    first = len(traces)
    x, _ = second_run(jnp.zeros(20), p2.design, p2.observations)
    assert len(traces) == first
    assert rel_err(x, p2.x_true) < 1e-6


def test_jit_false_accepts_python_values_in_args():
    prob = make_problem(3)

    def scaled_loss(x, a, y, scale):
        assert isinstance(scale, float)  # a Python value, not a tracer
        return scale * mse_loss(x, a, y)

    x, state = ij.IOBS(scaled_loss, 4, jit=False).run(
        jnp.zeros(20), prob.design, prob.observations, 2.0
    )
    assert rel_err(x, prob.x_true) < 1e-6
    with pytest.raises(TypeError, match="jit must be True or False"):
        ij.IHT(mse_loss, 4, jit="yes")


@solver_names
def test_vmap_equals_loop(name):
    probs = jax.vmap(functools.partial(sparse_linear_regression, n=40, d=20, k=4, noise=0.01))(
        jax.random.split(jax.random.key(4), 3)
    )
    solver = SOLVERS[name](mse_loss, 4)
    xs, states = jax.vmap(solver.run, in_axes=(None, 0, 0))(
        jnp.zeros(20), probs.design, probs.observations
    )
    for i in range(3):
        x, state = solver.run(jnp.zeros(20), probs.design[i], probs.observations[i])
        np.testing.assert_allclose(xs[i], x, atol=1e-9)
        assert int(states.iter_num[i]) == int(state.iter_num)


@solver_names
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_and_update_states_match_and_dtypes_are_kept(name, dtype):
    prob = make_problem(5, dtype=dtype)
    solver = SOLVERS[name](mse_loss, 4)
    x0 = jnp.zeros(20, dtype)
    state0 = solver.init_state(x0, prob.design, prob.observations)
    x1, state1 = solver.update(x0, state0, prob.design, prob.observations)
    assert_states_match(state0, state1)
    assert x1.dtype == dtype and state1.value.dtype == dtype and state1.error.dtype == dtype
    x, state = jax.jit(solver.run)(x0, prob.design, prob.observations)
    assert x.dtype == dtype and state.grad.dtype == dtype
    assert rel_err(x, prob.x_true) < (1e-3 if dtype == jnp.float32 else 1e-6)


@solver_names
def test_pytree_parameters_with_global_k_match_flat_solve(name):
    prob = make_problem(6)
    a, y = prob.design, prob.observations
    loss = lambda p, a, y: mse_loss(jnp.concatenate([p["u"].ravel(), p["v"]]), a, y)
    params0 = {"u": jnp.zeros((3, 4)), "v": jnp.zeros(8)}
    solver = SOLVERS[name](loss, 4)
    x, state = solver.run(params0, a, y)
    flat_x, _ = SOLVERS[name](mse_loss, 4).run(jnp.zeros(20), a, y)
    np.testing.assert_allclose(jnp.concatenate([x["u"].ravel(), x["v"]]), flat_x, atol=1e-9)
    assert jax.tree.structure(state.mask) == jax.tree.structure(params0)
    assert sum(int(m.sum()) for m in jax.tree.leaves(state.mask)) == 4


@solver_names
def test_non_finite_data_is_reported_not_returned_as_nan(name):
    prob = make_problem(7)
    bad = prob.observations.at[3].set(jnp.nan)
    x, state = jax.jit(SOLVERS[name](mse_loss, 4).run)(jnp.zeros(20), prob.design, bad)
    assert int(state.status) == ij.Status.NONFINITE
    assert bool(jnp.all(jnp.isfinite(x)))
    with pytest.raises(RuntimeError, match="non-finite"):
        ij.raise_if_failed(state)


@solver_names
def test_eager_update_on_bad_data_reports_status_instead_of_raising(name):
    # update() outside jit must behave like update() inside jit: a status, not an error.
    prob = make_problem(7)
    bad = prob.observations.at[3].set(jnp.nan)
    solver = SOLVERS[name](mse_loss, 4)
    state = solver.init_state(jnp.zeros(20), prob.design, bad)
    x1, state1 = solver.update(jnp.zeros(20), state, prob.design, bad)
    assert int(state1.status) == ij.Status.NONFINITE
    assert bool(jnp.all(jnp.isfinite(x1)))


def test_eager_update_with_callable_dense_hessian_on_bad_data_reports_status():
    prob = make_problem(7)
    bad = prob.observations.at[3].set(jnp.nan)
    solver = ij.IOBS(mse_loss, 4, hessian=gram_hessian)
    state = solver.init_state(jnp.zeros(20), prob.design, bad)
    _, state1 = solver.update(jnp.zeros(20), state, prob.design, bad)
    assert int(state1.status) == ij.Status.NONFINITE


@pytest.mark.parametrize("name", ["iobs-topk", "htp", "niht"])
def test_pytree_mixing_bfloat16_and_float64_leaves_converges(name):
    # The bfloat16 leaf is rounded every step, so tol is judged at bfloat16's resolution.
    prob = make_problem(6)
    loss = lambda p, a, y: mse_loss(jnp.concatenate([p["u"], p["v"].astype(jnp.float64)]), a, y)
    params0 = {"u": jnp.zeros(12), "v": jnp.zeros(8, jnp.bfloat16)}
    x, state = SOLVERS[name](loss, 4).run(params0, prob.design, prob.observations)
    assert x["v"].dtype == jnp.bfloat16 and x["u"].dtype == jnp.float64
    assert int(state.status) == ij.Status.SUCCESSFUL


@solver_names
def test_pytree_with_mixed_leaf_dtypes_keeps_each_dtype(name):
    prob = make_problem(6)
    loss = lambda p, a, y: mse_loss(
        jnp.concatenate([p["u"], p["v"].astype(jnp.float64)]), a, y
    )
    params0 = {"u": jnp.zeros(12), "v": jnp.zeros(8, jnp.float32)}
    x, state = SOLVERS[name](loss, 4).run(params0, prob.design, prob.observations)
    assert x["u"].dtype == jnp.float64 and x["v"].dtype == jnp.float32
    assert state.mask["u"].dtype == jnp.bool_ and state.mask["v"].dtype == jnp.bool_
    full = jnp.concatenate([x["u"], x["v"].astype(jnp.float64)])
    assert rel_err(full, prob.x_true) < 1e-5
    assert int(state.status) == ij.Status.SUCCESSFUL


@solver_names
def test_bfloat16_parameters_run_and_keep_their_dtype(name):
    # Dense factorizations run in float32 under the hood; results come back in bfloat16.
    prob = make_problem(13)
    bf = jnp.bfloat16
    x, state = jax.jit(SOLVERS[name](mse_loss, 4).run)(
        jnp.zeros(20, bf), prob.design.astype(bf), prob.observations.astype(bf)
    )
    assert x.dtype == bf
    assert int(state.status) == ij.Status.SUCCESSFUL  # tol is clamped to bfloat16's eps
    # bfloat16 has ~3 significant digits: a small true coefficient may be swapped for
    # a spurious one of the same size, so compare values, not supports.
    assert rel_err(x.astype(jnp.float64), prob.x_true) < 0.1


# --- the paper's bars --------------------------------------------------------------------


def iterations_to(xs, x_true, tol):
    errs = np.asarray(jnp.linalg.norm(xs - x_true, axis=-1) / jnp.linalg.norm(x_true))
    hit = np.flatnonzero(errs < tol)
    return int(hit[0]) + 1 if hit.size else None


def test_paper_setting_topk_iobs_needs_10x_fewer_iterations_than_iht():
    """n=256, d=128, k*=16, k=64, A ~ N(0, 1/n), noiseless MSE, exact Hessian."""
    for seed in range(3):
        prob = sparse_linear_regression(jax.random.key(seed), 256, 128, 16)
        args = (jnp.zeros(128), prob.design, prob.observations)
        iht_xs, _ = jax.jit(functools.partial(ij.trajectory, num_steps=1500))(
            ij.IHT(mse_loss, 64), *args
        )
        iobs_xs, _ = jax.jit(functools.partial(ij.trajectory, num_steps=10))(
            ij.IOBS(mse_loss, 64, selection="topk"), *args
        )
        iht_iters = iterations_to(iht_xs, prob.x_true, 1e-6)
        iobs_iters = iterations_to(iobs_xs, prob.x_true, 1e-6)
        assert iobs_iters is not None and iht_iters is not None
        assert 10 * iobs_iters <= iht_iters, (iobs_iters, iht_iters)


@pytest.mark.parametrize(
    "solver",
    [ij.IOBS(mse_loss, 12, damping=1e-3, maxiter=50), ij.IHT(mse_loss, 12, variant="htp")],
    ids=["damped-topk-iobs", "htp"],
)
def test_compressed_sensing_recovers_90_percent(solver):
    """d=256, n=100, k*=12 (n < d: H is singular, so I-OBS is damped)."""
    probs = jax.vmap(functools.partial(sparse_linear_regression, n=100, d=256, k=12))(
        jax.random.split(jax.random.key(11), 50)
    )
    xs, states = jax.jit(jax.vmap(solver.run, in_axes=(None, 0, 0)))(
        jnp.zeros(256), probs.design, probs.observations
    )
    errs = jnp.linalg.norm(xs - probs.x_true, axis=1) / jnp.linalg.norm(probs.x_true, axis=1)
    assert float(jnp.mean(errs < 1e-3)) >= 0.9
    assert not bool(jnp.any(states.status == ij.Status.NONFINITE))


def test_brute_force_best_support_is_found_on_a_noisy_problem():
    """Enumerate every 3-support of d=10 and compare with what the solvers converge to."""
    prob = make_problem(8, n=30, d=10, k=3, noise=0.05)
    a, y = np.asarray(prob.design), np.asarray(prob.observations)
    best = np.inf
    for support in itertools.combinations(range(10), 3):
        cols = list(support)
        z, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        best = min(best, float(np.mean((a[:, cols] @ z - y) ** 2)))
    for name in ["iobs-topk", "iobs-saliency", "iobs-greedy", "htp", "niht"]:
        x, state = SOLVERS[name](mse_loss, 3).run(jnp.zeros(10), prob.design, prob.observations)
        np.testing.assert_allclose(float(state.value), best, rtol=1e-8, err_msg=name)


def test_solver_is_a_pytree_so_damping_varies_without_retrace():
    traces = []

    def counted(x, a, y):
        traces.append(1)
        return mse_loss(x, a, y)

    prob = make_problem(9)
    run = jax.jit(lambda solver, a, y: solver.run(jnp.zeros(20), a, y))
    x1, _ = run(ij.IOBS(counted, 4, damping=0.1), prob.design, prob.observations)
    first = len(traces)
    x2, _ = run(ij.IOBS(counted, 4, damping=0.2), prob.design, prob.observations)
    assert len(traces) == first
    damps = jnp.array([0.0, 0.1, 1.0])
    xs, _ = jax.vmap(lambda dmp: ij.IOBS(mse_loss, 4, damping=dmp).run(
        jnp.zeros(20), prob.design, prob.observations))(damps)
    assert xs.shape == (3, 20)


def test_callable_dense_hessian_matches_exact_hessian():
    prob = make_problem(12, noise=0.01)
    args = (jnp.zeros(20), prob.design, prob.observations)
    x_callable, s1 = ij.IOBS(mse_loss, 4, hessian=gram_hessian).run(*args)
    x_exact, s2 = ij.IOBS(mse_loss, 4).run(*args)
    np.testing.assert_allclose(x_callable, x_exact, atol=1e-10)
    assert int(s1.iter_num) == int(s2.iter_num)


def test_trajectory_records_every_iterate():
    prob = make_problem(10)
    xs, states = ij.trajectory(ij.IHT(mse_loss, 4), jnp.zeros(20), prob.design,
                               prob.observations, num_steps=7)
    assert xs.shape == (7, 20) and states.iter_num.tolist() == list(range(1, 8))
    assert bool(jnp.all(jnp.diff(states.value) <= 1e-12))  # IHT with 1/L descends


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda k, **kw: ij.IHT(mse_loss, k, variant="htp", tol=1e-12, **kw),
    lambda k, **kw: ij.IHT(mse_loss, k, variant="niht", tol=1e-12, **kw),
    lambda k, **kw: ij.IOBS(mse_loss, k, damping=1e-3, maxiter=30, **kw),
], ids=["htp", "niht", "iobs-topk"])
def test_traced_k_with_max_k_equals_the_static_solver_with_one_compile(make):
    run = jax.jit(lambda s, a, y: s.run(jnp.zeros(40), a, y))
    for k in (3, 5):
        prob = sparse_linear_regression(jax.random.key(k), 24, 40, k, noise=0.01)
        x, state = make(k).run(jnp.zeros(40), prob.design, prob.observations)
        traced = make(jnp.int32(k), max_k=6)
        x_jit, s_jit = run(traced, prob.design, prob.observations)
        x_eager, s_eager = dataclasses.replace(traced, jit=False).run(
            jnp.zeros(40), prob.design, prob.observations)
        for xs, st in ((x_jit, s_jit), (x_eager, s_eager)):
            np.testing.assert_allclose(xs, x, rtol=1e-9, atol=1e-12)
            assert int(st.iter_num) == int(state.iter_num)
            np.testing.assert_array_equal(st.mask, state.mask)
    assert run._cache_size() == 1
    with pytest.raises(ValueError, match="max_k"):
        make(7, max_k=6)


def test_bad_input_raises_clear_errors_before_tracing():
    prob = make_problem(0)
    a, y = prob.design, prob.observations
    with pytest.raises(ValueError, match=r"k must be in \[0, 20\]"):
        ij.IOBS(mse_loss, 21).run(jnp.zeros(20), a, y)
    with pytest.raises(ValueError, match="k must be in"):
        ij.IHT(mse_loss, -1)
    with pytest.raises(TypeError, match="Python int"):
        ij.IHT(mse_loss, 2.5)
    with pytest.raises(ValueError, match="matching shapes"):
        ij.IHT(mse_loss, 4).run(jnp.zeros(19), a, y)
    with pytest.raises(ValueError, match="real scalar"):
        ij.IOBS(lambda x, a, y: a @ x - y, 4).run(jnp.zeros(20), a, y)
    with pytest.raises(ValueError, match=r"shape \(20, 20\)"):
        ij.IOBS(mse_loss, 4, hessian=lambda x, a, y: jnp.eye(19)).run(jnp.zeros(20), a, y)
    with pytest.raises(ValueError, match="variant must be one of"):
        ij.IHT(mse_loss, 4, variant="cosamp")
    with pytest.raises(ValueError, match="selection must be one of"):
        ij.IOBS(mse_loss, 4, selection="random")
    with pytest.raises(ValueError, match="diag"):
        ij.IOBS(mse_loss, 4, selection="saliency", hessian="cg")
    with pytest.raises(ValueError, match="step_size must be > 0"):
        ij.IOBS(mse_loss, 4, step_size=0.0)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        ij.IOBS(mse_loss, 4, damping=-1.0)
    with pytest.raises(ValueError, match="chooses its own step"):
        ij.IHT(mse_loss, 4, variant="niht", step_size=0.1)
    with pytest.raises(TypeError, match="x0 must be real"):
        ij.IHT(mse_loss, 4).run(jnp.zeros(20, jnp.complex64), a, y)
    with pytest.raises(TypeError, match="x0 must hold floating-point"):
        ij.IOBS(mse_loss, 4).run(jnp.zeros(20, jnp.int32), a, y)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        ij.IHT(mse_loss, 4, step_size=np.float32(-1.0))
    with pytest.raises(ValueError, match="tol must be"):
        ij.IHT(mse_loss, 4, tol=-1e-3)
    with pytest.raises(TypeError, match="tol must be a real number"):
        ij.IOBS(mse_loss, 4, tol="0.5")
    # NumPy and 0-d array tolerances are accepted and stored as a static float.
    assert isinstance(ij.IOBS(mse_loss, 4, tol=np.float32(1e-5)).tol, float)
