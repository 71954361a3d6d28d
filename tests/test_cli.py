"""The iobs-jax command line: prune end to end, save, reload, verify; one-line errors."""

import json

import jax
import numpy as np
import pytest
from conftest import write_idx_split

from iobs_jax.cli.main import main
from iobs_jax.pruning import checkpoint as _checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mnist")
    write_idx_split(directory, "test", n=400)
    return directory


def test_prune_command_trains_prunes_saves_and_verifies(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--data", str(data_dir), "--train", "300", "--epochs", "1",
            "--calib", "100", "--calib-batch", "50", "--sparsity", "0.7", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["sparsity"] == pytest.approx(0.7, abs=1e-3)
    params, masks = _checkpoint.load_params(out / "pruned.npz")
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
        assert np.all(p[~m] == 0)
    assert "saved and verified" in capsys.readouterr().out
    # Loading the dense parameters written by the first run skips training.
    argv2 = ["prune", "--data", str(data_dir), "--train", "300", "--params",
             str(out / "dense.npz"), "--method", "sparsegpt", "--pattern", "2:4",
             "--calib", "100", "--out", str(tmp_path / "run2"), "--quiet"]
    assert main(argv2) == 0
    report2 = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report2["dense_accuracy"] == report["dense_accuracy"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--pattern", "3:2"], "pattern"),
        (["--train", "0"], "--train"),
        (["--data", "/nonexistent/mnist"], "--data"),
        (["--params", "/nonexistent.npz"], "--params"),
    ],
)
def test_bad_options_give_one_line_errors(data_dir, tmp_path, capsys, extra, needle):
    argv = ["prune", "--data", str(data_dir), "--epochs", "0", "--train", "300",
            "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_unwritable_output_folder_is_reported(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["prune", "--data", str(data_dir), "--out", str(blocker / "sub")]) == 2
    assert "--out: cannot write" in capsys.readouterr().err


def test_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--method", "nope", "--out", "x"])
    assert exit_info.value.code == 2 and "--method" in capsys.readouterr().err


def test_checkpoint_round_trip_keeps_dtypes(tmp_path):
    import jax.numpy as jnp

    params = {"a": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3)}}
    masks = {"a": {"kernel": jnp.ones((2, 3), bool), "bias": jnp.ones(3, bool)}}
    _checkpoint.save_params(tmp_path / "p.npz", params, masks)
    loaded, loaded_masks = _checkpoint.load_params(tmp_path / "p.npz")
    assert loaded["a"]["kernel"].dtype == jnp.bfloat16 and loaded_masks["a"]["kernel"].dtype == bool
    np.testing.assert_array_equal(loaded["a"]["bias"], params["a"]["bias"])


# ------------------------------------------------------------------ issue 12: CLI behaviour


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--sparsity", "nan"], "--sparsity must be in [0, 1)"),
        (["--sparsity", "0.5", "--pattern", "2:4"], "exclude each other"),
        (["--pattern", "3:8"], "300 inputs, not a multiple of 8"),
        (["--method", "obc", "--pattern", "2:4"], "--method obc"),
        (["--method", "obc", "--scope", "layer"], "--scope row"),
        (["--damping", "-1"], "--damping must be a finite number >= 0"),
        (["--calib", "400"], "--calib (400) must be <= --train"),
        (["--rounds", "3", "--method", "magnitude"], "--rounds is for --method iobs"),
    ],
)
def test_prune_options_are_checked_before_training(data_dir, tmp_path, capsys, monkeypatch,
                                                   extra, needle):
    from iobs_jax import mnist

    def no_training(*a, **k):
        raise AssertionError("trained before the options were checked")

    monkeypatch.setattr(mnist, "train_classifier", no_training)
    monkeypatch.setattr(mnist, "load_mnist", no_training)
    argv = ["prune", "--data", str(data_dir), "--train", "300", "--out", str(tmp_path),
            "--no-cache", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_prune_default_train_split_works_with_the_packaged_images(tmp_path, capsys,
                                                                  monkeypatch):
    # --train 8000 (the default) of the 10,000 shipped images: checked up to the training.
    from iobs_jax import mnist

    seen = {}

    def stop(model, images, labels, **kwargs):
        seen["n"] = len(labels)
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist, "train_classifier", stop)
    assert main(["prune", "--out", str(tmp_path), "--no-cache"]) == 130
    assert seen["n"] == 8000
    err = capsys.readouterr().err.strip()
    assert err == "iobs-jax prune: interrupted (finished results are in --out)"
    assert not (tmp_path / "report.json").exists()


def test_ctrl_c_in_a_sweep_keeps_the_finished_cells_and_no_partial_file(tmp_path, capsys,
                                                                        monkeypatch):
    from iobs_jax.recovery import grid as _sweep

    real, calls = _sweep.sweep, []

    def interrupted_after_one_cell(*args, **kwargs):
        calls.append(kwargs["n"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(_sweep, "sweep", interrupted_after_one_cell)
    out = tmp_path / "run"
    argv = ["sweep", "--d", "16", "--n", "8,12", "--k", "2", "--trials", "2", "--methods",
            "htp", "--out", str(out), "--no-plots", "--no-cache"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    assert [(r["n"], r["k"]) for r in saved["rows"]] == [(8, 2)]  # the finished cell
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]


def test_the_compilation_cache_is_on_by_default_and_off_with_no_cache(tmp_path, monkeypatch):
    from iobs_jax.cli import common as _cli_common

    monkeypatch.setenv(_cli_common.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(_cli_common, "enable_compilation_cache",
                        lambda: calls.append(_cli_common.cache_dir()))
    argv = ["sweep", "--d", "-1", "--out", str(tmp_path)]  # fails at once: no compute
    main(argv)
    main([*argv, "--no-cache"])
    assert calls == [tmp_path / "cache"]
    monkeypatch.delenv(_cli_common.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cli_common.cache_dir() == tmp_path / "xdg" / "iobs_jax" / "jax"


def test_help_is_fast_and_imports_no_jax():
    import subprocess
    import sys

    code = ("import sys; from iobs_jax.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('jax', 'flax', 'matplotlib', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
