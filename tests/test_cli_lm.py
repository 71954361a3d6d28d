"""``iobs-jax train-lm`` / ``prune-lm`` on a tiny decoder: the report, its keys, the
cache, the best-iterate selection and the one-line errors."""

import doctest
import json
import math

import numpy as np
import pytest
from flax import nnx

from iobs_jax import models
from iobs_jax.cli import lm as _cli_lm
from iobs_jax.cli import main as _cli
from iobs_jax.experiments import decoder_lm
from iobs_jax.experiments.decoder_lm import one_standard_error

KEYS = {"method", "pattern", "sparsity", "iterations", "perplexity", "dense_perplexity",
        "seconds"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cfg = models.DecoderConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=32, max_seq_len=32)
    data = np.frombuffer(b"def add(a, b):\n    return a + b\n\n" * 100, np.uint8)
    model, _ = models.train_decoder(cfg, models.TrainConfig(steps=20, batch_size=8,
                                                            learning_rate=1e-2, warmup=2),
                                    data, progress=False)
    return models.save_decoder(model, tmp_path_factory.mktemp("lm") / "model")


def test_prune_lm_writes_the_report_with_its_keys(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code = _cli.main(["prune-lm", "--model", str(tiny_model), "--out", str(out),
                      "--methods", "magnitude,iobs", "--patterns", "0.5,2:4",
                      "--max-iterations", "2", "--calib", "16", "--val", "8", "--test", "8",
                      "--batch", "8", "--quiet", "--no-cache"])
    assert code == 0
    records = json.loads((out / "report.json").read_text())
    assert all(KEYS <= set(r) for r in records)
    runs = [(r["method"], r["pattern"], r["iterations"], r["scope"]) for r in records]
    assert runs == [("magnitude", "0.5", 1, "layer"), ("magnitude", "0.5", 1, "row"),
                    ("iobs", "0.5", 1, None), ("iobs", "0.5", 2, None),
                    ("magnitude", "2:4", 1, None), ("iobs", "2:4", 1, None),
                    ("iobs", "2:4", 2, None),
                    ("iobs-best", "0.5", records[-2]["iterations"], None),
                    ("iobs-best", "2:4", records[-1]["iterations"], None)]
    # magnitude's two comparison groups at 0.5: exactly one kept, by the same rule
    layer, row = records[:2]
    assert layer["chosen"] + row["chosen"] == 1
    assert row["chosen"] == (one_standard_error([layer["val_window_nll"],
                                                 row["val_window_nll"]]) == 1)
    assert all(r["chosen"] for r in records[2:])
    for r in records:
        assert r["sparsity"] == pytest.approx(0.5)
        assert r["perplexity"] > 1 and r["dense_perplexity"] > 1
    # the iterate kept: the one-standard-error rule over the validation windows
    for best in records[-2:]:
        runs = [r for r in records[:-2] if r["method"] == "iobs"
                and r["pattern"] == best["pattern"]]
        assert all(len(r["val_window_nll"]) == 8 for r in runs)
        assert math.exp(np.mean(best["val_window_nll"])) == pytest.approx(
            best["val_perplexity"], rel=1e-5)
        pick = one_standard_error([r["val_window_nll"] for r in runs])
        assert best["iterations"] == runs[pick]["iterations"]
    assert (out / "prune_lm_sparsity.png").is_file()
    assert (out / "prune_lm_iterations.png").is_file()
    assert "dense perplexity" in (out / "table.txt").read_text()


def test_train_lm_caches_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IOBS_JAX_CACHE_DIR", str(tmp_path / "cache" / "jax"))
    sizes = _cli_lm.LMSizes(
        models.DecoderConfig(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=16, max_seq_len=16),
        models.TrainConfig(steps=3, batch_size=2, warmup=1))
    monkeypatch.setattr(_cli_lm, "default_sizes", lambda quick=False: sizes)
    assert _cli.main(["train-lm", "--out", str(tmp_path / "a"), "--quiet", "--no-cache"]) == 0
    folder = _cli_lm.lm_cache(sizes)
    assert (folder / "model.safetensors").is_file() and not folder.with_suffix(".tmp").exists()
    info = json.loads((tmp_path / "a" / "train.json").read_text())
    assert {"test_bits_per_byte", "validation_bits_per_byte", "seconds", "history"} <= set(info)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert _cli.main(["train-lm", "--out", str(tmp_path / "b"), "--no-cache"]) == 0
    assert "using the trained model cached" in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    model = models.load_decoder(tmp_path / "b")
    assert isinstance(model, models.Decoder) and isinstance(model.layers, nnx.List)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "obc"], "--methods: unknown method 'obc'"),
    (["--patterns", "1.5"], "--patterns: '1.5' is neither"),
    (["--patterns", "4:2"], "--patterns"),
    (["--max-iterations", "0"], "--max-iterations must be >= 1"),
    (["--step-size", "0"], "--step-size must be > 0"),
    (["--val", "1"], "--val must be >= 2"),
    (["--model", "/nonexistent"], "--model: '/nonexistent' is not a saved decoder"),
])
def test_prune_lm_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    code = _cli.main(["prune-lm", "--out", str(tmp_path), "--no-cache", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_one_standard_error_rule_against_a_direct_count():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cands, windows = rng.integers(1, 6), rng.integers(2, 12)
        base = rng.normal(3.0, 0.5, windows)  # shared per-window difficulty (paired)
        nll = base + rng.normal(0, 0.02, (cands, windows)) + rng.normal(0, 0.02, (cands, 1))
        pick = one_standard_error(nll.tolist())
        means = nll.mean(axis=1)
        best = int(np.argmin(means))
        within = [i for i in range(cands)
                  if means[i] - means[best] <= np.std(nll[i] - nll[best], ddof=1)
                  / math.sqrt(windows)]
        assert pick == within[0] and pick <= best
    # a clear gain (far above the noise) is kept; a gain inside the noise is not
    flat = np.tile(rng.normal(3.0, 0.5, 64), (3, 1))
    assert one_standard_error(flat - [[0.0], [0.1], [0.2]]) == 2
    noisy = flat + rng.normal(0, 0.05, flat.shape) - [[0.0], [0.001], [0.002]]
    assert one_standard_error(noisy) == 0
    with pytest.raises(ValueError, match="windows >= 2"):
        one_standard_error([[1.0], [2.0]])
    with pytest.raises(ValueError, match="not all finite"):
        one_standard_error([[1.0, 2.0], [np.nan, 1.0]])
    assert doctest.testmod(decoder_lm).failed == 0


def test_window_nll_is_per_window_and_averages_to_evaluate(tiny_model):
    model = models.load_decoder(tiny_model)
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 256, (5, 33)).astype(np.int32)
    per = models.window_nll(model, windows, batch_size=2)
    assert per.shape == (5,)
    assert per.mean() == pytest.approx(models.evaluate(model, windows), rel=1e-6)
    for i in range(5):  # each window alone gives its own value
        assert per[i] == pytest.approx(models.evaluate(model, windows[i:i + 1]), rel=1e-6)


def test_choose_scopes_keeps_the_usual_group_unless_the_other_is_clearly_better():
    rng = np.random.default_rng(2)
    base = rng.normal(2.0, 0.3, 32)

    def rec(method, scope, shift, pattern="0.5"):
        return dict(method=method, pattern=pattern, scope=scope, chosen=True,
                    val_window_nll=(base + shift + rng.normal(0, 1e-3, 32)).tolist())

    records = [rec("wanda", "row", 0.0), rec("wanda", "layer", -0.05),  # layer clearly better
               rec("magnitude", "layer", 0.0), rec("magnitude", "row", -1e-4),  # a tie
               rec("wanda", None, 0.0, "2:4"), rec("sparsegpt", None, 0.0)]
    out = decoder_lm.choose_scopes(records)
    assert [r["chosen"] for r in out] == [False, True, True, False, True, True]
    assert all(r["chosen"] for r in records)  # the input is not changed
    lone = decoder_lm.choose_scopes([{**rec("wanda", "layer", 0.0), "chosen": None}])
    assert lone[0]["chosen"] is True  # one group ran (an interrupted run): it is kept
