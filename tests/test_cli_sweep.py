"""iobs-jax sweep / paper: end to end on tiny settings, --help, one-line errors."""

import csv
import json

import pytest
from conftest import write_idx_split

from iobs_jax.cli import sweep as _cli_sweep
from iobs_jax.cli.main import main
from iobs_jax.recovery.grid import SOLVER_NAMES


def test_cli_solver_names_are_the_librarys():
    assert _cli_sweep._SOLVERS == SOLVER_NAMES


def test_sweep_command_writes_tables_and_figure(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sweep", "--d", "24", "--n", "10", "--k", "3", "--trials", "4",
            "--methods", "htp,obs-pursuit", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["n"], r["k"]) for r in rows] == [("htp", "10", "3"),
                                                             ("obs-pursuit", "10", "3")]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["d"] == 24 and saved["config"]["trials"] == 4
    assert (out / "phase.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert "overall success: htp" in captured.out and "2/2" in captured.err  # the progress bar


def test_paper_command_on_tiny_settings(tmp_path, capsys):
    data = tmp_path / "mnist"
    write_idx_split(data, "test", n=3)
    out = tmp_path / "paper"
    argv = ["paper", "--trials", "2", "--steps", "3", "--images", "2", "--mnist-steps", "3",
            "--data", str(data), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "paper.json").read_text())
    true_h = "Topk-I-OBS, true H, step 1"
    assert result["gaussian"][true_h]["final_distance_max"] < 1e-8
    # n = 2d > d: the true-Hessian step lands on each image (random dense 28x28 here).
    assert max(result["mnist"]["recovery"][true_h]) < 1e-4
    for name in ("paper_gaussian.png", "paper_mnist.png", "paper_mnist_images.png"):
        assert (out / name).stat().st_size > 1000
    assert "MNIST worst relative error" in capsys.readouterr().out


def test_help_explains_every_option(capsys):
    parser = _cli_sweep.argparse.ArgumentParser()
    sub = parser.add_subparsers()
    _cli_sweep.register(sub)
    for command, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (command, action.dest)
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--d", "-5"], "--d must be >= 1"),
        (["--n", "0,10"], "--n values must be >= 1"),
        (["--n", "ten"], "--n must be comma-separated integers"),
        (["--k", "-1"], "--k values must be >= 0"),
        (["--k", "40"], "--k: k* = 40 is larger than --d 24"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--methods", "htp,magic"], "--methods: unknown solver 'magic'"),
        (["--prior", "laplace"], "--prior: unknown prior 'laplace'"),
        (["--noise", "-1"], "--noise must list numbers >= 0"),
        (["--rho", "1.5"], "--rho must be in [0, 1)"),
        (["--prior", "mnist", "--d", "784", "--data", "/nonexistent/mnist"], "--data:"),
        (["--prior", "mnist"], "--d must equal the images' pixel count 784"),
        (["--tol", "nan"], "--tol must be a finite number > 0"),
    ],
)
def test_bad_sweep_options_give_one_line_errors(tmp_path, capsys, extra, needle):
    argv = ["sweep", "--d", "24", "--n", "10", "--k", "3", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_unwritable_output_folder_and_missing_mnist_for_paper(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["sweep", "--out", str(blocker / "sub")]) == 2
    assert "--out: cannot write" in capsys.readouterr().err
    assert main(["paper", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iobs-jax paper: error: --data:") and "\n" not in err
    assert main(["paper", "--images", "0", "--out", str(tmp_path)]) == 2
    assert "--images must be >= 1" in capsys.readouterr().err
