"""Test configuration: float64 everywhere (oracles compare to exact answers).

Tests that check dtype preservation create float32 inputs explicitly.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_spd(rng, d, n=None, ridge=0.0):
    """A random symmetric positive definite matrix X^T X / n (+ ridge I), float64."""
    n = 2 * d if n is None else n
    x = rng.normal(size=(n, d))
    return x.T @ x / n + ridge * np.eye(d)
