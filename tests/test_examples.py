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
