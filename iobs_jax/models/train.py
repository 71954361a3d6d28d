"""Training and evaluating the byte-level decoder with Optax.

AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient
clipping by global norm; random windows of the training split each step. Evaluation is
the mean next-byte negative log-likelihood over given windows: perplexity is its
exponential, bits per byte the NLL divided by ``ln 2``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iobs_jax.models.decoder import Decoder, DecoderConfig, next_byte_loss
from iobs_jax.models.text import random_windows

__all__ = ["TrainConfig", "train_decoder", "evaluate", "window_nll", "bits_per_byte"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
        if not (isinstance(self.warmup, int) and 0 <= self.warmup < self.steps):
            raise ValueError(f"warmup must be an int in [0, steps); got {self.warmup!r}.")
        for name in ("learning_rate", "clip_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError("weight_decay must be a finite number >= 0.")


def _optimizer(train: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, max(train.warmup, 1), train.steps, train.learning_rate / 10)
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(train.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train.weight_decay,
                                   mask=decay))


def train_decoder(cfg: DecoderConfig, train: TrainConfig, data: np.ndarray, *,
                  progress: bool | None = None,
                  log: Callable[[int, float], None] | None = None) -> tuple[Decoder, list]:
    """Train a fresh :class:`Decoder` on random windows of ``data`` (uint8 bytes).

    Returns the model and the history ``[(step, loss), ...]`` (loss in nats, every 10
    steps). ``progress`` shows a bar with the loss and tokens per second (default: when
    stderr is a terminal).
    """
    from tqdm.auto import tqdm

    model = Decoder(cfg, rngs=nnx.Rngs(train.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = _optimizer(train)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return next_byte_loss(logits, batch[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(train.seed)
    history, tokens, start = [], train.batch_size * cfg.max_seq_len, time.perf_counter()
    bar = tqdm(range(train.steps), desc="training", unit="step", leave=False,
               disable=None if progress is None else not progress)
    for i in bar:
        batch = jnp.asarray(random_windows(data, train.batch_size, cfg.max_seq_len, rng))
        params, opt_state, loss = step(params, opt_state, batch)
        if i % 10 == 0 or i == train.steps - 1:
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"training diverged at step {i} (loss {value}); "
                                         f"lower the learning rate.")
            history.append((i, value))
            rate = (i + 1) * tokens / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:,.0f}")
            if log is not None:
                log(i, value)
    return nnx.merge(graphdef, params), history


def evaluate(model: Decoder, windows: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-byte NLL (nats) over every target of ``windows`` ``(N, T + 1)``."""
    return float(np.mean(window_nll(model, windows, batch_size)))


def window_nll(model: Decoder, windows: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``(N,)`` mean next-byte NLL (nats) of each window of ``windows`` ``(N, T + 1)``
    (every window has ``T`` targets, so their mean is :func:`evaluate`); per-window
    values give paired standard errors when two models are compared on the same windows."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def per_window(state, batch):
        return jax.vmap(next_byte_loss)(nnx.merge(graphdef, state)(batch[:, :-1]),
                                        batch[:, 1:])

    out = [np.asarray(per_window(state, jnp.asarray(windows[start:start + batch_size])))
           for start in range(0, len(windows), batch_size)]
    return np.concatenate(out).astype(np.float64)


def bits_per_byte(nll: float) -> float:
    return nll / math.log(2.0)
