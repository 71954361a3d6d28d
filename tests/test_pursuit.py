"""OBSPursuit: the solver contract (jit, retrace, vmap, state structure, dtypes), its
oracles (least squares on its support, Topk-I-OBS with the Gram Hessian, Subspace
Pursuit's correlation rule, hard thresholding on an orthogonal design), the restart
schedule (== the better of the attempts run one by one) and clear errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_states_match
from iobs_jax.problems import mse_loss, sparse_linear_regression

import iobs_jax as ij
from iobs_jax import sweep as sw

# The default (Newton attempt + gradient restart) covers both steps and the restart;
# the other two are the single-attempt corner cases (no factorization; no refit).
CONFIGS = {
    "default": lambda k: ij.OBSPursuit(k),
    "gradient": lambda k: ij.OBSPursuit(k, candidates=k + 2, step="gradient"),
    "plain": lambda k: ij.OBSPursuit(k, candidates=k, refit=False, monotone=False, damping=0.0),
}
configs = pytest.mark.parametrize("name", list(CONFIGS))


def problem(seed, n=24, d=48, k=6, noise=0.0, dtype=jnp.float64):
    return sparse_linear_regression(jax.random.key(seed), n, d, k, noise=noise, dtype=dtype)


def hard_batch(trials=24, n=24, d=64, k=8):
    """Instances of a cell where the first attempt often stops on a wrong support."""
    keys = jax.random.split(jax.random.key(11), trials)
    return jax.vmap(functools.partial(sparse_linear_regression, n=n, d=d, k=k))(keys)


# --- the contract ---------------------------------------------------------------------------


@configs
def test_jit_equals_no_jit(name):
    prob = problem(1)
    solver = CONFIGS[name](6)
    args = (jnp.zeros(48), prob.design, prob.observations)
    x_eager, s_eager = dataclasses.replace(solver, jit=False).run(*args)
    x_jit, s_jit = jax.jit(solver.run)(*args)
    np.testing.assert_allclose(x_jit, x_eager, atol=1e-10)
    assert int(s_jit.iter_num) == int(s_eager.iter_num)
    assert int(s_jit.attempt) == int(s_eager.attempt)


@configs
def test_no_retrace_on_second_call(name):
    from iobs_jax.solvers import pursuit as _pursuit

    solver = CONFIGS[name](6)
    p1, p2 = problem(2), problem(3)
    solver.run(jnp.zeros(48), p1.design, p1.observations)[0].block_until_ready()
    size = _pursuit._run_compiled._cache_size()
    # A fresh but equal solver, other data of the same shapes: the compiled run is reused.
    dataclasses.replace(solver).run(jnp.zeros(48), p2.design, p2.observations)
    assert _pursuit._run_compiled._cache_size() == size


@configs
def test_vmap_equals_loop(name):
    probs = hard_batch(trials=6)
    solver = CONFIGS[name](8)
    xs, states = jax.vmap(solver.run, in_axes=(None, 0, 0))(
        jnp.zeros(64), probs.design, probs.observations)
    for i in range(6):
        x, state = solver.run(jnp.zeros(64), probs.design[i], probs.observations[i])
        np.testing.assert_allclose(xs[i], x, atol=1e-9)
        assert int(states.iter_num[i]) == int(state.iter_num)
        assert int(states.attempt[i]) == int(state.attempt)


@configs
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_and_update_states_match_and_dtypes_are_kept(name, dtype):
    prob = problem(5, n=40, d=30, k=4, dtype=dtype)  # n >= d: the primal form
    solver = CONFIGS[name](4)
    x0 = jnp.zeros(30, dtype)
    state0 = solver.init_state(x0, prob.design, prob.observations)
    x1, state1 = solver.update(x0, state0, prob.design, prob.observations)
    assert_states_match(state0, state1)
    x, state = jax.jit(solver.run)(x0, prob.design, prob.observations)
    assert x.dtype == dtype and state.value.dtype == dtype and state.grad.dtype == dtype
    if name != "plain":
        err = jnp.linalg.norm(x - prob.x_true) / jnp.linalg.norm(prob.x_true)
        assert float(err) < (1e-4 if dtype == jnp.float32 else 1e-10)


@configs
def test_closed_form_on_an_orthogonal_design_is_hard_thresholding(name, rng):
    # A = I: f(x) = ||x - y||^2 / n, whose k-sparse minimizer keeps the k largest |y_i|.
    y = jnp.asarray(rng.normal(size=12))
    x, state = CONFIGS[name](5).run(jnp.zeros(12), jnp.eye(12), y)
    keep = np.argsort(-np.abs(np.asarray(y)))[:5]
    expected = np.zeros(12)
    expected[keep] = np.asarray(y)[keep]
    np.testing.assert_allclose(x, expected, atol=1e-12)
    assert int(state.status) == ij.Status.SUCCESSFUL


# --- oracles --------------------------------------------------------------------------------


def test_fixed_point_is_least_squares_on_its_support():
    prob = sparse_linear_regression(jax.random.key(1), 20, 40, 5, noise=0.1)
    x, state = ij.OBSPursuit(5).run(jnp.zeros(40), prob.design, prob.observations)
    assert int(state.status) == ij.Status.SUCCESSFUL and int(jnp.sum(x != 0)) == 5
    np.testing.assert_array_equal(state.mask, x != 0)
    a = np.asarray(prob.design)[:, np.asarray(state.mask)]
    z = np.linalg.lstsq(a, np.asarray(prob.observations), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(x)[np.asarray(state.mask)], z, rtol=1e-8)
    # The primal form (n >= d): one step lands on x*.
    big = sparse_linear_regression(jax.random.key(2), 60, 30, 4)
    xb, sb = ij.OBSPursuit(4, candidates=4).run(jnp.zeros(30), big.design, big.observations)
    assert float(jnp.linalg.norm(xb - big.x_true)) < 1e-10 and int(sb.iter_num) <= 2


def test_candidates_k_matches_topk_iobs_with_the_gram_hessian():
    """n > d: one true-Hessian Topk-I-OBS step (dense IOBS) == OBSPursuit(candidates=k)."""
    prob = sparse_linear_regression(jax.random.key(4), 50, 20, 3, noise=0.05)
    x_iobs, _ = ij.IOBS(mse_loss, 6, hessian=sw.mse_hessian, maxiter=1).run(
        jnp.zeros(20), prob.design, prob.observations)
    x_p, _ = ij.OBSPursuit(6, candidates=6, damping=0.0, maxiter=1).run(
        jnp.zeros(20), prob.design, prob.observations)
    np.testing.assert_allclose(x_p, x_iobs, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n, d", [(24, 48), (60, 30)])
def test_gradient_step_selects_by_correlation_with_the_residual(n, d):
    """One step from zero: candidates = the c largest |A^T y|, then greedy OBS (exact: the
    best k-subset of them by least squares, checked by enumeration)."""
    import itertools

    prob = problem(6, n=n, d=d, k=3, noise=0.1)
    a, y = np.asarray(prob.design), np.asarray(prob.observations)
    cand = np.argsort(-np.abs(a.T @ y))[:5]
    x, _ = ij.OBSPursuit(3, candidates=5, step="gradient", maxiter=1).run(
        jnp.zeros(d), prob.design, prob.observations)
    support = np.flatnonzero(np.asarray(x))
    assert set(support) <= set(cand.tolist()) and support.size == 3
    # greedy OBS on a quadratic removes the entry whose removal costs least, one at a time
    kept = list(cand)
    while len(kept) > 3:
        costs = [np.linalg.norm(a[:, s] @ np.linalg.lstsq(a[:, s], y, rcond=None)[0] - y)
                 for s in ([j for j in kept if j != r] for r in kept)]
        kept.pop(int(np.argmin(costs)))
    assert sorted(kept) == sorted(support.tolist())
    z = np.linalg.lstsq(a[:, support], y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(x)[support], z, rtol=1e-8)
    assert len(list(itertools.combinations(cand, 3))) == 10  # the enumeration above is small


# --- restarts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attempts():
    """The default schedule and its two attempts alone, on noiseless and noisy data."""
    probs = hard_batch()
    noisy = probs.observations + 0.05 * jax.random.normal(jax.random.key(3), (24, 24))
    solvers = dict(default=ij.OBSPursuit(8), first=ij.OBSPursuit(8, candidates=12, step="newton"),
                   second=ij.OBSPursuit(8, candidates=10, step="gradient"),
                   off=ij.OBSPursuit(8, restart_tol=0.5))
    out = {}
    for name, s in solvers.items():
        run = jax.jit(jax.vmap(s.run, in_axes=(None, 0, 0)))  # one compile for both data sets
        out[name] = run(jnp.zeros(64), probs.design, probs.observations)
        out[name, "noisy"] = run(jnp.zeros(64), probs.design, noisy)
    return probs, out


def test_restarts_return_the_better_of_the_attempts_run_one_by_one(attempts):
    probs, out = attempts
    (x, st), (x1, s1), (x2, s2) = out["default"], out["first"], out["second"]
    scale = jnp.mean(probs.observations**2, axis=1)
    fits = s1.value <= (1e-4) ** 2 * scale
    assert 0 < int(jnp.sum(~fits)) < 24  # the cell has both kinds of instances
    take2 = ~fits & (s2.value < s1.value)
    np.testing.assert_allclose(x, jnp.where(take2[:, None], x2, x1), atol=1e-12)
    np.testing.assert_array_equal(st.attempt, take2.astype(int))
    np.testing.assert_array_equal(st.iter_num, s1.iter_num + jnp.where(fits, 0, s2.iter_num))
    ok = lambda xs: jnp.linalg.norm(xs - probs.x_true, axis=1) < 1e-3 * jnp.linalg.norm(
        probs.x_true, axis=1)
    assert int(jnp.sum(ok(x))) > int(jnp.sum(ok(x1)))  # the restart recovers more


def test_no_restart_when_the_first_attempt_fits(attempts):
    probs, out = attempts
    fits = out["first"][1].value <= (1e-4) ** 2 * jnp.mean(probs.observations**2, axis=1)
    assert int(jnp.sum(fits)) > 0
    np.testing.assert_array_equal(out["default"][0][fits], out["first"][0][fits])
    np.testing.assert_array_equal(out["default"][1].attempt[fits], 0)


def test_noisy_data_restart_keeps_the_lower_loss(attempts):
    _, out = attempts
    both, one = out["default", "noisy"][1], out["first", "noisy"][1]
    assert np.all(np.asarray(both.value) <= np.asarray(one.value))
    assert np.any(np.asarray(both.attempt) == 1)
    # restart_tol above the noise level: no restarts
    off = out["off", "noisy"][1]
    np.testing.assert_array_equal(off.iter_num, one.iter_num)
    np.testing.assert_array_equal(off.attempt, 0)


def test_schedule_is_normalized_and_deduplicated():
    s = ij.OBSPursuit(8)
    assert s.candidates == (12, 10) and s.step == ("newton", "gradient")
    assert ij.OBSPursuit(8, candidates=[9, 10], step="gradient").step == ("gradient",) * 2
    assert ij.OBSPursuit(8, candidates=9).step == ("newton",)
    assert ij.OBSPursuit(4, refit=False).candidates == (4,)
    # capped at n: (12, 10) on n = 9 is the same attempt twice, run once
    # (count, capacity, step, count > k): static counts are their own capacity
    assert ij.OBSPursuit(8)._attempts(jnp.zeros((9, 30))) == [(9, 9, "newton", True),
                                                              (9, 9, "gradient", True)]
    assert ij.OBSPursuit(8, candidates=(12, 10), step="newton")._attempts(
        jnp.zeros((9, 30))) == [(9, 9, "newton", True)]
    st = ij.OBSPursuit(4, candidates=6, step="gradient").init_state(
        jnp.zeros(30), jnp.ones((10, 30)), jnp.ones(10))
    assert st.factor.shape == (0, 0)  # no factorization when no attempt needs it first


# --- a traced k and padded rows (what sweeps compile once) ---------------------------------


def test_traced_k_on_padded_rows_equals_the_static_solver():
    """OBSPursuit(k, max_k) on zero-padded rows == OBSPursuit(k) on the instance itself,
    for several k through one compiled function; jit == no-jit."""
    run = jax.jit(lambda s, a, y, rows: s.run(jnp.zeros(48), a, y, rows))
    for k in (3, 6):
        prob = problem(7, n=20, d=48, k=k)
        a = jnp.concatenate([prob.design, jnp.zeros((6, 48))])
        y = jnp.concatenate([prob.observations, jnp.zeros(6)])
        x, state = ij.OBSPursuit(k).run(jnp.zeros(48), prob.design, prob.observations)
        traced = ij.OBSPursuit(jnp.int32(k), max_k=8)
        x_jit, s_jit = run(traced, a, y, jnp.int32(20))
        x_eager, s_eager = dataclasses.replace(traced, jit=False).run(jnp.zeros(48), a, y, 20)
        for xs, st in ((x_jit, s_jit), (x_eager, s_eager)):
            np.testing.assert_allclose(xs, x, atol=1e-12)
            assert int(st.iter_num) == int(state.iter_num)
            assert int(st.attempt) == int(state.attempt)
            np.testing.assert_allclose(st.value, state.value, rtol=1e-9, atol=1e-20)
    assert run._cache_size() == 1


def test_traced_k_options_are_checked():
    with pytest.raises(ValueError, match="max_k"):
        ij.OBSPursuit(9, max_k=8)
    with pytest.raises(ValueError, match="functions of k"):
        ij.OBSPursuit(4, max_k=8, candidates=6)
    with pytest.raises(ValueError, match="candidates\\(max_k\\)"):
        ij.OBSPursuit(4, max_k=8, candidates=lambda k: k - 1)
    traced = ij.OBSPursuit(4, max_k=8, candidates=lambda k: k, step="gradient")
    assert traced._attempts(jnp.zeros((10, 30)))[0][1:] == (8, "gradient", False)
    with pytest.raises(TypeError, match="integer scalar"):
        ij.OBSPursuit(4.0, max_k=8)
    with pytest.raises(ValueError, match="rows must be"):
        ij.OBSPursuit(2).run(jnp.zeros(6), jnp.ones((4, 6)), jnp.ones(4), 5)


def test_bad_options():
    with pytest.raises(ValueError, match="candidates must be"):
        ij.OBSPursuit(5, candidates=3)
    with pytest.raises(ValueError, match="needs candidates=k"):
        ij.OBSPursuit(5, candidates=8, refit=False)
    with pytest.raises(ValueError, match="step must be one of"):
        ij.OBSPursuit(5, step="newtn")
    with pytest.raises(ValueError, match="one value or one per attempt"):
        ij.OBSPursuit(5, candidates=(6, 7, 8), step=("newton", "gradient"))
    with pytest.raises(ValueError, match="at least one attempt"):
        ij.OBSPursuit(5, candidates=())
    with pytest.raises(ValueError, match="restart_tol"):
        ij.OBSPursuit(5, restart_tol=-1.0)
    with pytest.raises(ValueError, match="A \\(n, d\\), y \\(n,\\)"):
        ij.OBSPursuit(2).run(jnp.zeros(5), jnp.ones((4, 6)), jnp.ones(4))
    with pytest.raises(ValueError, match="obs-pursuit"):
        sw.make_solver("obs-pursuit", 3, n=10, d=20, problem="logistic")
