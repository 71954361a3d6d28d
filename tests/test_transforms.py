"""Contract tests for the Optax sparsity transformations (iobs_jax.optax)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import iobs_jax
from iobs_jax import optax as iox


def _problem(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), dtype),
                        "bias": jnp.zeros(4, dtype)},
              "out": {"kernel": jnp.asarray(rng.standard_normal((4, 4)), dtype)}}
    x = jnp.asarray(rng.standard_normal((32, 8)), dtype)
    y = jnp.asarray(rng.standard_normal((32, 4)), dtype)

    def loss(p, xb=x, yb=y):
        h = jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] - yb) ** 2)

    def example_loss(p, xi, yi):
        return loss(p, xi[None], yi[None])

    per_example = jax.vmap(jax.grad(example_loss), (None, 0, 0))
    return params, loss, per_example, x, y


TRANSFORMS = {
    "iht-adam": lambda: optax.chain(optax.adam(1e-2), iox.hard_threshold(0.75)),
    "iht-per-leaf": lambda: optax.chain(optax.sgd(0.1), iox.hard_threshold(0.5, per_leaf=True)),
    "iht-2:4": lambda: optax.chain(optax.sgd(0.1), iox.hard_threshold(0.5, pattern="2:4")),
    "gmp-cubic": lambda: optax.chain(
        optax.adam(1e-2), iox.hard_threshold(iox.cubic_sparsity_schedule(0.75, 2, 6))),
    "iobs-fisher": lambda: iox.iobs(0.5, 0.75, curvature="fisher", damping=1e-2),
    "iobs-cg": lambda: iox.iobs(0.5, 0.75, curvature="cg", damping=1e-2),
    "iobs-diagonal": lambda: iox.iobs(1e-2, 0.75, curvature="diagonal"),
}


def _expected_zeros(name, step):
    kernels = 32 + 16
    if name == "gmp-cubic":
        s = float(iox.cubic_sparsity_schedule(0.75, 2, 6)(step))
        return round(s * kernels)
    return kernels // 2 if name in ("iht-per-leaf", "iht-2:4") else 36


def _step_fn(tx, loss, per_example, x, y):
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, loss_fn=loss,
                                   per_example_grads=per_example(params, x, y))
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_scheduled_number_of_nonzeros_after_every_update(name):
    params, loss, per_example, x, y = _problem()
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, loss, per_example, x, y))
    start = float(loss(params))
    for i in range(8):
        params, state = step(params, state)
        zeros = int(sum(jnp.sum(params[k]["kernel"] == 0) for k in ("dense", "out")))
        assert zeros == _expected_zeros(name, i), (name, i)
        assert bool(jnp.all(params["dense"]["bias"] == params["dense"]["bias"]))
    if name == "iht-2:4":
        groups = (params["dense"]["kernel"] != 0).T.reshape(4, 2, 4).sum(-1)
        assert np.all(np.asarray(groups) == 2)
    assert float(loss(params)) < 2 * start  # training, not diverging


@pytest.mark.parametrize("name", ["iht-adam", "iobs-fisher", "iobs-diagonal"])
def test_jit_equals_no_jit_and_no_retrace(name):
    params, loss, per_example, x, y = _problem()
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    traces = []

    def counted(p, s):
        traces.append(1)
        return _step_fn(tx, loss, per_example, x, y)(p, s)

    jitted = jax.jit(counted)
    p1, s1 = jitted(params, state)
    p1, s1 = jitted(p1, s1)
    p2, s2 = _step_fn(tx, loss, per_example, x, y)(params, state)
    p2, s2 = _step_fn(tx, loss, per_example, x, y)(p2, s2)
    assert len(traces) == 1
    # float32 Woodbury divides by the damping (1e-2): fusion-order round-off is amplified.
    tol = 2e-3 if name == "iobs-fisher" else 2e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), p1, p2)
    # state structure and dtypes survive an update, jit and tree.map
    init = tx.init(params)
    assert jax.tree.structure(init) == jax.tree.structure(s1)
    assert [a.dtype for a in jax.tree.leaves(init)] == [a.dtype for a in jax.tree.leaves(s1)]
    jax.tree.map(lambda a: a, s1)


def test_chained_with_clipping_weight_decay_and_optax_masked():
    params, loss, per_example, x, y = _problem()
    kernels_only = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2, weight_decay=1e-2),
        optax.masked(iox.hard_threshold(0.5, filter=lambda path, leaf: True), kernels_only),
    )
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, loss, per_example, x, y))
    for _ in range(5):
        params, state = step(params, state)
        zeros = sum(int(jnp.sum(params[k]["kernel"] == 0)) for k in ("dense", "out"))
        assert zeros == 24


def test_donated_buffers_and_checkpoint_round_trip():
    from flax import serialization

    params, loss, per_example, x, y = _problem()
    tx = optax.chain(optax.adam(1e-2), iox.hard_threshold(0.75))
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, loss, per_example, x, y), donate_argnums=(0, 1))
    params, state = step(params, state)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    params, state = step(params, restored)
    assert sum(int(jnp.sum(params[k]["kernel"] == 0)) for k in ("dense", "out")) == 36


def test_periodic_mask_updates_hold_the_mask_in_between():
    params, loss, per_example, x, y = _problem()
    tx = optax.chain(optax.sgd(0.5), iox.hard_threshold(0.5, update_every=3))
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, loss, per_example, x, y))
    masks = []
    for _ in range(6):
        params, state = step(params, state)
        masks.append(np.asarray(params["dense"]["kernel"] != 0))
    assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[1], masks[2])


def test_iobs_fisher_projection_matches_dense_reference():
    params, loss, per_example, x, y = _problem(jnp.float64)  # x64 is on (conftest)
    tx = iox.iobs(1.0, 0.5, curvature="fisher", damping=1e-1, filter=lambda path, leaf: True)
    grads = jax.grad(loss)(params)
    pe = per_example(params, x, y)
    updates, _ = tx.update(grads, tx.init(params), params, per_example_grads=pe)
    flat_p, unravel = jax.flatten_util.ravel_pytree(params)
    g = jax.flatten_util.ravel_pytree(grads)[0]
    rows = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(pe))
    c = rows.T @ rows / 32 + 0.1 * np.eye(flat_p.size)
    ginv = np.linalg.inv(c)
    target = np.asarray(flat_p) - ginv @ np.asarray(g)
    keep = np.argsort(-(target**2 / np.diag(ginv)), kind="stable")[: flat_p.size // 2]
    mask = np.zeros(flat_p.size, bool)
    mask[keep] = True
    removed = ~mask
    expect = target - ginv[:, removed] @ np.linalg.solve(ginv[np.ix_(removed, removed)],
                                                        target[removed])
    got = np.asarray(jax.flatten_util.ravel_pytree(optax.apply_updates(params, updates))[0])
    np.testing.assert_allclose(got, np.where(mask, expect, 0.0), atol=1e-8)


def test_with_flax_train_state_and_nnx_optimizer():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))

    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = jax.random.normal(jax.random.key(1), (32, 4))
    model = Net()
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(2), x)["params"],
        tx=optax.chain(optax.adam(1e-2), iox.hard_threshold(0.8)))

    @jax.jit
    def train_step(state):
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(
            state.params)
        return state.apply_gradients(grads=grads)

    for _ in range(3):
        state = train_step(state)
    kernels = [state.params[k]["kernel"] for k in ("Dense_0", "Dense_1")]
    assert sum(int(jnp.sum(k == 0)) for k in kernels) == round(0.8 * (128 + 64))

    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(lin, optax.chain(optax.sgd(0.1), iox.hard_threshold(0.5)),
                        wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)

    for _ in range(2):
        nnx_step(lin, opt)
    assert int(jnp.sum(lin.kernel[...] == 0)) == 16


def test_misuse_gives_clear_errors():
    params, loss, per_example, x, y = _problem()
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            iox.hard_threshold(bad)
    with pytest.raises(ValueError, match="selects no parameter"):
        iox.hard_threshold(0.5, filter=lambda path, leaf: False).init(params)
    with pytest.raises(ValueError, match="params"):
        iox.hard_threshold(0.5).update(params, iox.hard_threshold(0.5).init(params))
    tx = iox.iobs(0.1, 0.5, curvature="fisher")
    with pytest.raises(ValueError, match="per_example_grads"):
        tx.update(params, tx.init(params), params)
    tx = iox.iobs(0.1, 0.5, curvature="cg")
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="curvature"):
        iox.iobs(0.1, 0.5, curvature="newton")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        iox.hard_threshold(0.5, pattern="2:4").init({"k": jnp.ones((6, 3))})
    with pytest.raises(ValueError, match="'n:m'"):
        iox.hard_threshold(0.5, pattern="two:four")
    with pytest.raises(ValueError, match="2\\+ dims"):
        iox.hard_threshold(0.5, pattern="2:4", filter=lambda path, leaf: True).init(params)
    assert iobs_jax.optax is iox
