"""A Llama-style decoder language model over bytes, in Flax NNX.

Pre-norm Transformer blocks: RMSNorm, causal self-attention with rotary positions and
grouped-query attention (``num_kv_heads`` key/value heads shared by groups of query
heads), RMSNorm, SwiGLU MLP ``down(silu(gate(x)) * up(x))``; a final RMSNorm and the
output projection, tied to the byte embedding (``logits = h E^T``) or a separate
``lm_head``. Every projection is a bias-free ``nnx.Linear``, so each is one linear map
for :func:`iobs_jax.prune`.

Example:
  >>> cfg = DecoderConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
  ...                     intermediate_size=64, max_seq_len=16)
  >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DecoderConfig", "Decoder", "save_decoder", "load_decoder", "next_byte_loss"]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a :class:`Decoder` (the defaults: 1.7M parameters, sized so that
    ``iobs-jax train-lm`` trains it in about 25 minutes on 2 CPU cores)."""

    vocab_size: int = 256
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 3
    intermediate_size: int = 512
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be an int >= 1; got {value!r}.")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must be num_heads "
                             f"({self.num_heads}) times an even head width.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}.")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError("rope_theta and norm_eps must be > 0.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict) -> DecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields {unknown}.")
        return cls(**raw)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis."""

    def __init__(self, size: int, eps: float, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


def rotary(positions: jax.Array, width: int, theta: float, dtype=jnp.float32):
    """``(cos, sin)`` of shape ``(T, width/2)``: frequencies ``theta^(-2i/width)``."""
    freqs = theta ** (-jnp.arange(0, width, 2, dtype=dtype) / width)
    angles = positions[:, None].astype(dtype) * freqs[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the halves ``(x1, x2)`` of each head: ``(x1 c - x2 s, x2 c + x1 s)``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _linear(n_in, n_out, rngs, std, dtype):
    return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(std))


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, out_std: float, dtype):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q = _linear(d, cfg.num_heads * hd, rngs, 0.02, dtype)
        self.k = _linear(d, cfg.num_kv_heads * hd, rngs, 0.02, dtype)
        self.v = _linear(d, cfg.num_kv_heads * hd, rngs, 0.02, dtype)
        self.o = _linear(cfg.num_heads * hd, d, rngs, out_std, dtype)
        self.heads, self.kv_heads, self.width = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q = apply_rotary(self.q(x).reshape(b, t, self.heads, self.width), cos, sin)
        k = apply_rotary(self.k(x).reshape(b, t, self.kv_heads, self.width), cos, sin)
        v = self.v(x).reshape(b, t, self.kv_heads, self.width)
        group = self.heads // self.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(self.width)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        return self.o(out.reshape(b, t, self.heads * self.width))


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, out_std: float, dtype):
        self.gate = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, 0.02, dtype)
        self.up = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, 0.02, dtype)
        self.down = _linear(cfg.intermediate_size, cfg.hidden_size, rngs, out_std, dtype)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype):
        out_std = 0.02 / np.sqrt(2 * cfg.num_layers)  # residual branches start small
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, rngs, out_std, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, rngs, out_std, dtype)

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    """``Decoder(cfg, rngs=nnx.Rngs(0))(ids)`` -> next-token logits ``(B, T, vocab)``;
    ``param_dtype`` is the parameters' (and the computation's) dtype."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                               param_dtype=param_dtype,
                               embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Block(cfg, rngs, param_dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype)
        self.lm_head = (None if cfg.tie_embeddings else
                        _linear(cfg.hidden_size, cfg.vocab_size, rngs, 0.02, param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        t = ids.shape[-1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}.")
        x = self.embed(ids)
        cos, sin = rotary(jnp.arange(t), self.config.head_dim, self.config.rope_theta,
                          x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.embed.attend(x) if self.lm_head is None else self.lm_head(x)


def next_byte_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean negative log-likelihood (nats) of ``targets`` under ``logits``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ------------------------------------------------------------------ save / load


def save_decoder(model: Decoder, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (parameters by path) into ``path``."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = _flat_params(model)
    tmp = path / "model.safetensors.tmp"
    save_file({k: np.asarray(v) for k, v in flat.items()}, str(tmp))
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    return path


def load_decoder(path: str | Path) -> Decoder:
    """The :class:`Decoder` saved by :func:`save_decoder` in ``path`` (checked)."""
    from safetensors.numpy import load_file

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} has no {name}: not a saved decoder (train one "
                                    f"with `iobs-jax train-lm`).")
    try:
        cfg = DecoderConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path / 'config.json'} is not a decoder config: {err}") from None
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tensors = load_file(str(path / "model.safetensors"))
    expected = _flat_params(model)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise ValueError(f"{path / 'model.safetensors'} does not match config.json "
                         f"(missing {missing}, {len(set(tensors) - set(expected))} extra).")
    for name, value in expected.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tensors[name].shape} in the file, "
                             f"{value.shape} in config.json.")
    graphdef, state = nnx.split(model)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(tensors[_key(p)]), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _flat_params(model: Decoder) -> dict[str, Any]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
