"""The byte-level decoder: an independent NumPy float64 forward, causality, training,
save/load, and the corpus splits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iobs_jax import models

TINY = models.DecoderConfig(hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=24, max_seq_len=12)


def _numpy_decoder(p: dict, cfg, ids: np.ndarray) -> np.ndarray:
    """The decoder written out in NumPy (float64), from the parameter dict."""
    def norm(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x):  # x: (b, t, h, w)
        w = x.shape[-1]
        freqs = cfg.rope_theta ** (-np.arange(0, w, 2) / w)
        ang = np.arange(x.shape[1])[:, None] * freqs[None, :]
        c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
        x1, x2 = x[..., : w // 2], x[..., w // 2 :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    b, t = ids.shape
    hd, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    x = p["embed"]["embedding"][ids]
    for i in range(cfg.num_layers):
        layer = p["layers"][i]
        h = norm(x, layer["attn_norm"]["scale"])
        q = rope((h @ layer["attn"]["q"]["kernel"]).reshape(b, t, heads, hd))
        k = rope((h @ layer["attn"]["k"]["kernel"]).reshape(b, t, kv, hd))
        v = (h @ layer["attn"]["v"]["kernel"]).reshape(b, t, kv, hd)
        out = np.zeros((b, t, heads, hd))
        for head in range(heads):
            g = head // (heads // kv)
            scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, g]) / np.sqrt(hd)
            scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
            att = np.exp(scores - scores.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            out[:, :, head] = att @ v[:, :, g]
        x = x + out.reshape(b, t, -1) @ layer["attn"]["o"]["kernel"]
        h = norm(x, layer["mlp_norm"]["scale"])
        gate = h @ layer["mlp"]["gate"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["mlp"]["up"]["kernel"])) @ \
            layer["mlp"]["down"]["kernel"]
    x = norm(x, p["norm"]["scale"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("tied", [True, False])
def test_forward_equals_an_independent_numpy_implementation(tied):
    cfg = models.DecoderConfig(**{**TINY.__dict__, "tie_embeddings": tied})
    model = models.Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    # random (not the small initial) weights so every part matters
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, jnp.float64)
                                      for k, x in zip(keys, leaves, strict=True)])
    nnx.update(model, state)
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 12))
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))),
                               _numpy_decoder(pure, cfg, ids), rtol=1e-9, atol=1e-9)


def test_future_bytes_do_not_change_past_logits():
    model = models.Decoder(TINY, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 12))
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    a, b = model(jnp.asarray(ids)), model(jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-12)
    assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-6


def test_a_few_training_steps_lower_the_loss_and_save_load_round_trips(tmp_path):
    data = np.frombuffer(b"def f(x):\n    return x + 1\n\n" * 200, np.uint8)
    train = models.TrainConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup=3)
    model, history = models.train_decoder(TINY, train, data, progress=False)
    windows = models.sequential_windows(data, TINY.max_seq_len, limit=16)
    fresh = models.Decoder(TINY, rngs=nnx.Rngs(0))
    assert models.evaluate(model, windows) < 0.5 * models.evaluate(fresh, windows)
    assert history[-1][1] < history[0][1]
    models.save_decoder(model, tmp_path / "m")
    again = models.load_decoder(tmp_path / "m")
    ids = jnp.asarray(windows[:2, :-1])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 8, "colour": 1}')
    with pytest.raises(ValueError, match="unknown DecoderConfig fields"):
        models.load_decoder(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="train-lm"):
        models.load_decoder(tmp_path / "nothing")


def test_corpus_splits_are_disjoint_fixed_and_windows_cover_the_bytes(tmp_path):
    for i in range(60):
        (tmp_path / f"mod{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "other.py").write_text("never = 1\n")
    parts = {s: models.stdlib_source(s, str(tmp_path)).tobytes() for s in models.text.SPLITS}
    lines = {s: {ln for ln in p.decode().splitlines() if ln} for s, p in parts.items()}
    assert sum(len(v) for v in lines.values()) == 60
    assert not (lines["train"] & lines["test"]) and not (lines["train"] & lines["validation"])
    assert all(b"never" not in p for p in parts.values())
    data = np.arange(101, dtype=np.uint8)
    w = models.sequential_windows(data, 10)
    assert w.shape == (10, 11) and np.array_equal(w[1, 0], w[0, -1])
    targets = np.concatenate([row[1:] for row in w])
    np.testing.assert_array_equal(targets, np.arange(1, 101))
    r = models.random_windows(data, 5, 10, np.random.default_rng(0))
    assert r.shape == (5, 11) and np.all(np.diff(r, axis=1) == 1)
    tok = models.ByteTokenizer()
    assert tok.decode(tok.encode("naïve")) == "naïve"
    with pytest.raises(ValueError, match="split must be one of"):
        models.stdlib_source("dev")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        models.DecoderConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="even head width"):
        models.DecoderConfig(hidden_size=24, num_heads=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        models.Decoder(TINY, rngs=nnx.Rngs(0))(jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="warmup"):
        models.TrainConfig(steps=10, warmup=10)
