"""benchmarks/synthetic_report.py: the synthetic benchmark's matched-L0 figures and its rescoring."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> ModuleType:
    """The benchmark's pure helpers, loaded from their file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("synthetic_report", ROOT / "benchmarks" / "synthetic_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(world: str, tool: str, family: str, l0: float, mcc: float, f1: float = 0.5, dead: float = 0.0) -> dict:
    return {"world": world, "tool": tool, "family": family, "setting": f"L0 {l0:g}", "target": l0, "l0": l0,
            "mcc": mcc, "f1": f1, "uniqueness": 0.9, "precision": 0.5, "recall": 0.5, "explained_variance": 0.8,
            "shrinkage": 0.95, "dead_frac": dead, "true_l0": 16.0, "seconds": 1.0}


def test_differences_read_both_curves_at_every_shared_l0(report: ModuleType) -> None:
    ours = [(10.0, 0.8), (40.0, 0.6)]
    theirs = [(20.0, 0.5), (80.0, 0.9)]
    found = report.differences(ours, theirs)
    # The overlap is [20, 40]: at 20 ours is halfway in log L0 between 0.8 and 0.6 (in log value).
    assert [l0 for l0, _ in found] == [20.0, 40.0]
    assert found[0][1] == pytest.approx(math.sqrt(0.8 * 0.6) - 0.5)
    assert found[1][1] == pytest.approx(0.6 - math.sqrt(0.5 * 0.9))
    assert report.differences(ours, [(50.0, 0.5), (60.0, 0.5)]) == []  # no overlap, nothing extrapolated


def test_margin_over_the_best_other_curve(report: ModuleType) -> None:
    ours = [(10.0, 0.7), (30.0, 0.7)]
    others = [[(10.0, 0.6), (30.0, 0.6)], [(20.0, 0.9), (40.0, 0.9)], [(50.0, 0.99)]]
    found = dict(report.margin_over_best(ours, others))
    assert found[10.0] == pytest.approx(0.1)  # only the first other covers L0 10
    assert found[20.0] == pytest.approx(-0.2) and found[30.0] == pytest.approx(-0.2)
    assert 40.0 not in found and 50.0 not in found  # outside our range


def _rows() -> list[dict]:
    rows = []
    for world, shift in (("seed7", 0.0), ("flat", -0.05), ("tune", 0.2), ("tune_flat", -0.3)):
        rows += [_row(world, "gs_lightning", "jumprelu", l0, 0.8 + shift, dead=0.01 * (l0 == 24)) for l0 in (10, 24)]
        rows += [_row(world, "SAELens", "jumprelu", l0, 0.75) for l0 in (12, 20)]
        rows += [_row(world, "gs_lightning", "batchtopk", l0, 0.7) for l0 in (10, 16)]
        rows += [_row(world, "SAELens", "batchtopk", l0, 0.72) for l0 in (9, 15)]
    return rows


def test_figures_take_the_worst_world(report: ModuleType) -> None:
    figures = report.figures(_rows(), ["seed7", "flat"])
    assert figures["synth_jumprelu_mcc_vs_saelens"] == pytest.approx(0.75 - 0.75)  # flat: 0.75 against 0.75
    assert figures["synth_jumprelu_f1_vs_saelens"] == pytest.approx(0.0)
    assert figures["synth_batchtopk_mcc_vs_saelens"] == pytest.approx(-0.02)
    # Ours against the best other curve: flat's 0.75 against SAELens' JumpReLU 0.75 and BatchTopK 0.72.
    assert figures["synth_jumprelu_mcc_vs_best"] == pytest.approx(0.0)
    assert figures["synth_dead_frac_max"] == pytest.approx(0.01)
    assert "synth_matryoshka_mcc_vs_saelens" not in figures  # no Matryoshka rows: no figure
    assert report.figures(_rows(), ["tune"])["synth_jumprelu_mcc_vs_saelens"] == pytest.approx(0.25)


def test_rescoring_a_saved_json(report: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = {"width": 1024, "rows": 1_048_576, "val_rows": 65_536, "true_l0": 16.0}
    settings = {"mode": "benchmark", "steps": 1000, "batch": 1024, "ours": {"lr": 1e-3}, "peer": {"lr": 1e-3},
                "worlds": {w: world for w in ("seed7", "flat", "tune", "tune_flat")}}
    payload = {"commit": "0" * 40, "settings": settings, "rows": _rows()}
    figures = report.report(payload, tmp_path)
    printed = capsys.readouterr().out
    # Both tuning worlds stay out of the headline (tune_flat's -0.25 would be its worst) ...
    assert figures == pytest.approx(report.figures(_rows(), ["seed7", "flat"]))
    assert "result: synth_batchtopk_mcc_vs_saelens -0.02" in printed
    assert "tune: synth_jumprelu_mcc_vs_saelens -0.25" in printed  # ... and print apart, worst of the two
    assert "| gs_lightning | jumprelu | L0 10 | 10.00 | 0.8000 |" in printed
    assert json.loads((tmp_path / "synthetic.json").read_text()) == payload
    assert (tmp_path / "synthetic.csv").read_text().count("\n") == len(_rows()) + 1
    assert (tmp_path / "synthetic.png").stat().st_size > 0


def test_a_tune_winner_must_land_near_its_target(report: ModuleType) -> None:
    rows = [_row("tune", "SAELens", "jumprelu", 0.3, 0.9), _row("tune", "SAELens", "jumprelu", 14.0, 0.7),
            _row("tune", "SAELens", "jumprelu", 17.0, 0.6), _row("tune", "gs_lightning", "jumprelu", 40.0, 0.5)]
    for row in rows:
        row["target"] = 16
    best = report.best_settings(rows, "tune")
    assert best["SAELens", "jumprelu"]["l0"] == 14.0  # the 0.9 at L0 0.3 missed its target
    assert best["gs_lightning", "jumprelu"]["l0"] == 40.0  # none landed near: the best of all
