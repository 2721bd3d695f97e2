"""The package loads its public names on first use (PEP 562) and keeps them all."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import rbp


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_rbp_does_not_import_torch_until_a_name_is_used():
    out = _python(
        "import sys, rbp\n"
        "before = 'torch' in sys.modules\n"
        "rbp.fixed_point\n"
        "print(before, 'torch' in sys.modules)"
    )
    assert out == "False True"


def test_every_public_name_resolves_and_is_listed():
    import rbp

    for name in rbp.__all__:
        assert getattr(rbp, name) is not None, name
        assert name in dir(rbp)
    assert callable(rbp.fixed_point) and rbp.linear.__name__ == "rbp.linear"
    for name in ("adjoint", "module", "regularisers", "tree"):  # bound by the eager import once
        assert getattr(rbp, name).__name__ == f"rbp.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rbp.nope  # noqa: B018


def test_importing_the_submodule_keeps_rbp_fixed_point_the_function():
    out = _python(
        "import rbp.fixed_point, rbp.module, rbp\n"
        "from rbp import fixed_point\n"
        "import importlib\n"
        "mod = importlib.import_module('rbp.fixed_point')\n"
        "print(callable(rbp.fixed_point), callable(fixed_point), hasattr(mod, '_validate'))"
    )
    assert out == "True True True"


def test_the_old_name_of_the_linear_solvers_still_resolves_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"rbp\.solvers is now rbp\.linear"):
        old = rbp.solvers
    assert old is importlib.import_module("rbp.linear") and old.GMRES is rbp.linear.GMRES
