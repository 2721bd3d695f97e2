"""The README's ten-line example trains a real model to a real accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


@pytest.mark.parametrize("method", ["neumann", "cg", "bptt"])
def test_quickstart_learns_mnist(method):
    """The main demo learns, and a newcomer's first run shows no convergence warning."""
    import warnings

    import rbp

    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rbp.ConvergenceWarning)
        accuracy = module.main(["--method", method, "--epochs", "1"])
    assert accuracy > 0.8  # chance is 0.1


def test_readme_api_example_runs_and_fills_gradients():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("## The API in ten lines", 1)[1].split("```python", 1)[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["W"].grad is not None and namespace["W"].grad.abs().sum() > 0
    assert namespace["x"].grad is not None and namespace["x"].grad.shape == (8, 64)


def test_readme_module_example_trains_with_every_method() -> None:
    import torch

    import rbp

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("## Using it in a model", 1)[1].split("```python", 1)[1].split("```")[0]
    namespace: dict = {"torch": torch, "rbp": rbp}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    torch.manual_seed(0)
    model = namespace["DEQ"](16).double()
    with torch.no_grad():
        model.cell.weight.mul_(0.5)
    x = torch.randn(4, 16, dtype=torch.float64)
    grads = {}
    for method in rbp.METHODS:
        model.zero_grad()
        model(x, method=method).square().sum().backward()
        grads[method] = model.cell.weight.grad.clone()
    for method, grad in grads.items():
        assert torch.allclose(grad, grads["bptt"], rtol=1e-4, atol=1e-8), method


def test_deq_anderson_example_learns_with_per_sample_stopping():
    path = EXAMPLE.parent / "deq_anderson.py"
    spec = importlib.util.spec_from_file_location("deq_anderson", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--epochs", "2", "--train", "2000"])
    assert accuracy > 0.8  # chance is 0.1


def test_readme_links_and_paths_exist():
    """Every relative link, image and backticked ``results/``, ``docs/``, ``configs/``,
    ``examples/`` or ``benchmarks/`` path in the README names a file or folder of the repo."""
    import re

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    targets = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme))
    targets |= set(re.findall(
        r"`((?:results|docs|configs|examples|benchmarks)/[^`\s*<>]*?)`", readme))
    relative = sorted(t for t in targets if "://" not in t)
    assert relative, "no links found: the pattern is wrong"
    missing = [t for t in relative if not (root / t).exists()]
    assert not missing, f"README points to missing files: {missing}"


def test_readme_quick_start_is_what_ci_runs():
    """The quick start's three commands: the CPU PyTorch wheel then the project, the demo,
    and the test command, which is the one CI runs."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert lines[0].startswith("pip install torch==") and "whl/cpu" in lines[0]
    assert 'pip install -e ".[dev]"' in lines[0]
    assert lines[1].startswith("python examples/quickstart.py")
    assert (root / lines[1].split()[1]).is_file()
    assert lines[2] == "python -m pytest -rs"
    ci = root / ".ci" / "run"
    if ci.is_file():
        assert "python -m pytest -rs" in ci.read_text()


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("example", "argv", "message"), [
    ("deq_anderson", ["--train", "4900"], "--train: 4900 must be between 1 and 4000"),
    ("deq_anderson", ["--train", "6000"], "--train: 6000 must be between 1 and 4000"),
    ("deq_anderson", ["--train", "0"], "--train: 0 must be between 1 and 4000"),
    ("deq_anderson", ["--tol", "0"], "--tol: 0 must be a positive number"),
    ("deq_anderson", ["--tol", "nan"], "--tol: nan must be a positive number"),
    ("deq_anderson", ["--epochs", "0"], "--epochs: 0 must be at least 1"),
    ("deq_anderson", ["--solver", "newton"], "--solver: invalid choice"),
    ("deq_anderson", ["--seed", "-1"], "--seed: -1 must be between 0 and 4294967295"),
    ("deq_anderson", ["--seed", str(2**64)], f"--seed: {2**64} must be between 0 and"),
    ("quickstart", ["--epochs", "0"], "--epochs: 0 must be at least 1"),
    ("quickstart", ["--epochs", "two"], "--epochs: 'two' is not an integer"),
    ("quickstart", ["--method", "newton"], "--method: invalid choice"),
    ("quickstart", ["--seed", "-3"], "--seed: -3 must be between 0 and 4294967295"),
    ("quickstart", ["--seed", str(2**32)], f"--seed: {2**32} must be between 0 and"),
])
def test_example_options_are_checked(example, argv, message, capsys):
    """A wrong option is an argparse error (exit 2, one line naming it), before any data is
    loaded: no silent training on test digits, no IndexError."""
    module = _load_example(example)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
