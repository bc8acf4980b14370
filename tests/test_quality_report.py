"""benchmarks/quality_report.py: frontier against frontier, held-out sites apart, and rescoring."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> ModuleType:
    """The benchmark's pure helpers, loaded from their file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("quality_report", ROOT / "benchmarks" / "quality_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quality_report", module)
    spec.loader.exec_module(module)
    return module


def _row(site: str, tool: str, family: str, config: str, l0: float, fvu: float, steps: int = 3000,
         held_out: bool = True, delta: float | None = None, never: float = 0.0) -> dict:
    return {"site": site, "held_out": held_out, "model": "tiny", "tool": tool, "family": family, "config": config,
            "setting": f"target_l0={l0:g}", "target": l0, "steps": steps, "seconds": 1.0, "l0": l0, "fvu": fvu,
            "delta_loss": fvu if delta is None else delta, "never_fire": never, "dense": 0.0}


def test_each_side_counts_with_its_best_configuration_at_each_l0(report: ModuleType) -> None:
    rows = [_row("s", "gs_lightning", "jumprelu", "target", l0, v) for l0, v in ((10, 0.1), (40, 0.025))]
    # SAELens' two configurations cross: "a" is better at low L0, "b" at high L0, and "b"
    # kills most of its dictionary.
    rows += [_row("s", "SAELens", "jumprelu", "a", l0, v, never=0.01) for l0, v in ((10, 0.08), (40, 0.04))]
    rows += [_row("s", "SAELens", "jumprelu", "b", l0, v, never=0.7) for l0, v in ((10, 0.2), (40, 0.02))]
    found = {c["l0"]: c for c in report.comparison(rows, "s", 3000, "jumprelu")}
    assert sorted(found) == [10.0, 40.0]
    assert found[10.0]["fvu_ratio"] == pytest.approx(0.1 / 0.08) and found[10.0]["theirs"] == "a"
    assert found[40.0]["fvu_ratio"] == pytest.approx(0.025 / 0.02) and found[40.0]["theirs"] == "b"
    assert found[40.0]["theirs_never_fire"] == pytest.approx(0.7)  # the winning point's dictionary, shown
    figures = report.figures(rows, held_out=True)
    assert figures["jumprelu_fvu_ratio_vs_saelens"] == pytest.approx(1.25)
    assert figures["jumprelu_dead_vs_saelens"] == pytest.approx(0.0 - 0.01)


def test_held_out_sites_and_run_lengths_stay_apart(report: ModuleType) -> None:
    rows = []
    for site, held_out, ours in (("held", True, 0.09), ("tuned", False, 0.05)):
        for steps, shift in ((1000, 2.0), (3000, 1.0)):
            rows += [_row(site, "gs_lightning", "jumprelu", "t", l0, ours * shift * 10 / l0, steps, held_out)
                     for l0 in (10, 20)]
            rows += [_row(site, "SAELens", "jumprelu", "q", l0, 0.1 * 10 / l0, steps, held_out) for l0 in (10, 20)]
    held = report.figures(rows, held_out=True)
    assert held["jumprelu_fvu_ratio_vs_saelens"] == pytest.approx(0.9)
    assert held["jumprelu_fvu_ratio_vs_saelens_1000"] == pytest.approx(1.8)
    assert report.figures(rows, held_out=False)["jumprelu_fvu_ratio_vs_saelens"] == pytest.approx(0.5)


def test_a_site_without_a_next_token_loss_gives_no_delta_loss_ratio(report: ModuleType) -> None:
    rows = [_row("enc", tool, "jumprelu", "c", l0, 0.1) for tool in ("gs_lightning", "SAELens") for l0 in (5, 9)]
    for row in rows:
        row["delta_loss"] = None
    figures = report.figures(rows, held_out=True)
    assert figures["jumprelu_fvu_ratio_vs_saelens"] == pytest.approx(1.0)
    assert "jumprelu_delta_loss_ratio_vs_saelens" not in figures
    assert "| - |" in report.table(rows, "enc")


def test_batchtopk_is_compared_at_its_measured_l0(report: ModuleType) -> None:
    # Nominal k 16 and 32 on both sides, but SAELens' inference JumpReLU lands at other L0s.
    rows = [_row("s", "gs_lightning", "batchtopk", "defaults", l0, v) for l0, v in ((16, 0.1), (32, 0.05))]
    rows += [_row("s", "SAELens", "batchtopk", "defaults", l0, v) for l0, v in ((20, 0.1), (40, 0.05))]
    found = report.comparison(rows, "s", 3000, "batchtopk")
    assert [c["l0"] for c in found] == [20.0, 32.0]
    ours_at_20 = math.exp(math.log(0.1) + (math.log(20) - math.log(16)) / math.log(2) * math.log(0.5))
    assert found[0]["fvu_ratio"] == pytest.approx(ours_at_20 / 0.1)


def test_rescoring_a_saved_json(report: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_row("s", "gs_lightning", "jumprelu", "target", l0, 0.05) for l0 in (10, 20)]
    rows += [_row("s", "SAELens", "jumprelu", "SynthSAEBench settings", l0, 0.1) for l0 in (10, 20)]
    settings = {"steps": 3000, "batch": 1024, "ours": {"lr": 1e-3}, "ours_jumprelu": ["target"],
                "peer_trainer": {"lr": 1e-3}, "peer_jumprelu": {"SynthSAEBench settings": {"l0_coefficient": 1.0}},
                "peer_topk": {}}
    payload = {"commit": "0" * 40, "settings": settings, "rows": rows}
    figures = report.report(payload, tmp_path)
    printed = capsys.readouterr().out
    assert figures["jumprelu_fvu_ratio_vs_saelens"] == pytest.approx(0.5)
    assert "result: jumprelu_fvu_ratio_vs_saelens 0.5" in printed
    assert "SAELens SynthSAEBench settings (never fire 0.0%)" in printed
    assert json.loads((tmp_path / "quality.json").read_text()) == payload
    assert (tmp_path / "quality.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "quality_frontier.png").stat().st_size > 0


def test_the_tune_ranking_is_against_the_reference(report: ModuleType) -> None:
    rows = [_row("s", "SAELens", "jumprelu", name, l0, v * 10 / l0, held_out=False)
            for name, v in (("ref", 0.1), ("better", 0.08), ("worse", 0.2)) for l0 in (10, 30)]
    rows += [_row("s", "SAELens", "jumprelu", "elsewhere", l0, 0.01, held_out=False) for l0 in (100, 200)]
    ranking = report.tune_ranking(rows, "ref")
    assert [name for _, name in ranking] == ["better", "ref", "worse", "elsewhere"]
    assert ranking[0][0] == pytest.approx(0.8) and math.isinf(ranking[-1][0])


@pytest.fixture(scope="module")
def quality(report: ModuleType) -> ModuleType:
    """benchmarks/quality.py itself (its imports: the package, quality_report, saelens_peer)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["quality"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_sites_split_into_tuning_and_held_out(quality: ModuleType) -> None:
    assert quality.TUNING == ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    assert len(quality.HELD_OUT) >= 3 and not set(quality.HELD_OUT) & set(quality.TUNING)
    assert {s.model for s in quality.SITES if s.held_out} == {"tiny", "minilm"}  # a real pretrained model too
    for mode in quality.MODES.values():
        assert set(mode["topk_sites"]) <= set(mode["sites"])
    assert quality.MODES["full"]["steps"] >= 3000 and quality.MODES["full"]["snapshot"] == 1000


def test_the_peer_grid_holds_synthsaebench_settings_once(quality: ModuleType) -> None:
    grid = quality.tune_configs()
    assert len(grid) == 12  # lr {2e-3, 1e-3, 3e-4} x 2 inits x pre-activation loss on or off
    named = grid[quality.SYNTHSAEBENCH]
    assert named == {**quality.PEER_JUMPRELU[quality.SYNTHSAEBENCH], "lr": quality.PEER_TRAINER["lr"],
                     "pre_act_loss_coefficient": None}
    assert sum(name == quality.SYNTHSAEBENCH for name in grid) == 1


def test_a_fit_on_other_batches_is_refused(quality: ModuleType) -> None:
    stream = quality.Stream(dm=None, steps=3, snapshot=None)
    stream.check([1.0, 2.0, 3.0], "first")
    stream.check([1.0, 2.0, 3.0], "second")
    with pytest.raises(RuntimeError, match="third trained on other batches"):
        stream.check([1.0, 3.0, 2.0], "third")


def test_a_record_from_uncommitted_code_says_so(quality: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "code_version", lambda: {"git_commit": "ab" * 20, "git_dirty": True})
    assert quality.git_commit() == "ab" * 20 + "+uncommitted"
    monkeypatch.setattr(quality, "code_version", lambda: {"git_commit": "ab" * 20, "git_dirty": False})
    assert quality.git_commit() == "ab" * 20
    monkeypatch.setattr(quality, "code_version", lambda: {"git_commit": None, "note": "not a git checkout"})
    assert quality.git_commit() == "unknown"
