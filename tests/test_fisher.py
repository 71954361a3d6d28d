"""Global Fisher I-OBS (``fisher_prune``) against dense numpy references, on a Flax MLP,
and at its input boundary."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iobs_jax.core.masks import hard_threshold
from iobs_jax.pruning.fisher import _cholesky_inverse, _woodbury_inverse, fisher_prune


def _linear_problem(rng, m):
    """Two stacked linear maps (+ a bias) with a squared loss: analytic gradients."""
    params = {
        "a": {"bias": rng.normal(size=4), "kernel": rng.normal(size=(3, 4))},
        "b": {"kernel": rng.normal(size=(4, 2))},
    }
    x, y = rng.normal(size=(m, 3)), rng.normal(size=(m, 2))
    return params, (x, y)


def _loss(p, ex):
    x, y = ex
    h = x @ p["a"]["kernel"] + p["a"]["bias"]
    return 0.5 * jnp.sum((h @ p["b"]["kernel"] - y) ** 2)


def _numpy_grads(p, x, y):
    """Per-example gradients of the selected kernels (a/kernel, b/kernel), flattened."""
    a, bias, bk = p["a"]["kernel"], p["a"]["bias"], p["b"]["kernel"]
    h = x @ a + bias
    r = h @ bk - y
    ga = np.einsum("mi,mj->mij", x, r @ bk.T).reshape(len(x), -1)
    gb = np.einsum("mi,mj->mij", h, r).reshape(len(x), -1)
    return np.concatenate([ga, gb], axis=1)


def _reference(theta, g, sparsity, block, damping, step, newton):
    """Dense numpy Fisher OBS with a block-diagonal Fisher of (contiguous) ``block``s."""
    d, m = theta.size, len(g)
    blocks = [slice(s, min(s + block, d)) for s in range(0, d, block)]
    ginv = np.zeros((d, d))
    for sl in blocks:
        f0 = g[:, sl].T @ g[:, sl] / m
        ginv[sl, sl] = np.linalg.inv(f0 + damping * np.mean(np.diag(f0)) * np.eye(f0.shape[0]))
    t = theta - step * ginv @ g.mean(0) if newton else theta.copy()
    keep = d - int(round(sparsity * d))
    order = np.argsort(-(t**2 / np.diag(ginv)), kind="stable")
    mask = np.zeros(d, bool)
    mask[order[:keep]] = True
    out, cost = np.zeros(d), 0.0
    for sl in blocks:
        gb, tb, mb = ginv[sl, sl], t[sl], mask[sl]
        p = ~mb
        z = np.linalg.solve(gb[np.ix_(p, p)], tb[p]) if p.any() else np.zeros(0)
        out[sl] = np.where(mb, tb - gb[:, p] @ z, 0.0)
        cost += 0.5 * tb[p] @ z
    return out, mask, cost


def _selected(p):
    return np.concatenate([np.ravel(p["a"]["kernel"]), np.ravel(p["b"]["kernel"])])


def test_woodbury_inverse_equals_direct_inverse(rng):
    u = rng.normal(size=(5, 12)) * rng.uniform(0.1, 3.0, size=12)
    lam = jnp.asarray(0.05)
    direct = np.linalg.inv(u.T @ u + 0.05 * np.eye(12))
    np.testing.assert_allclose(_woodbury_inverse(jnp.asarray(u), lam), direct, rtol=1e-9)
    np.testing.assert_allclose(_cholesky_inverse(jnp.asarray(u.T @ u), lam), direct, rtol=1e-9)


# One padded block (m < D: Woodbury; m >= B: Cholesky of G^T G), block diagonal (padded or not).
@pytest.mark.parametrize("block, m", [(32, 7), (32, 60), (8, 7), (5, 60)])
@pytest.mark.parametrize("newton", [True, False])
def test_matches_dense_numpy_reference(rng, block, m, newton):
    params, (x, y) = _linear_problem(rng, m)
    pruned, rep = fisher_prune(
        _loss, params, (x, y), 0.5, block_size=block, damping=1e-3, step_size=0.7,
        newton_step=newton, batch_size=16,
    )
    ref, mask, cost = _reference(
        _selected(params), _numpy_grads(params, x, y), 0.5, block, 1e-3, 0.7, newton
    )
    np.testing.assert_array_equal(_selected(rep.masks), mask)
    np.testing.assert_allclose(_selected(pruned), ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(rep.predicted_loss_increase, cost, rtol=1e-7)
    np.testing.assert_array_equal(pruned["a"]["bias"], params["a"]["bias"])
    assert rep.masks["a"]["bias"].all() and rep.num_examples == m and rep.block_size == block


@pytest.mark.parametrize("sparsity, block", [(0.0, 8), (0.3, 5), (0.77, 8), (0.95, 32)])
def test_achieved_sparsity_is_exact(rng, sparsity, block):
    params, ex = _linear_problem(rng, 7)  # the shapes of the reference test: compiled once
    pruned, rep = fisher_prune(_loss, params, ex, sparsity, block_size=block, batch_size=16)
    d, removed = 20, int(round(sparsity * 20))
    mask = _selected(rep.masks)
    assert mask.sum() == d - removed and rep.sparsity == pytest.approx(removed / d)
    assert np.all(_selected(pruned)[~mask] == 0.0)
    assert rep.predicted_loss_increase >= 0.0 and rep.time_s > 0


def test_num_examples_uses_the_first_examples(rng):
    params, (x, y) = _linear_problem(rng, 30)
    a, rep = fisher_prune(_loss, params, (x, y), 0.5, block_size=32, num_examples=7)
    b, _ = fisher_prune(_loss, params, (x[:7], y[:7]), 0.5, block_size=32)
    assert rep.num_examples == 7
    np.testing.assert_allclose(_selected(a), _selected(b), rtol=1e-10)


def test_unused_weights_have_an_all_zero_block_and_go_first(rng):
    params, ex = _linear_problem(rng, 7)
    params["c"] = {"kernel": rng.normal(size=(2, 4))}  # not in the loss: zero gradients
    pruned, rep = fisher_prune(_loss, params, ex, 8 / 28, block_size=4, newton_step=False)
    assert not rep.masks["c"]["kernel"].any() and np.all(pruned["c"]["kernel"] == 0)
    np.testing.assert_allclose(_selected(pruned), _selected(params), rtol=1e-12)
    assert rep.predicted_loss_increase < 1e-9


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.tanh(nn.Dense(24)(x))  # Dense_0: (10, 24); Dense_1: (24, 3)
        return nn.Dense(3)(hidden)


def _mlp_problem(task, dtype=np.float64, m=256):
    """Random inputs with unequal feature scales, targets drawn from the model itself (so
    the empirical Fisher is a fair curvature estimate at ``params``)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(m, 10)) * 10 ** rng.uniform(-1, 1, size=10)).astype(dtype)
    model = _MLP()  # Linen init would compile its initializers: draw the weights here
    params = {
        "Dense_0": {"bias": 0.5 * rng.normal(size=24), "kernel": rng.normal(size=(10, 24))},
        "Dense_1": {"bias": 0.5 * rng.normal(size=3), "kernel": rng.normal(size=(24, 3))},
    }
    params = jax.tree.map(lambda a: (2 * a / np.sqrt(a.shape[0]) if a.ndim == 2 else a), params)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
    )
    out = model.apply({"params": params}, x)
    if task == "mse":
        y = (np.asarray(out) + 0.3 * rng.normal(size=out.shape)).astype(dtype)
        loss = lambda p, ex: 0.5 * jnp.sum((model.apply({"params": p}, ex[0]) - ex[1]) ** 2)
    else:
        y = np.asarray(jax.random.categorical(jax.random.key(1), out))

        def loss(p, ex):
            logits = model.apply({"params": p}, ex[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ex[1])

    mean_loss = jax.jit(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, (x, y))))
    return loss, params, (x, y), mean_loss


def _with_kernels(params, kernels):
    return {k: {**params[k], "kernel": kernels[k]} for k in params}


def test_mlp_beats_global_magnitude_and_keeps_structure():
    loss, params, ex, mean_loss = _mlp_problem("mse")
    pruned, rep = fisher_prune(loss, params, ex, 0.5, block_size=32, newton_step=False)
    assert jax.tree.structure(pruned) == jax.tree.structure(params)
    assert jax.tree.structure(rep.masks) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    for layer in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(pruned[layer]["bias"], params[layer]["bias"])
        assert rep.masks[layer]["bias"].all() and rep.masks[layer]["bias"].dtype == jnp.bool_
        assert np.all(np.asarray(pruned[layer]["kernel"])[~rep.masks[layer]["kernel"]] == 0)
    kernels = {k: v["kernel"] for k, v in params.items()}
    magnitude = _with_kernels(params, hard_threshold(kernels, 156))  # 50% of 312
    dense, fisher, mag = (float(mean_loss(p)) for p in (params, pruned, magnitude))
    assert rep.sparsity == 0.5 and rep.num_examples == 256
    assert fisher - dense < 0.25 * (mag - dense), (dense, fisher, mag)


def test_mlp_cross_entropy_hidden_layer_filter():
    loss, params, ex, mean_loss = _mlp_problem("xent")
    only = lambda path, leaf: path == "Dense_0/kernel"
    pruned, rep = fisher_prune(loss, params, ex, 0.5, filter=only, newton_step=False)
    assert rep.masks["Dense_1"]["kernel"].all() and (~rep.masks["Dense_0"]["kernel"]).sum() == 120
    np.testing.assert_array_equal(pruned["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
    magnitude = {k: v["kernel"] for k, v in params.items()}
    magnitude["Dense_0"] = hard_threshold(magnitude["Dense_0"], 120)
    dense, fisher, mag = (float(mean_loss(p)) for p in (params, pruned, _with_kernels(params,
                                                                                       magnitude)))
    assert fisher - dense < 0.5 * (mag - dense), (dense, fisher, mag)


def test_float32_params_stay_float32():
    loss, params, (x, y), _ = _mlp_problem("mse", np.float32, m=40)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    pruned, rep = fisher_prune(loss, p32, (x, y), 0.6, block_size=64, batch_size=16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(pruned))
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(pruned))
    assert rep.sparsity == pytest.approx(round(0.6 * 312) / 312)


def _bad(params, ex, **kw):
    kw = {"sparsity": 0.5, **kw}
    return fisher_prune(kw.pop("loss", _loss), params, ex, kw.pop("sparsity"), **kw)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"step_size": -1.0}, ValueError, "step_size"),
        ({"num_examples": 0}, ValueError, "num_examples"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 2.5}, TypeError, "block_size"),
        ({"damping": 0.0}, ValueError, "damping"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"damping": float("inf")}, ValueError, "damping"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"num_examples": 99}, ValueError, "num_examples"),
        ({"filter": lambda path, leaf: "conv" in path}, ValueError, "a/kernel"),
        ({"loss": lambda p, e: jnp.stack([_loss(p, e)] * 2)}, ValueError, "scalar"),
    ],
)
def test_bad_arguments_raise(rng, kw, error, match):
    params, ex = _linear_problem(rng, 6)
    with pytest.raises(error, match=match):
        _bad(params, ex, **kw)


def test_bad_examples_and_params_raise(rng):
    params, (x, y) = _linear_problem(rng, 6)
    with pytest.raises(ValueError, match="empty"):
        _bad(params, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty pytree"):
        _bad(params, ())
    with pytest.raises(ValueError, match="leading"):
        _bad(params, (x, y[:5]))
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"'a/kernel' for example 4 is not finite"):  # chunk 2
        _bad(params, (x, y), batch_size=3)
    with pytest.raises(TypeError, match="floating"):
        _bad({"w": np.ones((2, 3), np.int32)}, x[:, :2], loss=lambda p, e: 0.0,
             filter=lambda path, leaf: True)
    bad = {**params, "b": {"kernel": np.full((4, 2), np.inf)}}
    with pytest.raises(ValueError, match="b/kernel"):
        _bad(bad, (x[:3], y[:3]))


def test_filter_may_be_a_regex_like_everywhere_else():
    params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
    x = jax.random.normal(jax.random.key(0), (16, 4))

    def loss(p, ex):
        return jnp.mean((ex @ p["a"]["kernel"] @ p["b"]["kernel"]) ** 2)

    by_regex, _ = fisher_prune(loss, params, x, 0.5, filter="^a/")
    by_callable, _ = fisher_prune(loss, params, x, 0.5, filter=lambda p, _: p.startswith("a/"))
    for u, v in zip(jax.tree.leaves(by_regex), jax.tree.leaves(by_callable), strict=True):
        np.testing.assert_array_equal(u, v)
    assert bool(jnp.all(by_regex["b"]["kernel"] == 1.0))  # not selected: untouched
