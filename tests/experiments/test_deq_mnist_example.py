"""examples/deq_mnist.py: the DEQ kit's example learns, cleanly, and checks its options."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "examples" / "deq_mnist.py"


def _module():
    spec = importlib.util.spec_from_file_location("deq_mnist", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_conv_deq_learns_without_convergence_warnings() -> None:
    out = _module().main(["--epochs", "1", "--train", "2000", "--warm-start"])
    assert out["accuracy"] > 0.7  # chance is 0.1
    assert out["convergence_warnings"] == 0  # a contraction: every solve and backward converged
    assert out["rho"] < 0.9  # ||conv|| <= 3 * 0.25 / (1 - 0.1) bounds it by 0.83


def test_the_correction_loss_trains_too() -> None:
    module = _module()
    out = module.main(["--epochs", "1", "--train", "300", "--correction", "2"])
    assert out["convergence_warnings"] == 0 and out["accuracy"] > 0.2  # chance is 0.1


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--train", "4001"], ["--dropout", "1"], ["--dropout", "-0.1"],
    ["--tol", "0"], ["--scale", "nan"], ["--norm", "batch"], ["--channels", "x"],
    ["--correction", "-1"], ["--jac-penalty", "-1"], ["--seed", str(2**64)],
])
def test_bad_options_are_argparse_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _module().parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err
