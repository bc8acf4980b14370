"""The console of a run shows ours, not third-party notices; other warnings still show."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from gs_lightning.console import quiet_third_party

REPO = Path(__file__).resolve().parents[1]
NOTICES = ("Tip: For seamless cloud", "try installing [litlogger]", "try installing [litmodels]",
           "`tensorboardX` has been removed", "isinstance(treespec, LeafSpec)")


def test_a_short_fit_prints_none_of_the_notices(tmp_path: Path) -> None:
    # Without the filters this run prints all five (the default logger, no litlogger).
    command = [sys.executable, "-m", "gs_lightning", "fit", "--config", "configs/synthetic.yaml",
               "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "saved SAE to" in console and "final (step 3)" in console  # the run's own lines are there
    assert [n for n in NOTICES if n in console] == []


def test_only_the_named_notices_are_dropped(caplog) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("an SAE warning of our own", UserWarning)
    assert [str(w.message) for w in caught] == ["an SAE warning of our own"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
