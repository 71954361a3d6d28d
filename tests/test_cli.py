"""The iobs-jax command line: prune end to end, save, reload, verify; one-line errors."""

import json

import jax
import numpy as np
import pytest
from conftest import write_idx_split

from iobs_jax import _checkpoint
from iobs_jax._cli import main


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
