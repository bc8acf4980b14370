"""The console of a run shows ours, not third-party notices; other warnings still show."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

from callbacks.progress import StepProgressBar
from gs_lightning.console import quiet_third_party
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

REPO = Path(__file__).resolve().parents[1]
NOTICES = ("Tip: For seamless cloud", "try installing [litlogger]", "try installing [litmodels]",
           "`tensorboardX` has been removed", "isinstance(treespec, LeafSpec)")


# Lightning's defaults, which the CLI replaces: its epoch-counted bar and its model summary.
DEFAULTS = ("Epoch 0", "v_num", "Total FLOPs", "Modules in train mode", "PooledFVU")


def test_a_short_fit_prints_none_of_the_notices(tmp_path: Path) -> None:
    # Without the filters this run prints all five (the default logger, no litlogger).
    command = [sys.executable, "-m", "gs_lightning", "fit", "--config", "configs/synthetic.yaml",
               "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
               "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "80"})
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "saved SAE to" in console and "final (step 3)" in console  # the run's own lines are there
    assert [n for n in NOTICES + DEFAULTS if n in console] == []

    # The banner, from synthetic.yaml: d_in 64, d_sae 1,024, batches of 1,024.
    log_dir = tmp_path / "lightning_logs" / "version_0"
    params = 2 * 64 * 1024 + 2 * 1024 + 64  # W_enc, W_dec, b_enc, threshold, b_dec
    assert f"  SAE      JumpReLUSAE, 64 -> 1,024 latents, {params / 1e3:.3g} K parameters" in console
    assert "  tokens   3,072 = 3 steps x 1,024" in console
    assert f"  compute  {12 * 64 * 1024 * 3072 / 1e9:.3g} GFLOP in all" in console
    assert f"  outputs  {log_dir}" in console
    # One validation line at step 3, and the bar counts steps within 80 columns.
    assert re.search(r"^step 3: val/l0 [0-9.]+, val/fvu [0-9.]+", console, re.MULTILINE), console
    bar = [line for line in console.splitlines() if line.startswith("train ")]
    assert bar and "3/3" in bar[-1] and "l0: " in bar[-1] and len(bar[-1].rstrip()) <= 80, bar
    # The end summary lists what is in the log folder.
    outputs = console[console.index(f"outputs in {log_dir}:"):].splitlines()[1:]
    listed = [line.split()[0].rstrip("/") for line in outputs if line.startswith("  ")]
    assert sorted(listed) == sorted(p.name for p in log_dir.iterdir()) and "sae" in listed


def test_the_bar_counts_optimizer_steps(tmp_path: Path) -> None:
    # With 2 batches per step the bar reads steps (4 of 4), not batches (8).
    bar = StepProgressBar()
    module = SAETrainingModule(JumpReLUSAE(d_in=16, d_sae=64), lr=1e-3)
    data = SyntheticActivationDataModule(d_in=16, n_features=32, active_features=3, n_tokens=8192, batch_size=256)
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[bar], logger=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, data)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total, task.description) == (4, 4, "train")
    shown = bar.get_metrics(trainer, module)  # l0 and fvu only, 3 significant digits, no v_num
    assert sorted(shown) == ["fvu", "l0"]
    assert shown["l0"] == f"{float(trainer.progress_bar_metrics['l0']):.3g}"


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


def test_the_banner_names_a_synthetic_world_not_a_missing_model() -> None:
    from callbacks.run_summary import _describe_data

    world = {"model": None, "site": "world", "source": ["runs/w"], "world": "synthsaebench-cpu"}
    assert _describe_data(world) == "synthetic world synthsaebench-cpu world; harvested shards"
    lm = {"model": "gemma", "site": "blocks.1.hook_resid_post", "source": ["runs/h"], "context_size": 128}
    assert _describe_data(lm) == "gemma blocks.1.hook_resid_post; harvested shards, context 128"
