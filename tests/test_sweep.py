"""Recovery sweeps and OBS pursuit: oracles (vmapped == looped, same key, sharded ==
unsharded), the table files, plots, and clear errors."""

import csv
import functools
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import background_result
from iobs_jax.problems import mse_loss, sparse_linear_regression

import iobs_jax as ij
from iobs_jax import problems
from iobs_jax import sweep as sw

KEY = jax.random.key(3)
# A hard cell (k*/n = 1/3, n/d = 3/8): candidate set + greedy OBS beats HTP's top-k.
SMALL = dict(d=64, n=[24], k=[8], trials=40, key=KEY)
CELL = (24, 8, 0.0)


@pytest.fixture(scope="module")
def small_sweep():
    return sw.sweep(["htp", "obs-pursuit"], **SMALL)


def test_obs_pursuit_recovers_where_htp_fails(small_sweep):
    rate = {r["method"]: r["success_rate"] for r in small_sweep.rows}
    assert rate["obs-pursuit"] >= rate["htp"] + 0.15, rate
    assert rate["obs-pursuit"] >= 0.6, rate


def test_sweep_equals_solving_each_instance_in_a_loop(small_sweep):
    cell_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(KEY, 24), 8), 0)
    gen = jax.jit(functools.partial(sparse_linear_regression, n=24, d=64, k=8))
    for name in ("htp", "obs-pursuit"):
        solver = sw.make_solver(name, 8, n=24, d=64)
        got = small_sweep.trials[(name, *CELL)]
        for t in range(0, SMALL["trials"], 5):
            prob = gen(jax.random.fold_in(cell_key, t))
            x, state = solver.run(jnp.zeros(64), prob.design, prob.observations)
            err = float(jnp.linalg.norm(x - prob.x_true) / jnp.linalg.norm(prob.x_true))
            np.testing.assert_allclose(got["rel_error"][t], err, rtol=1e-6, atol=1e-12)
            assert got["iterations"][t] == int(state.iter_num)


def test_same_key_same_results_and_table_files(small_sweep, tmp_path):
    again = sw.sweep(["htp"], **SMALL)
    np.testing.assert_array_equal(again.trials[("htp", *CELL)]["rel_error"],
                                  small_sweep.trials[("htp", *CELL)]["rel_error"])
    csv_path, json_path = small_sweep.save(tmp_path)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["method"] for r in rows] == ["htp", "obs-pursuit"]
    saved = json.loads(json_path.read_text())
    assert saved["config"]["trials"] == 40 and len(saved["rows"]) == 2
    for r in saved["rows"]:
        errs = small_sweep.trials[(r["method"], *CELL)]["rel_error"]
        assert r["success_rate"] == pytest.approx(float(np.mean(errs < 1e-3)))
        assert r["median_rel_error"] == pytest.approx(float(np.median(errs)))
        assert 0 <= r["support_recovery"] <= 1 and r["ms_per_instance"] > 0
    assert "| htp | 24 | 8 |" in small_sweep.table()


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from iobs_jax import sweep as sw
    assert len(jax.devices()) == 4
    kw = dict(d=24, n=[10], k=[3], trials=7, key=jax.random.key(5), chunk_size=2)
    four = sw.sweep(["obs-pursuit"], **kw)
    one = sw.sweep(["obs-pursuit"], devices=jax.devices()[:1], **kw)
    a, b = four.trials[("obs-pursuit", 10, 3, 0.0)], one.trials[("obs-pursuit", 10, 3, 0.0)]
    for f in a:
        np.testing.assert_allclose(a[f], b[f], rtol=1e-9, atol=1e-14)
    assert four.config["devices"] == 4 and a["rel_error"].shape == (7,)
    print("OK")
""")


def background_jobs():
    """Run beside the other tests from collection on (see conftest.background_result)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    return {"sweep-sharded": ([sys.executable, "-c", _SHARDED_SCRIPT], env)}


def test_sharded_over_four_devices_equals_one_device():
    out = background_result("sweep-sharded", timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_convergence_curves_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    probs = jax.vmap(functools.partial(sparse_linear_regression, n=30, d=16, k=3))(
        jax.random.split(KEY, 4))
    curves = sw.convergence({"iht": ij.IHT(mse_loss, 6),
                             "pursuit": ij.OBSPursuit(6, candidates=6)}, probs, 20)
    assert curves["iht"]["loss"].shape == (4, 21) and curves["iht"]["x"].shape == (4, 16)
    assert np.all(curves["pursuit"]["distance"][:, -1] < 1e-10)
    np.testing.assert_allclose(curves["iht"]["distance"][:, 0], 1.0, rtol=1e-12)  # x0 = 0
    res = sw.SweepResult([dict(method=m, n=n, d=16, k=k, noise=0.0, success_rate=s)
                          for m, n, k, s in [("a", 8, 2, 1.0), ("a", 8, 4, 0.5),
                                             ("a", 12, 2, 1.0), ("a", 12, 4, 0.75)]], {}, {})
    for path in (sw.plot_phase_transition(res.rows, tmp_path / "p.png"),
                 sw.plot_convergence(curves, tmp_path / "c.png"),
                 sw.plot_image_grid(np.eye(4, 16), {"x": np.eye(4, 16)}, tmp_path / "i.png")):
        assert path.stat().st_size > 1000


def test_recover_signals_with_per_signal_sparsity():
    signals = jnp.zeros((3, 16)).at[0, :3].set(1.0).at[1, 5:9].set(2.0).at[2, 1].set(5.0)
    out = sw.recover_signals(lambda k: ij.OBSPursuit(k, candidates=k), signals, 32,
                             key=KEY)
    assert np.all(out["rel_error"] < 1e-10) and out["x"].shape == (3, 16)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(solvers=["nope"]), ValueError, "solver must be one of"),
        (dict(k=[40]), ValueError, "k must be <= d"),
        (dict(n=[0]), ValueError, "n must be in"),
        (dict(trials=0), ValueError, "trials must be in"),
        (dict(prior="mnist"), ValueError, "needs signals"),
        (dict(prior="laplace"), ValueError, "prior must be one of"),
        (dict(noise=[-1.0]), ValueError, "noise must be"),
        (dict(solvers={"x": 3}), TypeError, "factories"),
    ],
)
def test_bad_sweep_arguments_raise_before_any_compile(kwargs, error, needle):
    args = dict(SMALL, d=32, solvers=["htp"])
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        sw.sweep(args.pop("solvers"), **args)


# --- one program per solver for the whole grid ---------------------------------------------

# Noisy data: every OBSPursuit instance also runs its restart (the second attempt).
GRID = dict(d=24, n=[10, 14], k=[3, 5], trials=6, key=jax.random.key(7), chunk_size=3,
            noise=0.01)
GRID_SOLVERS = ["htp", "niht", "topk-iobs", "obs-pursuit"]


class CompileCounter:
    """Counts XLA compilations (JAX's backend-compile events) while active."""

    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture(scope="module")
def counter():
    return CompileCounter()


@pytest.fixture(scope="module")
def grid_and_cells(counter):
    with counter as c:
        grid = sw.sweep(GRID_SOLVERS, **GRID)
    grid_compiles = c.count
    cells = sw.sweep(GRID_SOLVERS, per_cell=True, **GRID)
    return grid, cells, grid_compiles


def test_grid_program_equals_the_per_cell_programs(grid_and_cells):
    grid, cells, _ = grid_and_cells
    assert len(grid.trials) == 4 * 2 * 2
    for key, got in grid.trials.items():
        want = cells.trials[key]
        np.testing.assert_allclose(got["rel_error"], want["rel_error"], rtol=1e-9, atol=1e-13,
                                   err_msg=str(key))
        for field in ("iterations", "status", "support_recovery"):
            np.testing.assert_array_equal(got[field], want[field], err_msg=f"{key} {field}")


def test_grid_compiles_each_solver_once_and_a_second_call_reuses_it(grid_and_cells, counter):
    grid, _, grid_compiles = grid_and_cells
    # obs-pursuit: one bucket here (every n < d); the first cell of a program carries its
    # compile time, the others reuse it.
    compiled = [r for r in grid.rows if r["compile_seconds"] > 0]
    assert sorted(r["method"] for r in compiled) == sorted(GRID_SOLVERS)
    with counter as c:
        again = sw.sweep(GRID_SOLVERS, **GRID)
    assert c.count == 0 and all(r["compile_seconds"] == 0 for r in again.rows)
    for key, got in again.trials.items():
        np.testing.assert_array_equal(got["rel_error"], grid.trials[key]["rel_error"])
    assert grid_compiles >= len(GRID_SOLVERS)


def test_compile_count_does_not_grow_with_the_number_of_cells(counter):
    """One cell and six cells (other d, so nothing is reused) compile as often."""
    kw = dict(trials=3, key=KEY, chunk_size=3)
    with counter as one:
        sw.sweep(["htp", "obs-pursuit"], d=20, n=[9], k=[2], **kw)
    with counter as six:
        sw.sweep(["htp", "obs-pursuit"], d=21, n=[8, 9, 10], k=[2, 4], **kw)
    assert six.count == one.count, (one.count, six.count)


def test_obs_pursuit_splits_the_grid_at_n_equals_d():
    """Primal (n >= d) and dual (n < d) forms: two programs, the same results as per cell."""
    kw = dict(d=10, n=[8, 12], k=[3], trials=4, key=KEY, chunk_size=2)
    grid, cells = sw.sweep(["obs-pursuit"], **kw), sw.sweep(["obs-pursuit"], per_cell=True, **kw)
    assert sum(r["compile_seconds"] > 0 for r in grid.rows) == 2
    for key, got in grid.trials.items():
        np.testing.assert_allclose(got["rel_error"], cells.trials[key]["rel_error"], atol=1e-12)
        np.testing.assert_array_equal(got["iterations"], cells.trials[key]["iterations"])


@pytest.mark.parametrize("problem, design", [("linear", "gaussian"), ("logistic", "rademacher"),
                                             ("quadratic", "gaussian"), ("mnist", "gaussian"),
                                             ("linear", "correlated")])
def test_padded_instances_equal_the_unpadded_ones(problem, design):
    """rows=m of n (traced, with a traced k): the first m rows are the m-row instance: the
    same draws, signal and support bit for bit; entries may differ in the last bit (XLA
    turns 1/sqrt(n) of a traced n into rsqrt; the correlated design's matmul may round
    differently in another shape)."""
    key, signal = jax.random.key(2), jnp.zeros(16).at[3].set(2.0).at[9].set(-1.0)

    def draw(n, k, rows):
        kw = dict(design=design, rho=0.3, rows=rows)
        if problem == "mnist":
            return problems.measure_signal(key, signal, n, noise=0.1, **kw)
        if problem == "logistic":
            return problems.sparse_logistic_regression(key, n, 16, k, **kw)
        gen = (problems.quadratic_measurements if problem == "quadratic"
               else problems.sparse_linear_regression)
        return gen(key, n, 16, k, noise=0.1, **kw)

    padded = jax.jit(lambda rows, k: draw(11, k, rows))(7, 4)
    plain = jax.jit(lambda: draw(7, 4, None))()
    same = functools.partial(np.testing.assert_allclose, rtol=4e-16 if design != "correlated"
                             else 1e-13, atol=1e-15)
    same(padded.design[:7], plain.design)
    same(padded.observations[:7], plain.observations)
    np.testing.assert_array_equal(padded.x_true, plain.x_true)
    np.testing.assert_array_equal(padded.support, plain.support)
    assert not np.any(padded.design[7:]) and not np.any(padded.observations[7:])
    loss = {"logistic": problems.logistic_loss, "quadratic": problems.quadratic_loss}.get(
        problem, problems.mse_loss)
    x = jnp.linspace(-1.0, 1.0, 16)
    np.testing.assert_allclose(loss(x, padded.design, padded.observations, 7),
                               loss(x, plain.design, plain.observations), rtol=1e-13)
