"""Problem generators: determinism, vmap == loop, the statistics they promise, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iobs_jax import problems as pb

KEY = jax.random.key(0)
GENERATORS = {
    "linear": functools.partial(pb.sparse_linear_regression, noise=0.1),
    "rademacher": functools.partial(pb.sparse_linear_regression, design="rademacher",
                                    prior="rademacher"),
    "logistic": pb.sparse_logistic_regression,
    "quadratic": pb.quadratic_measurements,
}
generators = pytest.mark.parametrize("name", list(GENERATORS))


@generators
def test_same_key_same_instance_and_vmap_equals_loop(name):
    gen = functools.partial(GENERATORS[name], n=12, d=10, k=3)
    keys = jnp.stack([KEY, KEY, jax.random.key(1)])
    batch = jax.jit(jax.vmap(gen))(keys)
    for x in batch:  # same key, same instance; another key, another one
        np.testing.assert_array_equal(x[0], x[1])
    assert not np.array_equal(batch.design[0], batch.design[2])
    one = jax.jit(gen)(keys[2])
    for x, y in zip(batch, one, strict=True):
        np.testing.assert_allclose(x[2], y, rtol=1e-12, atol=1e-12)
    assert one.design.shape == (12, 10) and one.observations.shape == (12,)
    assert int(one.support.sum()) == 3
    np.testing.assert_array_equal(one.support, one.x_true != 0)


def test_default_is_the_papers_problem_and_keeps_old_seeds():
    prob = pb.sparse_linear_regression(KEY, 256, 128, 16)
    # Pinned from the generator as it was before designs and priors were added.
    k_design, k_support, k_values, _ = jax.random.split(KEY, 4)
    a = jax.random.normal(k_design, (256, 128)) / jnp.sqrt(256.0)
    idx = jax.random.permutation(k_support, 128)[:16]
    x = jnp.zeros(128).at[idx].set(jax.random.normal(k_values, (16,)))
    np.testing.assert_array_equal(prob.design, a)
    np.testing.assert_array_equal(prob.x_true, x)
    np.testing.assert_allclose(prob.observations, a @ x, rtol=1e-12)


def _batch(gen, count=200, **kw):
    return jax.jit(jax.vmap(functools.partial(gen, **kw)))(jax.random.split(KEY, count))


def test_design_statistics():
    design = lambda **kw: np.asarray(_batch(pb.sparse_linear_regression, n=50, d=8, k=2,
                                            **kw).design)
    g = design()
    assert abs(float(np.mean(np.sum(g**2, axis=1))) - 1.0) < 0.02  # unit column norms
    np.testing.assert_allclose(np.abs(design(design="rademacher")), 1 / np.sqrt(50),
                               rtol=1e-12)
    c = design(design="correlated", rho=0.6)
    cov = np.mean(np.einsum("bni,bnj->bij", c, c), axis=0)  # E[A^T A] = Sigma
    lag = np.abs(np.arange(8)[:, None] - np.arange(8)[None, :])
    np.testing.assert_allclose(cov, 0.6**lag, atol=0.03)


def test_prior_and_noise_statistics():
    probs = jax.tree.map(np.asarray, _batch(pb.sparse_linear_regression, n=40, d=30, k=5,
                                            prior="rademacher", noise=0.5))
    vals = probs.x_true[probs.support]
    np.testing.assert_array_equal(jnp.abs(vals), 1.0)
    assert abs(float(jnp.mean(vals > 0)) - 0.5) < 0.05
    resid = probs.observations - np.einsum("bnd,bd->bn", probs.design, probs.x_true)
    assert abs(float(np.std(resid)) - 0.5) < 0.02
    # Uniform support: every coordinate is in it with probability k/d.
    assert np.allclose(np.mean(probs.support, axis=0), 5 / 30, atol=0.1)


def test_logistic_labels_follow_the_model_and_loss_matches_optax():
    probs = jax.tree.map(np.asarray, _batch(pb.sparse_logistic_regression, count=50, n=400,
                                            d=10, k=3))
    assert set(np.unique(probs.observations)) <= {0.0, 1.0}
    logits = np.sqrt(400) * np.einsum("bnd,bd->bn", probs.design, probs.x_true)
    p = 1 / (1 + np.exp(-logits))
    assert abs(float(np.mean(probs.observations) - np.mean(p))) < 0.01
    a, y, x = probs.design[0], probs.observations[0], probs.x_true[0]
    expected = jnp.mean(optax.sigmoid_binary_cross_entropy(np.sqrt(400) * a @ x, y))
    np.testing.assert_allclose(pb.logistic_loss(x, a, y), expected, rtol=1e-12)


def test_quadratic_measurements_and_spectral_init():
    prob = jax.jit(functools.partial(pb.quadratic_measurements, n=400, d=64, k=4))(KEY)
    np.testing.assert_allclose(prob.observations, (prob.design @ prob.x_true) ** 2, rtol=1e-12)
    assert float(pb.quadratic_loss(prob.x_true, prob.design, prob.observations)) == 0.0
    assert float(pb.quadratic_loss(-prob.x_true, prob.design, prob.observations)) == 0.0
    x0 = jax.jit(pb.spectral_init, static_argnums=2)(prob.design, prob.observations, 4)
    cos = abs(float(x0 @ prob.x_true)) / float(jnp.linalg.norm(x0) * jnp.linalg.norm(prob.x_true))
    assert cos > 0.8
    # The Hessian at x* is PSD and HVPs agree with it (a non-quadratic loss).
    import iobs_jax as ij

    h = ij.dense_hessian(pb.quadratic_loss, prob.x_true, prob.design, prob.observations)
    v = jnp.arange(64.0)
    np.testing.assert_allclose(ij.hvp(pb.quadratic_loss, prob.x_true, v, prob.design,
                                      prob.observations), h @ v, rtol=1e-10)
    assert float(jnp.linalg.eigvalsh(h).min()) > -1e-10


def test_measure_signal_and_mnist_signals():
    images = np.random.default_rng(0).uniform(size=(5, 4, 4, 1)) * (np.arange(16) % 3 == 0
                                                                       ).reshape(4, 4, 1)
    signals = pb.mnist_signals(images, 3)
    assert signals.shape == (3, 16)
    np.testing.assert_allclose(signals[1], images[1].reshape(-1) * 255)
    picked = pb.mnist_signals(images, 3, key=KEY)
    assert picked.shape == (3, 16)
    prob = jax.vmap(functools.partial(pb.measure_signal, n=20))(jax.random.split(KEY, 3),
                                                                signals)
    np.testing.assert_array_equal(prob.support, signals != 0)
    np.testing.assert_allclose(prob.observations,
                               jnp.einsum("bnd,bd->bn", prob.design, signals), rtol=1e-12)


def test_mnist_prior_from_the_real_test_set():
    from iobs_jax.mnist import load_mnist

    signals = pb.mnist_signals(load_mnist(verbose=False).images, 20)  # the packaged set
    nnz = np.asarray((signals != 0).sum(1))
    assert signals.shape == (20, 784) and 50 < nnz.mean() < 250 and float(signals.max()) == 255


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(n=0, d=5, k=2), ValueError, "n must be"),
        (dict(n=5, d=5, k=6), ValueError, "k must be"),
        (dict(n=5, d=-1, k=0), ValueError, "d must be"),
        (dict(n=5, d=5, k=2, design="nope"), ValueError, "design must be"),
        (dict(n=5, d=5, k=2, design="correlated", rho=1.0), ValueError, "rho must be"),
        (dict(n=5, d=5, k=2, prior="laplace"), ValueError, "prior must be"),
        (dict(n=5.0, d=5, k=2), TypeError, "n must be a Python int"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        pb.sparse_linear_regression(KEY, **kwargs)


def test_measure_signal_rejects_images_that_are_not_vectors():
    with pytest.raises(ValueError, match="1-D float vector"):
        pb.measure_signal(KEY, jnp.ones((4, 4)), 10)
    with pytest.raises(ValueError, match="images must be"):
        pb.mnist_signals(np.ones((3, 4)), 2)
