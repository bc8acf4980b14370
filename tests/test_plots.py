"""Frontier pictures: every panel's L0 axis carries labels."""

from __future__ import annotations

import matplotlib.pyplot as plt

from gs_lightning.evaluation.plots import _label_within_decade


def test_log_axis_within_one_decade_gets_labelled_ticks() -> None:
    # A TopK panel (k 16 to 64) holds no power of ten: without the helper it has no label.
    fig, ax = plt.subplots()
    ax.plot([16, 32, 64], [0.05, 0.03, 0.02])
    ax.set_xscale("log")
    _label_within_decade(ax)
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == [20, 30, 50]
    plt.close(fig)


def test_log_axis_across_decades_keeps_its_powers_of_ten() -> None:
    fig, ax = plt.subplots()
    ax.plot([10, 30, 700], [0.05, 0.03, 0.01])
    ax.set_xscale("log")
    before = list(ax.get_xticks())
    _label_within_decade(ax)
    assert list(ax.get_xticks()) == before
    plt.close(fig)
