"""Test configuration: float64 everywhere (oracles compare to exact answers).

Tests that check dtype preservation create float32 inputs explicitly.
"""

import gzip
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


def idx_bytes(arr, magic):
    dims = np.asarray(arr.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + arr.astype(np.uint8).tobytes()


def write_idx_split(directory, split, n=7, seed=0, gz=True):
    """Write a tiny idx image/label pair; returns (images uint8 (n, 28, 28), labels (n,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "t10k" if split == "test" else "train"
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        name = directory / f"{prefix}-{kind}-ubyte"
        data = idx_bytes(arr, magic)
        if gz:
            with gzip.open(str(name) + ".gz", "wb") as f:
                f.write(data)
        else:
            name.write_bytes(data)
    return images, labels
