"""The one summary statistic of the experiments: mean ± sample standard deviation.

Convention (used by sweeps, the report and every application's tables): for values
``x_1 … x_n``, ``mean = Σ x_i / n`` and ``std = sqrt(Σ (x_i - mean)² / (n - 1))``, the sample
standard deviation (ddof = 1, as NumPy's ``std(ddof=1)`` and the ``± std`` of most papers over
seeds). One value has no spread to estimate: its ``std`` is reported as 0.0 and ``n = 1`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MeanStd", "format_mean_std", "mean_std"]


@dataclass(frozen=True)
class MeanStd:
    """``mean``, sample ``std`` (ddof 1; 0.0 when ``n == 1``) and count ``n`` of some values."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """``{"mean", "std", "n"}``, the form stored in ``results.json``."""
        return {"mean": self.mean, "std": self.std, "n": self.n}

    def format(self, digits: int = 4, std_digits: int = 2, scale: float = 1.0,
               fixed: bool = False) -> str:
        """``"mean ± std (n=k)"`` (just the mean for one value) with ``digits`` significant
        digits, or decimals when ``fixed``; values multiplied by ``scale`` first."""
        return format_mean_std(self, digits, std_digits, scale, fixed)


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean and sample standard deviation (ddof 1) of ``values``.

    Raises ValueError for no values or a value that is not a finite real number (NaN would
    silently poison a table cell; the message names the offending position).
    """
    xs: list[float] = []
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise ValueError(f"mean_std: value {i} is {value!r}, a flag, not a number")
        if not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy / torch scalars
            except (TypeError, ValueError) as exc:
                raise ValueError(f"mean_std: value {i} is {value!r}, not a number") from exc
        if not math.isfinite(value):
            raise ValueError(f"mean_std: value {i} is {value}, not a finite number")
        xs.append(float(value))
    n = len(xs)
    if n == 0:
        raise ValueError("mean_std: no values to summarise")
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return MeanStd(mean=mean, std=std, n=n)


def format_mean_std(stat: MeanStd, digits: int = 4, std_digits: int = 2, scale: float = 1.0,
                    fixed: bool = False) -> str:
    """Text of one table cell; see :meth:`MeanStd.format`."""
    kind = "f" if fixed else "g"
    mean = f"{stat.mean * scale:.{digits}{kind}}"
    if stat.n < 2:
        return mean
    return f"{mean} ± {stat.std * scale:.{std_digits}{kind}} (n={stat.n})"
