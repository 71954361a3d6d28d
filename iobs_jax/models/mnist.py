"""MNIST data, two small Flax (Linen) classifiers and a training loop, for pruning experiments.

Nothing is ever downloaded. The package ships the 10,000 MNIST test images (the idx files,
``iobs_jax/data/mnist``; licence and source in the README there); :func:`load_mnist` reads
them by default, or the standard idx files from ``path`` or ``$IOBS_JAX_DATA`` (for the full
70,000-image set).

Example::

    data = load_mnist()                          # images (N, 28, 28, 1) float32 in [0, 1]
    train, test = split_train_test(data, 8000)
    params = train_classifier(MLP(), train.images, train.labels, key=jax.random.key(0))
    print(accuracy(MLP(), params, test.images, test.labels))
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iobs_jax.core.validation import check_int, check_key

__all__ = ["MNIST", "DataNotFoundError", "load_mnist", "split_train_test", "MLP", "CNN",
           "train_classifier", "accuracy", "cross_entropy"]

ENV_VAR = "IOBS_JAX_DATA"
_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}


class DataNotFoundError(FileNotFoundError, ValueError):
    """MNIST files are missing where they were asked for: a FileNotFoundError (what it is)
    and a ValueError (a bad argument: ``path``, ``split`` or ``$IOBS_JAX_DATA``)."""


class MNIST(NamedTuple):
    """A labelled image set.

    Attributes:
      images: ``(N, 28, 28, 1)`` float32 in ``[0, 1]``.
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


def packaged_dir() -> Path:
    """The folder of the MNIST test files shipped inside the package."""
    return Path(str(importlib.resources.files("iobs_jax") / "data" / "mnist"))


@functools.lru_cache(maxsize=1)
def _packaged() -> MNIST:
    # Read once per process (about 0.1 s); callers get fresh arrays via _copy.
    data = _load_dir(packaged_dir(), "test", verbose=False)
    if data is None:
        raise DataNotFoundError(
            f"the MNIST files shipped with iobs_jax are missing from {packaged_dir()} (a "
            f"broken install: reinstall iobs_jax), or set ${ENV_VAR} to a folder of idx files.")
    return data._replace(source=f"MNIST test set shipped with iobs_jax ({len(data.labels):,} "
                                f"images; set ${ENV_VAR} or pass a path for the full set)")


def _copy(data: MNIST) -> MNIST:
    return MNIST(data.images.copy(), data.labels.copy(), data.source)


def load_mnist(path: str | os.PathLike | None = None, *, split: str = "test",
               verbose: bool = True) -> MNIST:
    """Load MNIST as float32 images in ``[0, 1]`` and int32 labels.

    Looks in ``path`` (a directory with ``t10k-*``/``train-*`` ``images-idx3-ubyte`` and
    ``labels-idx1-ubyte`` files, ``.gz`` or not), else ``$IOBS_JAX_DATA`` or
    ``$IOBS_JAX_DATA/mnist``, else uses the 10,000 test images shipped with the package.
    ``split`` picks the test (10,000) or train (60,000) files; a directory holding only
    train files serves ``"test"`` too (said in ``source``, printed if ``verbose``), never
    the reverse. The packaged data has the test split only.

    Returns :class:`MNIST`: ``images`` ``(N, 28, 28, 1)`` float32, ``labels`` ``(N,)`` int32.
    Raises FileNotFoundError if ``path`` (or ``$IOBS_JAX_DATA``) lacks the files, or for
    ``split="train"`` without one, and ValueError for a bad ``split`` or a corrupt idx file.

    Example: ``load_mnist().images.shape`` -> ``(10000, 28, 28, 1)``.
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
            raise DataNotFoundError(f"{str(directory)!r} {why} MNIST {split} files {wanted}.")
        return data
    if os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR]).expanduser()
        for directory in (base, base / "mnist"):
            data = _load_dir(directory, split, verbose) if directory.is_dir() else None
            if data is not None:
                return data
        # A variable that is set but wrong is a mistake to report, not to paper over.
        raise DataNotFoundError(f"${ENV_VAR}={str(base)!r}: neither it nor its mnist/ "
                                f"subfolder has MNIST {split} files {wanted}.")
    if split == "train":
        raise DataNotFoundError(
            f"the MNIST data shipped with iobs_jax is the 10,000-image test set only; for the "
            f"train files {wanted} pass a directory holding them (path; --data on the command "
            f"line) or set ${ENV_VAR}.")
    return _copy(_packaged())


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
    order = np.arange(n) if key is None else np.asarray(
        jax.random.permutation(check_key(key, "key"), n))
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
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise TypeError(f"images must be numbers; got dtype {images.dtype}.")
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or inf values; clean them before calling.")
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
                     weight_decay: float = 0.0, progress: bool = False) -> Any:
    """Initialise ``model`` from ``key`` and train it with AdamW on softmax cross-entropy.

    ``images`` ``(N, H, W, C)``, ``labels`` ``(N,)`` ints in ``[0, num_classes)``. Each epoch
    reshuffles (from ``key``) and takes ``N // batch_size`` full batches; one jitted epoch
    (a ``lax.scan`` over train steps) is compiled once. ``progress=True`` shows a bar on
    stderr with each epoch's mean loss. Returns the ``"params"`` collection (what
    :func:`iobs_jax.prune` and :func:`accuracy` take). Raises ValueError if the loss turns
    NaN/inf (a learning rate too large for the data) instead of returning NaN weights.
    Example: ``params = train_classifier(MLP(), x, y, key=jax.random.key(0), epochs=2)``.
    """
    images, labels = _check_data(images, labels)
    key = check_key(key, "key")
    epochs = check_int(epochs, "epochs", low=0)
    batch_size = min(check_int(batch_size, "batch_size", low=1), len(labels))
    _check_rates(learning_rate, weight_decay)
    init_key, key = jax.random.split(key)
    init = jax.eval_shape(model.init, init_key, images[:1])["params"]
    _check_labels(model, init, images, labels)
    params = model.init(init_key, images[:1])["params"]
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    epoch = _epoch_fn(model, tx, len(labels), batch_size)
    opt_state = tx.init(params)
    from iobs_jax.core.progress import progress_bar

    with progress_bar(epochs, "training", enabled=progress, unit="epoch") as bar:
        for k in jax.random.split(key, epochs) if epochs else []:
            params, opt_state, loss = epoch(params, opt_state, images, labels, k)
            loss = float(loss)  # one number per epoch: also paces the bar
            if not np.isfinite(loss):
                raise ValueError(f"training diverged: the mean loss of epoch {bar.n + 1} is "
                                 f"{loss}; lower learning_rate (got {learning_rate}).")
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
    if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params)):
        raise ValueError(f"training diverged: the weights are NaN/inf after {epochs} epochs; "
                         f"lower learning_rate (got {learning_rate}).")
    return params


def _check_rates(learning_rate: Any, weight_decay: Any) -> None:
    for name, value, low in (("learning_rate", learning_rate, "> 0"),
                             ("weight_decay", weight_decay, ">= 0")):
        if name == "learning_rate" and callable(value):
            continue  # an Optax schedule
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(
            value) and (value > 0 if low == "> 0" else value >= 0)
        if not ok:
            raise ValueError(f"{name} must be a finite number {low}; got {value!r}.")


def _epoch_fn(model: nn.Module, tx: optax.GradientTransformation, n: int, batch_size: int):
    """One jitted epoch: a scan over ``n // batch_size`` shuffled batches; also returns the
    epoch's mean training loss."""
    nb = n // batch_size

    @jax.jit
    def epoch(params, opt_state, x, y, k):
        batches = jax.random.permutation(k, n)[: nb * batch_size].reshape(nb, batch_size)

        def step(carry, idx):
            p, s = carry
            loss, grads = jax.value_and_grad(
                lambda p: _xent(model.apply({"params": p}, x[idx]), y[idx]).mean()
            )(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.mean(losses)

    return epoch


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
