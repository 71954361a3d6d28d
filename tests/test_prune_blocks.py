"""Sequence-model pruning: token masks, dense-model targets, block-by-block pruning, and
``iobs-jax prune-transformer`` on a tiny BERT checkpoint."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iobs_jax as ij
from iobs_jax import bert
from iobs_jax.cli import main as _cli
from iobs_jax.pruning import layerwise as lw

pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a man is playing guitar on the street",
             "return the value", "read data from each file and write a new list",
             "the quiet dog", "open this file", "close that old file with the new data",
             "a warm mat", "the dog sat", "write the list to a file"]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    model, params, tok = bert.load_bert(tiny_bert_dir[0])
    return model, params, tok


def _tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_block_by_block_equals_whole_model_sequential_pruning(tiny):
    model, params, tok = tiny
    batches = [tok(SENTENCES[:5]), tok(SENTENCES[5:])]
    opts = dict(method="sparsegpt", sparsity=0.5, damping=0.01)
    by_block, rep_b = bert.prune_encoder(model, params, batches, **opts)
    whole, rep_w = ij.prune(model, params, batches, filter="layer_",
                            sample_mask=lambda b: b["attention_mask"], **opts)
    assert [r.name for r in rep_b.layers] == [
        f"block_{i}/{n}" for i in range(2)
        for n in ("query", "key", "value", "attention_output", "intermediate", "output")]
    _tree_allclose(rep_b.masks, rep_w.masks)
    _tree_allclose(by_block, whole, atol=2e-5)


def test_padding_is_left_out_of_the_statistics(tiny):
    model, params, tok = tiny
    short = [tok(SENTENCES[:5]), tok(SENTENCES[5:])]
    padded = [tok(SENTENCES[:5], length=48), tok(SENTENCES[5:], length=40)]
    a, rep_a = bert.prune_encoder(model, params, short, method="sparsegpt", sparsity=0.5)
    b, rep_b = bert.prune_encoder(model, params, padded, method="sparsegpt", sparsity=0.5)
    _tree_allclose(rep_a.masks, rep_b.masks)
    _tree_allclose(a, b, atol=5e-5)
    # Without the mask the padded positions change the statistics (and the result).
    unmasked, _ = ij.prune(model, params, padded, method="iobs", sparsity=0.5,
                           filter="layer_0/query")
    masked, _ = ij.prune(model, params, padded, method="iobs", sparsity=0.5,
                         filter="layer_0/query", sample_mask=lambda b: b["attention_mask"])
    k_un = np.asarray(unmasked["layer_0"]["query"]["kernel"])
    k_ma = np.asarray(masked["layer_0"]["query"]["kernel"])
    assert np.abs(k_un - k_ma).max() > 1e-3


def test_encoder_report_masks_and_patterns(tiny):
    model, params, tok = tiny
    batches = [tok(SENTENCES)]
    pruned, report = bert.prune_encoder(model, params, batches, method="iobs", pattern="2:4",
                                        target="dense")
    assert len(report.layers) == 12 and report.sparsity == pytest.approx(0.5)
    assert jax.tree.structure(report.masks) == jax.tree.structure(params)
    assert all(np.all(m) for m in jax.tree.leaves(report.masks["embeddings"]))
    for i in range(2):
        for name in ("query", "intermediate", "output"):
            kernel = np.asarray(pruned[f"layer_{i}"][name]["kernel"])  # (in, out)
            groups = (kernel.T != 0).reshape(kernel.shape[1], -1, 4).sum(-1)
            assert groups.max() <= 2
            mask = np.asarray(report.masks[f"layer_{i}"][name]["kernel"])
            assert np.all(kernel[~mask] == 0)
    assert jax.tree.map(lambda x: x.dtype, pruned) == jax.tree.map(lambda x: x.dtype, params)


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6, name="first")(x))
        return nn.Dense(3, name="second")(h)


def _two_layer(rng):
    model = _TwoLayer()
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    x = jnp.asarray(rng.normal(size=(200, 5)))
    return model, params, x


def test_dense_target_fits_the_dense_models_outputs(rng):
    model, params, x = _two_layer(rng)
    pruned, report = ij.prune(model, params, [x[:100], x[100:]], method="iobs", sparsity=0.5,
                              target="dense", damping=1e-10, hessian_dtype=jnp.float64)
    hp = np.tanh(x @ np.asarray(pruned["first"]["kernel"]) + np.asarray(pruned["first"]["bias"]))
    hd = np.tanh(x @ np.asarray(params["first"]["kernel"]) + np.asarray(params["first"]["bias"]))
    w0, w = np.asarray(params["second"]["kernel"]), np.asarray(pruned["second"]["kernel"])
    # The reported loss of the second layer is its error against the DENSE model's outputs.
    first, second = report.layers
    assert second.loss == pytest.approx(np.sum((hp @ w - hd @ w0) ** 2) / 200, rel=1e-6)
    assert second.output_energy == pytest.approx(np.sum((hd @ w0) ** 2) / 200, rel=1e-9)
    assert first.loss <= first.loss_masked  # the first layer sees dense inputs: local = dense
    # The dense-target loss and its least-squares point, against direct computations.
    stats = lw.LayerStats(jnp.asarray(hp.T @ hp / 200), jnp.asarray(hd.T @ hp / 200),
                          jnp.asarray(hd.T @ hd / 200))
    for v in (w0, 0.5 * w0, np.zeros_like(w0)):
        direct = np.sum((hp @ v - hd @ w0) ** 2) / 200
        assert float(lw.target_loss(jnp.asarray(v.T), jnp.asarray(w0.T), stats)) == (
            pytest.approx(direct, rel=1e-9))
    w_ls = np.linalg.lstsq(hp, hd @ w0, rcond=None)[0]
    w_target = lw.dense_target(jnp.asarray(w0.T), stats, lw.damp_hessian(stats.h, 1e-12))
    np.testing.assert_allclose(np.asarray(w_target).T, w_ls, atol=1e-6)
    # The pruned second layer is the OBS refit of that point on its support: its loss is at
    # most the loss of the least-squares point masked without compensation.
    mask = w != 0
    assert second.loss <= np.sum((hp @ (w_ls * mask) - hd @ w0) ** 2) / 200 + 1e-12


def test_dense_targets_lower_the_final_output_error(rng):
    model, params, x = _two_layer(rng)
    batches = [x[:100], x[100:]]
    out = {}
    for target in ("local", "dense"):
        pruned, _ = ij.prune(model, params, batches, method="iobs", sparsity=0.5, target=target)
        out[target] = float(jnp.mean((model.apply({"params": pruned}, x)
                                      - model.apply({"params": params}, x)) ** 2))
    assert out["dense"] < out["local"]


def test_sequence_options_are_validated(rng, tiny):
    model, params, x = _two_layer(rng)
    with pytest.raises(ValueError, match="needs sequential=True"):
        ij.prune(model, params, [x], target="dense", sequential=False)
    with pytest.raises(ValueError, match="target must be one of"):
        ij.prune(model, params, [x], target="global")
    with pytest.raises(ValueError, match="only used with target='dense'"):
        ij.prune(model, params, [x], dense_batches=[x])
    with pytest.raises(ValueError, match="dense_batches has 2 batches"):
        ij.prune(model, params, [x], target="dense", dense_batches=[x, x])
    with pytest.raises(ValueError, match="0/1 array"):
        ij.prune(model, params, [x], sample_mask=lambda b: np.full(b.shape[0], 0.5))
    with pytest.raises(ValueError, match="all zero"):
        ij.prune(model, params, [x], sample_mask=lambda b: np.zeros(b.shape[0]))
    with pytest.raises(ValueError, match="sample_mask has 1 arrays"):
        ij.prune(model, params, [x, x], sample_mask=[np.ones(200)])
    with pytest.raises(TypeError, match="sample_mask must be"):
        ij.prune(model, params, [x], sample_mask=3)
    with pytest.raises(ValueError, match="does not line up"):
        ij.prune(model, params, [x], sample_mask=lambda b: np.ones(7))
    bmodel, bparams, tok = tiny
    with pytest.raises(TypeError, match="tokenizer output"):
        bert.prune_encoder(bmodel, bparams, [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="equal length"):
        ij.prune_blocks(bmodel.blocks(), [bparams["layer_0"]], [])
    with pytest.raises(ValueError, match="sequential by construction"):
        ij.prune_blocks(bmodel.blocks()[:1], [bparams["layer_0"]], [(x,)], sequential=False)


# ------------------------------------------------------------------ command line


def test_prune_transformer_command_writes_the_report(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = _cli.main(["prune-transformer", "--checkpoint", str(tiny_bert_dir[0]),
                      "--methods", "magnitude,iobs", "--patterns", "unstructured,2:4",
                      "--iterations", "2", "--calib", "24", "--eval", "12",
                      "--batch-size", "8", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = json.loads((out / "report.json").read_text())
    assert [(r["method"], r["pattern"], r["iterations"]) for r in records] == [
        ("magnitude", "unstructured", 1), ("iobs", "unstructured", 2), ("magnitude", "2:4", 1),
        ("iobs", "2:4", 2)]
    keys = {"method", "pattern", "sparsity", "mean_cosine", "nn_agreement", "layer_loss",
            "seconds"}
    for r in records:
        assert keys <= set(r)
        assert r["sparsity"] == pytest.approx(0.5)
        assert -1.0 <= r["mean_cosine"] <= 1.0 and 0.0 <= r["nn_agreement"] <= 1.0
    # The second-order method reconstructs far better than magnitude on the same layers.
    by = {(r["method"], r["pattern"], r["iterations"]): r for r in records}
    assert by["iobs", "unstructured", 2]["layer_loss"] < by["magnitude", "unstructured", 1][
        "layer_loss"]
    assert (out / "prune_transformer.png").stat().st_size > 1000 or not _has_matplotlib()
    assert "mean_cosine" not in capsys.readouterr().err


def _has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "magnitude,foo"], "--methods: unknown method 'foo'"),
    (["--patterns", "3-4"], "--patterns: '3-4'"),
    (["--iterations", "1,x"], "--iterations"),
    (["--calib", "0"], "--calib must be >= 1"),
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--checkpoint", "/nonexistent/bert"], "--checkpoint"),
])
def test_prune_transformer_bad_options_are_one_line_errors(tiny_bert_dir, tmp_path, capsys,
                                                          extra, needle):
    args = ["prune-transformer", "--checkpoint", str(tiny_bert_dir[0]), "--calib", "8",
            "--eval", "4", "--out", str(tmp_path / "o")]
    assert _cli.main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
