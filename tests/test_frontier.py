"""Frontier comparison at matched L0 (benchmarks/quality.py's headline ratios)."""

import math

import pytest

from gs_lightning.evaluation.frontier import (
    interpolate,
    mean_log_ratio,
    ratios,
    worst_ratio,
)


def test_interpolation_is_linear_in_log_l0_and_log_value() -> None:
    pts = [(10.0, 0.1), (100.0, 0.01)]
    # Halfway in log L0 (sqrt(10 * 100)) is halfway in log FVU.
    assert interpolate(pts, math.sqrt(1000)) == pytest.approx(math.sqrt(0.1 * 0.01))
    assert interpolate(pts, 10.0) == pytest.approx(0.1)
    assert interpolate(list(reversed(pts)), 100.0) == pytest.approx(0.01)  # order does not matter


def test_no_extrapolation_outside_the_frontier() -> None:
    pts = [(10.0, 0.1), (100.0, 0.01)]
    assert interpolate(pts, 9.9) is None and interpolate(pts, 101.0) is None
    assert interpolate([], 10.0) is None


def test_zero_values_interpolate_linearly() -> None:
    assert interpolate([(10.0, 0.0), (100.0, 0.2)], math.sqrt(1000)) == pytest.approx(0.1)


def test_worst_ratio_over_the_overlap() -> None:
    theirs = [(10.0, 0.1), (20.0, 0.05), (40.0, 0.025)]
    ours = [(15.0, 0.06), (30.0, 0.02), (80.0, 0.001)]
    found = dict(ratios(ours, theirs))
    # Compared where both exist: L0 15..40; L0 80 and 10 lie outside one of them.
    assert sorted(found) == [15.0, 20.0, 30.0, 40.0]
    assert found[15.0] == pytest.approx(0.06 / interpolate(theirs, 15.0))
    assert worst_ratio(ours, theirs) == pytest.approx(max(found.values()))
    assert 0 < mean_log_ratio(ours, theirs) < worst_ratio(ours, theirs)


def test_disjoint_frontiers_have_no_ratio() -> None:
    assert worst_ratio([(1.0, 0.5), (2.0, 0.4)], [(10.0, 0.1), (20.0, 0.05)]) is None
