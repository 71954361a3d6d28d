"""Regression tests: every failure class of issue 12 fails loudly, never silently.

Each test names the silent failure it once was (NaN returned, a wrong answer reported as
success, a deep traceback instead of an error naming the argument).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import iobs_jax as ij
from iobs_jax import optax as iox


def _params():
    return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3))), "b": jnp.zeros(3)}


# ------------------------------------------------------------------ optax transforms


def test_one_nan_per_example_gradient_skips_the_step_instead_of_nan_everywhere():
    params = _params()
    tx = iox.iobs(0.1, 0.5, curvature="fisher")
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    per_example = jax.tree.map(lambda x: jnp.stack([x + 1, x + 2, x + 3]), params)
    good, s1 = tx.update(grads, state, params, per_example_grads=per_example)
    assert int(s1.skipped) == 0 and all(bool(jnp.all(jnp.isfinite(u)))
                                        for u in jax.tree.leaves(good))
    per_example["w"] = per_example["w"].at[1, 0, 0].set(jnp.nan)
    updates, s2 = tx.update(grads, state, params, per_example_grads=per_example)
    assert int(s2.skipped) == 1  # reported ...
    for u in jax.tree.leaves(updates):  # ... and the parameters stay as they are
        np.testing.assert_array_equal(u, 0.0)
    jax.tree.map(np.testing.assert_array_equal, s2.masks, state.masks)


@pytest.mark.parametrize("curvature", ["fisher", "cg", "diagonal"])
def test_integer_leaves_are_left_untouched(curvature):
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 4))),
              "step": jnp.array([3, 4], jnp.int32), "table": jnp.ones((4, 4), jnp.int32)}
    floats = {"w": params["w"]}
    grads = {"w": jnp.ones((4, 4)), "step": jnp.array([1, 1], jnp.int32),
             "table": jnp.zeros((4, 4), jnp.int32)}
    tx = iox.iobs(0.1, 0.5, curvature=curvature)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["w"] ** 4)
    updates, state = tx.update(grads, state, params, loss_fn=loss,
                               per_example_grads={"w": jnp.stack([floats["w"]] * 3)})
    np.testing.assert_array_equal(updates["step"], grads["step"])  # passed through
    np.testing.assert_array_equal(updates["table"], grads["table"])
    assert updates["step"].dtype == jnp.int32 and state.masks["table"].all()
    new = optax.apply_updates(params, updates)
    assert int(jnp.sum(new["w"] == 0)) == 8  # the float kernel is pruned


def test_a_filter_that_selects_an_integer_leaf_is_a_type_error():
    params = {"w": jnp.ones((4, 4)), "ids": jnp.ones((4, 4), jnp.int32)}
    with pytest.raises(TypeError, match="'ids'.*only floating leaves"):
        iox.hard_threshold(0.5, filter=lambda path, leaf: True).init(params)


@pytest.mark.parametrize("bad", [1.5, float("nan"), -0.5])
def test_a_schedule_outside_zero_one_keeps_the_masks_and_is_counted(bad):
    params = _params()
    # Valid at step 0 (checked when the transformation is made), bad later.
    schedule = lambda count: jnp.where(count < 1, 0.5, bad)
    tx = iox.hard_threshold(schedule)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(grads, state, params)
    first = state.masks
    assert int(state.bad_sparsity) == 0 and int(jnp.sum(~first["w"])) == 6
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert int(state.bad_sparsity) == 1
    jax.tree.map(np.testing.assert_array_equal, state.masks, first)


@pytest.mark.parametrize("bad", [1.5, float("nan"), -0.1])
def test_a_schedule_that_is_bad_at_step_zero_or_a_bad_number_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        iox.hard_threshold(lambda count: bad)
    with pytest.raises(ValueError, match="sparsity"):
        iox.iobs(0.1, bad)


@pytest.mark.parametrize("name, kwargs", [
    ("learning_rate", dict(learning_rate=float("nan"))),
    ("learning_rate", dict(learning_rate=-1.0)),
    ("learning_rate", dict(learning_rate=lambda c: jnp.nan)),
    ("damping", dict(damping=float("inf"))),
    ("decay", dict(decay=1.0)),
    ("cg_tol", dict(cg_tol=float("nan"))),
    ("cg_maxiter", dict(cg_maxiter=0)),
])
def test_iobs_options_are_validated(name, kwargs):
    args = dict(learning_rate=0.1, sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=name):
        iox.iobs(**args)


# ------------------------------------------------------------------ numerics at odd scales


def test_saliency_selection_in_float16_with_a_small_signal_finds_the_support():
    # Squares of 1e-4 underflow float16: every saliency was 0 and the "top-k" was the first
    # k indices, reported as SUCCESSFUL with a relative error of 0.85.
    key = jax.random.key(0)
    a = jax.random.normal(key, (64, 32), jnp.float32) / 8
    x_true = jnp.zeros(32).at[jnp.array([5, 11, 20, 30])].set(jnp.array([1.0, -1.5, 2.0, 1.2]))
    x_true = x_true * 1e-4
    y = a @ x_true
    fun = lambda x, a, y: jnp.mean((a @ x - y) ** 2)
    solver = ij.IOBS(fun, 4, selection="saliency")
    x, state = solver.run(jnp.zeros(32, jnp.float16), a.astype(jnp.float16),
                          y.astype(jnp.float16))
    found = set(np.flatnonzero(np.asarray(x)).tolist())
    assert found == {5, 11, 20, 30}
    rel = float(jnp.linalg.norm(x.astype(jnp.float32) - x_true) / jnp.linalg.norm(x_true))
    assert int(state.status) != ij.Status.NONFINITE and rel < 0.05


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30, 1e38])
def test_greedy_obs_keeps_exactly_k_at_any_scale(scale):
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    theta = jnp.asarray(base * scale, jnp.float32)  # scaled in float64: no denormal flush
    m = rng.normal(size=(16, 16))
    g = jnp.asarray(m @ m.T / 16 + np.eye(16), jnp.float32)
    out, mask = ij.greedy_obs(theta, g, 5)
    assert int(mask.sum()) == 5 and int(jnp.sum(out != 0)) <= 5
    assert bool(jnp.all(jnp.isfinite(out)))
    ref, ref_mask = ij.greedy_obs(jnp.asarray(base, jnp.float32), g, 5)  # scale invariant
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(np.asarray(out, np.float64) / scale, ref, rtol=1e-4, atol=1e-6)


def test_greedy_obs_and_the_inverse_form_reject_a_g_that_is_not_positive_definite():
    for g in (-jnp.eye(4), jnp.diag(jnp.array([1.0, -1.0, 1.0, 1.0]))):
        with pytest.raises(ValueError, match="hessian_inverse must be symmetric positive"):
            ij.greedy_obs(jnp.ones(4), g, 2)
        with pytest.raises(ValueError, match="hessian_inverse must be symmetric positive"):
            ij.obs_project_from_inverse(jnp.ones(4), g, jnp.array([True, True, False, False]))


def test_fisher_prune_with_huge_weights_prunes_and_reports_a_finite_cost():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    loss = lambda p, xi: jnp.sum((xi @ p["w"] - 1.0) ** 2)
    ref = None
    for scale in (1.0, 1e18, 1e-18):
        w = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) * jnp.float32(scale)}
        w["w"] = jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)),
                             jnp.float32) * jnp.float32(scale)
        pruned, report = ij.fisher_prune(loss, w, x, 0.5)
        assert report.sparsity == 0.5 and float(jnp.mean(pruned["w"] == 0)) == 0.5
        assert np.isfinite(report.predicted_loss_increase)
        ref = report.masks["w"] if ref is None else ref
    huge = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)), jnp.float32) * 1e30}
    with pytest.raises(ValueError, match="not finite.*float64"):  # beyond float32 itself
        ij.fisher_prune(loss, huge, x, 0.5)


# ------------------------------------------------------------------ promised checks


def test_obs_project_with_a_callable_returning_nan_raises():
    mask = jnp.array([True, True, False, False])
    with pytest.raises(ValueError, match=r"hessian\(v\) returned NaN"):
        ij.obs_project(jnp.ones(4), lambda v: v * jnp.nan, mask)
    with pytest.raises(ValueError, match="pytree structure|leaf shapes"):
        ij.obs_project(jnp.ones(4), lambda v: v[:2], mask)


def test_indefinite_hessian_is_reported_by_both_backends_and_cg_is_not_advised():
    f = lambda x: x[0] ** 2 - x[1] ** 2  # H = diag(2, -2)
    for hessian in ("exact", "cg"):
        with pytest.raises(ValueError, match="not positive definite") as err:
            ij.newton_direction(f, jnp.array([1.0, 1.0]), hessian=hessian)
        assert "hessian='cg'" not in str(err.value)
    # Enough damping makes it positive definite: both agree again.
    d1 = ij.newton_direction(f, jnp.array([1.0, 1.0]), damping=3.0)
    d2 = ij.newton_direction(f, jnp.array([1.0, 1.0]), damping=3.0, hessian="cg")
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_conjugate_gradient_reports_negative_curvature_and_nan_operators():
    b = jnp.array([1.0, 1.0])
    with pytest.raises(ValueError, match="negative"):
        ij.conjugate_gradient(lambda v: jnp.array([1.0, -1.0]) * v, b)
    with pytest.raises(ValueError, match="NaN"):
        ij.conjugate_gradient(lambda v: v * jnp.nan, b)
    # Under jit there is nothing to raise: the answer is NaN, never a zero direction.
    x = jax.jit(lambda b: ij.conjugate_gradient(lambda v: jnp.array([1.0, -1.0]) * v, b))(b)
    assert bool(jnp.all(jnp.isnan(x)))
    # A singular PSD operator on a consistent system still converges.
    x = ij.conjugate_gradient(lambda v: jnp.array([2.0, 0.0]) * v, jnp.array([2.0, 0.0]))
    np.testing.assert_allclose(x, [1.0, 0.0])


def test_iobs_with_cg_on_an_indefinite_problem_reports_nonfinite():
    fun = lambda x: jnp.sum(x[:2] ** 2) - jnp.sum(x[2:] ** 2) + jnp.sum(x)
    x, state = ij.IOBS(fun, 2, hessian="cg").run(jnp.ones(4))
    assert int(state.status) == ij.Status.NONFINITE and bool(jnp.all(jnp.isfinite(x)))


# ------------------------------------------------------------------ clear errors


def test_clear_errors_for_bad_argument_types():
    with pytest.raises(TypeError, match="scores"):
        ij.topk_mask("abc", 1)
    with pytest.raises(TypeError, match="axis"):
        ij.nm_mask(jnp.ones((4, 4)), 2, 4, axis=1.5)
    with pytest.raises(TypeError, match="axis"):
        ij.nm_mask(jnp.ones((4, 4)), 2, 4, axis="0")
    with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        ij.problems.sparse_linear_regression(0, 8, 4, 2)


def test_checkpoint_round_trip_keeps_integer_and_string_keys(tmp_path):
    from iobs_jax.pruning import checkpoint as _checkpoint

    params = {0: {"kernel": np.ones((2, 2), np.float32)}, "1": {"bias": np.zeros(2)},
              "layers": {3: np.arange(3)}}
    masks = {0: {"kernel": np.eye(2, dtype=bool)}, "1": {"bias": np.ones(2, bool)},
             "layers": {3: np.ones(3, bool)}}
    _checkpoint.save_params(tmp_path / "p.npz", params, masks)
    loaded, loaded_masks = _checkpoint.load_params(tmp_path / "p.npz")
    assert set(loaded) == {0, "1", "layers"} and set(loaded["layers"]) == {3}
    np.testing.assert_array_equal(loaded[0]["kernel"], params[0]["kernel"])
    np.testing.assert_array_equal(loaded_masks[0]["kernel"], masks[0]["kernel"])
    assert json.dumps(sorted(map(str, loaded)))  # plain keys, nothing pickled


@pytest.mark.parametrize("text, needle", [
    ("{oops", "cannot read it as JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"num_attention_heads": 0}', "num_attention_heads must be an int >= 1"),
    ('{"hidden_size": "32"}', "hidden_size must be an int >= 1"),
    ('{"layer_norm_eps": -1}', "layer_norm_eps must be a number in"),
])
def test_a_broken_bert_config_is_a_clear_error(tiny_bert_dir, tmp_path, text, needle):
    import shutil

    from iobs_jax import bert

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_bert_dir[0], folder)
    if text.startswith("{\""):
        text = json.dumps({**json.loads((folder / "config.json").read_text()),
                           **json.loads(text)})
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=needle) as err:
        bert.load_bert(folder)
    assert "config.json" in str(err.value)


def test_embed_wants_a_list_of_strings(tiny_bert_dir):
    from iobs_jax import bert

    model, params, tok = bert.load_bert(tiny_bert_dir[0])
    for bad, needle in (("one sentence", "not one string"), (["a", 1], "item of type int"),
                        (None, "NoneType")):
        with pytest.raises(TypeError, match=needle):
            bert.embed(model, params, tok, bad)


@pytest.mark.parametrize("call, error, needle", [
    (lambda: ij.hard_threshold("ab", 1), TypeError, "x must be an array"),
    (lambda: ij.obs_project(jnp.ones(4), lambda v: v, jnp.array([1, 0, 1, 0], bool),
                            cg_tol="x"), TypeError, "cg_tol"),
    (lambda: ij.obs_project(jnp.ones(4), lambda v: v, jnp.array([1, 0, 1, 0], bool),
                            cg_maxiter=-1), ValueError, "cg_maxiter"),
    (lambda: ij.hvp(lambda x: jnp.sum(x**2), jnp.ones(3), jnp.ones(2)), ValueError, "x and v"),
    (lambda: ij.newton_direction(lambda x: x**2, jnp.ones(3)), ValueError, "real scalar"),
    (lambda: ij.power_iteration(lambda v: v, "3", jnp.float32), TypeError, "size"),
    (lambda: ij.conjugate_gradient(lambda v: v, jnp.ones(3), maxiter="a"), TypeError,
     "maxiter"),
    (lambda: ij.raise_if_failed(3), TypeError, "solver state"),
    (lambda: ij.fisher_prune(lambda p, x: jnp.sum(p["w"] @ x), {"w": jnp.ones((2, 2))},
                             jnp.ones((3, 5)), 0.5), ValueError, "loss_fn"),
    (lambda: ij.fisher_prune(lambda p, x: jnp.sum(p["w"] * x), {"w": jnp.ones((2, 2))},
                             jnp.ones((3, 2, 2)), 0.5, filter=lambda a: True), TypeError,
     "filter"),
    (lambda: ij.problems.spectral_init(jnp.ones((4, 3)), jnp.ones(5), 1), ValueError,
     "observations"),
    (lambda: ij.mnist.load_mnist("/nonexistent/mnist"), ValueError, "nonexistent"),
    (lambda: ij.sweep.sweep(["htp"], d=8, n=4, k=1, trials=1, key=0), TypeError,
     "key must be one JAX PRNG key"),
])
def test_fuzzed_bad_inputs_give_errors_that_name_the_argument(call, error, needle):
    with pytest.raises(error, match=needle):
        call()
