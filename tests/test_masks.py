"""Top-k, hard thresholding and N:M masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iobs_jax as ij


def reference_topk(scores, k):
    """Stable descending sort: equal scores keep the lower index first."""
    order = np.argsort(-np.asarray(scores).ravel(), kind="stable")
    mask = np.zeros(np.size(scores), bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(scores))


@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_topk_mask_matches_stable_sort_reference(rng, k):
    scores = rng.normal(size=(4, 5))
    mask = ij.topk_mask(jnp.asarray(scores), k)
    assert mask.dtype == jnp.bool_ and mask.shape == (4, 5)
    assert int(mask.sum()) == k
    np.testing.assert_array_equal(mask, reference_topk(scores, k))


def test_topk_mask_breaks_ties_towards_lower_index():
    scores = jnp.array([1.0, 3.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(ij.topk_mask(scores, 2), [False, True, True, False, False])
    np.testing.assert_array_equal(ij.topk_mask(jnp.zeros(4), 2), [True, True, False, False])


def test_topk_mask_on_pytree_counts_globally(rng):
    tree = {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(4,)))}
    mask = ij.topk_mask(tree, 5)
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    flat = np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])
    got = np.concatenate([np.ravel(mask["a"]), np.ravel(mask["b"])])
    np.testing.assert_array_equal(got, reference_topk(flat, 5))


@pytest.mark.parametrize("k", [-1, 21])
def test_topk_mask_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        ij.topk_mask(jnp.ones((4, 5)), k)


def test_topk_mask_rejects_non_integer_k():
    with pytest.raises(TypeError, match="Python int"):
        ij.topk_mask(jnp.ones(4), 2.0)


def test_topk_mask_under_jit_and_vmap(rng):
    scores = jnp.asarray(rng.normal(size=(6, 10)))
    batched = jax.jit(jax.vmap(lambda s: ij.topk_mask(s, 3)))(scores)
    looped = np.stack([ij.topk_mask(s, 3) for s in scores])
    np.testing.assert_array_equal(batched, looped)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_hard_threshold_keeps_largest_magnitudes_and_dtype(rng, dtype):
    x = jnp.asarray(rng.normal(size=12), dtype)
    out = ij.hard_threshold(x, 4)
    assert out.dtype == dtype
    keep = reference_topk(np.abs(np.asarray(x, np.float64)), 4)
    np.testing.assert_array_equal(np.asarray(out != 0), keep)
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(x)[keep])


def test_hard_threshold_pytree_is_global(rng):
    tree = [jnp.asarray([10.0, 0.1]), jnp.asarray([[5.0, -7.0], [0.2, 0.3]])]
    out = ij.hard_threshold(tree, 3)
    np.testing.assert_array_equal(out[0], [10.0, 0.0])
    np.testing.assert_array_equal(out[1], [[5.0, -7.0], [0.0, 0.0]])


def reference_nm(scores, n, m):
    out = np.zeros(scores.shape, bool)
    for g in range(scores.shape[-1] // m):
        block = scores[..., g * m : (g + 1) * m]
        for idx in np.ndindex(block.shape[:-1]):
            keep = np.argsort(-block[idx], kind="stable")[:n]
            out[idx + (g * m + keep,)] = True
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (0, 4), (4, 4)])
def test_nm_mask_keeps_n_of_every_m(rng, n, m):
    scores = rng.normal(size=(3, 16))
    mask = np.asarray(ij.nm_mask(jnp.asarray(scores), n, m))
    assert (mask.reshape(3, 16 // m, m).sum(-1) == n).all()
    np.testing.assert_array_equal(mask, reference_nm(scores, n, m))


def test_nm_mask_along_other_axis(rng):
    scores = rng.normal(size=(8, 3))  # a Dense kernel: (inputs, outputs), groups of inputs
    mask = np.asarray(ij.nm_mask(jnp.asarray(scores), 2, 4, axis=0))
    np.testing.assert_array_equal(mask, reference_nm(scores.T, 2, 4).T)


def test_nm_mask_errors():
    with pytest.raises(ValueError, match="divisible by m=4"):
        ij.nm_mask(jnp.ones((3, 6)), 2, 4)
    with pytest.raises(ValueError, match="n must be in"):
        ij.nm_mask(jnp.ones(8), 5, 4)
    with pytest.raises(ValueError, match="out of range"):
        ij.nm_mask(jnp.ones(8), 2, 4, axis=1)


def test_nan_scores_raise_but_infinite_scores_are_ordered():
    nan = jnp.array([1.0, jnp.nan, 3.0])
    with pytest.raises(ValueError, match="scores contains NaN"):
        ij.topk_mask(nan, 1)
    with pytest.raises(ValueError, match="scores contains NaN"):
        ij.nm_mask(jnp.array([1.0, jnp.nan]), 1, 2)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        ij.hard_threshold(jnp.array([1.0, jnp.inf]), 1)
    np.testing.assert_array_equal(ij.topk_mask(jnp.array([1.0, jnp.inf, 3.0]), 2),
                                  [False, True, True])


def test_hard_threshold_keeps_integer_dtype():
    out = ij.hard_threshold(jnp.array([3, -5, 1], jnp.int32), 2)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [3, -5, 0])
