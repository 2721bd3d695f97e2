"""The README's ten-line example trains a real model to a real accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.mark.parametrize("method", ["neumann", "cg", "bptt"])
def test_quickstart_learns_mnist(method):
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--method", method, "--epochs", "1"])
    assert accuracy > 0.8  # chance is 0.1


def test_readme_api_example_runs_and_fills_gradients():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## The API in ten lines", 1)[1].split("```python", 1)[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["W"].grad is not None and namespace["W"].grad.abs().sum() > 0
    assert namespace["x"].grad is not None and namespace["x"].grad.shape == (8, 64)


def test_readme_module_example_trains_with_every_method() -> None:
    import torch

    import rbp

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
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
