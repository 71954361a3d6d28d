"""The model-level pruning driver: layers, capture, patterns, reports, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import iobs_jax
from iobs_jax.pruning import layerwise as _layerwise


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(8, name="out")(x)


@pytest.fixture(scope="module")
def cnn():
    model = _CNN()
    x = jax.random.normal(jax.random.key(0), (48, 6, 6, 2), jnp.float32)
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, [x[:24], x[24:]]


def test_einsum_with_per_head_letters_prunes_each_head_on_its_own():
    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Einsum((2, 3, 4), "bhd,hde->bhe", name="per_head")(x)
            return nn.Dense(3, name="out")(y.reshape(x.shape[0], -1))

    model = Heads()
    x = jax.random.normal(jax.random.key(0), (8, 2, 3))
    params = model.init(jax.random.key(1), x)["params"]
    pruned, report = iobs_jax.prune(model, params, [x], sparsity=0.5)
    assert [r.name for r in report.layers] == ["per_head", "out"]
    head = report.layers[0]
    assert head.kind == "batched" and head.problems == 2 and head.shape == (4, 3)
    kernel = np.asarray(pruned["per_head"]["kernel"])  # (h, d, e): 6 of every head's 12
    assert [int((kernel[h] != 0).sum()) for h in range(2)] == [6, 6]
    # Each head is fitted on its own inputs: the loss matches the two problems solved apart.
    xs = np.asarray(x)
    losses = []
    for h in range(2):
        w0, w = np.asarray(params["per_head"]["kernel"][h]).T, kernel[h].T
        losses.append(np.sum((xs[:, h] @ (w - w0).T) ** 2) / 8)
    assert head.loss == pytest.approx(sum(losses), rel=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "obc", "iobs"])
def test_prune_keeps_structure_dtypes_and_exact_sparsity(cnn, method):
    model, params, batches = cnn
    scope = "row" if method == "obc" else None
    pruned, report = iobs_jax.prune(model, params, batches, sparsity=0.5, method=method,
                                    scope=scope)
    assert jax.tree.structure(pruned) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(pruned["out"]["bias"], params["out"]["bias"])
    for name in ("conv", "hidden", "out"):
        kernel, mask = np.asarray(pruned[name]["kernel"]), np.asarray(report.masks[name]["kernel"])
        assert np.all(kernel[~mask] == 0)
        rows = kernel.shape[-1]
        cols = kernel.size // rows
        expect_kept = cols - round(0.5 * cols)
        if scope == "row" or method == "wanda":
            assert mask.reshape(cols, rows).sum(0).tolist() == [expect_kept] * rows
        elif method != "sparsegpt":
            assert mask.sum() == kernel.size - round(0.5 * kernel.size)
    assert [r.name for r in report.layers] == ["conv", "hidden", "out"]
    assert all(r.loss <= r.loss_masked * (1 + 1e-5) for r in report.layers) or method in (
        "magnitude", "wanda")


def test_iobs_layer_loss_below_sparsegpt_and_magnitude(cnn):
    model, params, batches = cnn
    losses = {m: iobs_jax.prune(model, params, batches, sparsity=0.7, method=m)[1].total_loss
              for m in ("magnitude", "sparsegpt", "iobs")}
    assert losses["iobs"] < losses["sparsegpt"] < losses["magnitude"]


def test_sequential_layer_inputs_come_from_the_pruned_model(cnn):
    model, params, batches = cnn
    seq, rep_seq = iobs_jax.prune(model, params, batches, sparsity=0.6, method="magnitude")
    par, rep_par = iobs_jax.prune(model, params, batches, sparsity=0.6, method="magnitude",
                                  sequential=False)
    # Same masks for magnitude, but the last layer's loss is measured on different inputs.
    np.testing.assert_array_equal(seq["out"]["kernel"], par["out"]["kernel"])
    assert rep_seq.layers[-1].output_energy != pytest.approx(rep_par.layers[-1].output_energy)
    # The sequential statistics really are those of the pruned upstream model.
    x = jnp.concatenate(batches)
    hidden = nn.relu(nn.Conv(4, (3, 3)).apply({"params": seq["conv"]}, x))
    dense_in = nn.relu(nn.Dense(16).apply({"params": seq["hidden"]},
                                          hidden.reshape(48, -1)))
    h = dense_in.T @ dense_in / 48
    w0 = params["out"]["kernel"].T
    expect = float(_layerwise.layer_loss(jnp.zeros_like(w0), w0, h))
    assert rep_seq.layers[-1].output_energy == pytest.approx(expect, rel=1e-4)


def test_nm_pattern_and_global_scope(cnn):
    model, params, batches = cnn
    pruned, report = iobs_jax.prune(model, params, batches, pattern="2:4", filter="hidden|out")
    kernel = np.asarray(pruned["hidden"]["kernel"])  # (inputs, outputs): groups along inputs
    assert np.all((kernel.T.reshape(16, -1, 4) != 0).sum(-1) <= 2)
    assert np.all(np.asarray(report.masks["hidden"]["kernel"]).T.reshape(16, -1, 4).sum(-1) == 2)
    assert np.all(np.asarray(report.masks["conv"]["kernel"]))  # filtered out: untouched
    _, report = iobs_jax.prune(model, params, batches, sparsity=0.7, scope="global")
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert report.sparsity == pytest.approx(0.7, abs=1.0 / total)
    assert len({round(r.sparsity, 3) for r in report.layers}) > 1


def test_iterations_keep_the_best_iterate_on_held_out_batches(cnn):
    model, params, batches = cnn
    one, rep_one = iobs_jax.prune(model, params, batches, sparsity=0.6, holdout_batches=1)
    it, rep_it = iobs_jax.prune(model, params, batches, sparsity=0.6, holdout_batches=1,
                                iterations=3, step_size=0.5)
    assert rep_it.sparsity == pytest.approx(rep_one.sparsity)
    assert jax.tree.structure(it) == jax.tree.structure(params)
    _, rep_par = iobs_jax.prune(model, params, batches, sparsity=0.6, holdout_batches=1,
                                iterations=2, step_size=0.5, sequential=False)
    assert [r.name for r in rep_par.layers] == ["conv", "hidden", "out"]
    with pytest.raises(ValueError, match="holdout_batches"):
        iobs_jax.prune(model, params, batches, holdout_batches=2)


def test_filter_callable_and_report_summary(cnn):
    model, params, batches = cnn
    pruned, report = iobs_jax.prune(model, params, batches,
                                    filter=lambda name, shape: name != "out")
    np.testing.assert_array_equal(pruned["out"]["kernel"], params["out"]["kernel"])
    assert "hidden" in report.summary() and len(report.layers) == 2


def test_nnx_module_is_pruned_without_touching_the_original():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(12, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    net = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (64, 12))
    pruned, report = iobs_jax.prune(net, [x], sparsity=0.5)
    assert isinstance(pruned, Net) and [r.name for r in report.layers] == ["a", "b"]
    assert float(jnp.mean(pruned.a.kernel[...] == 0)) == 0.5
    assert float(jnp.mean(net.a.kernel[...] == 0)) == 0.0
    with pytest.raises(TypeError, match="NNX module carries its own"):
        iobs_jax.prune(net, [x], [x])


def test_dense_general_model_and_tuple_batches():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x, scale):
            q = nn.DenseGeneral((2, 4), name="q")(x)
            k = nn.DenseGeneral((2, 4), name="k")(x)
            return nn.DenseGeneral(8, axis=(-2, -1), name="o")(q * k * scale)

    model = Attn()
    x = jax.random.normal(jax.random.key(0), (4, 10, 8))
    params = model.init(jax.random.key(1), x, 1.0)["params"]
    pruned, report = iobs_jax.prune(model, params, [(x, 1.0)], sparsity=0.5)
    assert [r.name for r in report.layers] == ["q", "k", "o"]
    assert all(r.shape == (8, 8) for r in report.layers)


def test_einsum_layers_are_pruned_in_linen_and_nnx():
    class Mix(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="proj")(x)

    model = Mix()
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    params = model.init(jax.random.key(1), x)["params"]
    pruned, report = iobs_jax.prune(model, params, [x], sparsity=0.5)
    assert report.layers[0].shape == (8, 8) and report.layers[0].sparsity == 0.5
    assert float(jnp.mean(pruned["proj"]["kernel"] == 0)) == 0.5

    layer = nnx.Einsum("btd,dk->btk", (8, 4), (4,), rngs=nnx.Rngs(0))
    pruned_layer, report = iobs_jax.prune(layer, [x], sparsity=0.75)
    assert report.layers[0].shape == (4, 8)
    assert float(jnp.mean(pruned_layer.kernel[...] == 0)) == 0.75


def test_non_finite_activations_name_the_layer():
    class Overflow(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="after")(jnp.exp(1e3 * nn.Dense(4, name="before")(x)))

    model = Overflow()
    x = jnp.ones((3, 5))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="non-finite activations at the input of layer after"):
        iobs_jax.prune(model, params, [x])


def test_bad_inputs_give_clear_errors(cnn):
    model, params, batches = cnn
    with pytest.raises(ValueError, match="sparsity"):
        iobs_jax.prune(model, params, batches, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        iobs_jax.prune(model, params, batches, sparsity=-0.1)
    with pytest.raises(ValueError, match="filter selected no layer.*hidden"):
        iobs_jax.prune(model, params, batches, filter="nothing-like-this")
    with pytest.raises(ValueError, match="calib_batches"):
        iobs_jax.prune(model, params, [jnp.ones((4, 5, 5))])
    with pytest.raises(ValueError, match="NaN or inf"):
        iobs_jax.prune(model, params, [batches[0].at[0, 0, 0, 0].set(jnp.nan)])
    with pytest.raises(ValueError, match="method"):
        iobs_jax.prune(model, params, batches, method="nope")
    with pytest.raises(ValueError, match="pattern"):
        iobs_jax.prune(model, params, batches, pattern="4:2")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        iobs_jax.prune(model, params, batches, pattern="2:4")  # conv has 18 inputs
    with pytest.raises(ValueError, match="obc"):
        iobs_jax.prune(model, params, batches, method="obc", scope="layer")
    with pytest.raises(ValueError, match="calib_batches is required"):
        iobs_jax.prune(model, params)
    with pytest.raises(TypeError, match="flax"):
        iobs_jax.prune(object(), params, batches)


def test_huge_calibration_inputs_give_the_same_masks_and_finite_losses(cnn):
    """Inputs around 1e20 square to 1e40, beyond float32: the statistics are kept scaled."""
    model, params, batches = cnn
    small, rep_small = iobs_jax.prune(model, params, batches, sparsity=0.5)
    huge, rep_huge = iobs_jax.prune(model, params, [b * 1e20 for b in batches], sparsity=0.5)
    for a, b in zip(jax.tree.leaves(rep_small.masks), jax.tree.leaves(rep_huge.masks),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(r.loss) and r.loss > 0 for r in rep_huge.layers)
    # the first layer is linear in its input: its loss scales by exactly 1e40
    assert rep_huge.layers[0].loss == pytest.approx(rep_small.layers[0].loss * 1e40, rel=1e-4)


def test_params_that_do_not_fit_the_model_are_named(cnn):
    model, params, batches = cnn
    wrong = {**params, "hidden": {**params["hidden"], "kernel": params["hidden"]["kernel"][:5]}}
    with pytest.raises(ValueError, match="params 'hidden/kernel' has shape"):
        iobs_jax.prune(model, wrong, batches)
    missing = {k: v for k, v in params.items() if k != "out"}
    with pytest.raises(ValueError, match="params has no 'out/"):
        iobs_jax.prune(model, missing, batches)
    with pytest.raises(ValueError, match="params: hidden/kernel contains NaN"):
        bad = {**params, "hidden": {**params["hidden"],
                                     "kernel": params["hidden"]["kernel"].at[0, 0].set(np.nan)}}
        iobs_jax.prune(model, bad, batches)


def test_held_out_batches_hold_at_most_half_the_samples(cnn):
    model, params, batches = cnn
    x = jnp.concatenate(batches)
    with pytest.raises(ValueError, match="hold 47 of the 48 calibration samples"):
        iobs_jax.prune(model, params, [x[:1], x[1:]], holdout_batches=1, iterations=2)
    iobs_jax.prune(model, params, [x[:24], x[24:]], holdout_batches=1, iterations=2)
