"""Tests of ``rbp.runner.stats``: the one mean ± std convention (sample std, ddof 1)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from rbp.runner.stats import MeanStd, format_mean_std, mean_std


def test_sample_std_matches_the_standard_library() -> None:
    rng = random.Random(0)
    for n in (2, 3, 10, 57):
        xs = [rng.gauss(3.0, 2.0) for _ in range(n)]
        s = mean_std(xs)
        assert s.n == n
        assert s.mean == pytest.approx(statistics.fmean(xs), rel=1e-14)
        assert s.std == pytest.approx(statistics.stdev(xs), rel=1e-12)  # ddof 1
        assert s.std != pytest.approx(statistics.pstdev(xs), rel=1e-6)  # not the population one


def test_hand_computed_values() -> None:
    s = mean_std([0.5, 0.7])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(math.sqrt(0.02))
    assert mean_std([4]) == MeanStd(mean=4.0, std=0.0, n=1)
    assert mean_std(x for x in (1, 1, 1)).std == 0.0
    assert mean_std([1e16, 1.0, -1e16]).mean == pytest.approx(1 / 3)  # fsum, no cancellation


def test_numpy_and_torch_scalars_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    s = mean_std([np.float32(1.0), torch.tensor(3.0), np.int64(2)])
    assert s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0)
    assert s.std == pytest.approx(float(np.std([1.0, 3.0, 2.0], ddof=1)))


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")], [1, "x"], [True]])
def test_bad_values_are_refused_clearly(bad: list) -> None:
    with pytest.raises(ValueError, match="mean_std"):
        mean_std(bad)


def test_formatting() -> None:
    s = mean_std([0.5, 0.7])
    assert s.format() == "0.6 ± 0.14 (n=2)"
    assert format_mean_std(s, 2, 2, scale=100, fixed=True) == "60.00 ± 14.14 (n=2)"
    assert mean_std([0.123456789]).format() == "0.1235"  # one value: no spread shown
    assert s.as_dict() == {"mean": s.mean, "std": s.std, "n": 2}
