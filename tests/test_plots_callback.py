"""SavePlots: frontier and density pictures next to the run, and to W&B (offline) when it is on."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from callbacks import SavePlots
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.evaluation.metrics import FiringStatistics
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

D, S = 16, 64


def _fit(tmp_path, sweep=None, logger=False) -> tuple[SavePlots, SAETrainingModule, SyntheticActivationDataModule]:
    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=D, n_features=48, active_features=3, n_tokens=4096,
                                         batch_size=256, val_fraction=0.25)
    module = SAETrainingModule(JumpReLUSAE(D, S, sparsity_coefficient=1e-3), lr=3e-3, lr_warmup_steps=2,
                               sparsity_warmup_steps=5, sweep=sweep)
    plots = SavePlots()
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[plots],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return plots, module, data


def test_pictures_of_a_packed_sweep(tmp_path) -> None:
    plots, module, data = _fit(tmp_path, sweep={"sparsity_coefficient": [1e-4, 1e-1]})
    names = [name for name, _ in module.named_saes()]
    assert [row["sae"] for row in plots.rows] == names  # one frontier point per SAE
    assert plots.rows[0]["l0"] > plots.rows[1]["l0"]  # more sparsity, lower L0
    assert set(plots.densities) == set(names)
    for name, sae in module.named_saes():  # the density is the validation set's firing rate
        stats = FiringStatistics(S)
        for batch in data.val_dataloader():
            stats.update(sae.encode(batch * module.input_scale.float()))
        torch.testing.assert_close(plots.densities[name], stats.compute()["density"])
        assert float(stats.compute()["l0"]) == pytest.approx(plots.rows[names.index(name)]["l0"], rel=1e-5)
    for key in ("frontier", "density"):
        path = plots.paths[key]
        assert path.parent == tmp_path / "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_go_to_wandb_when_it_is_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gs-lightning-test", save_dir=str(tmp_path), offline=True)
    plots, _, _ = _fit(tmp_path, logger=logger)
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = sorted(p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "plots").glob("*.png"))
    assert images == ["density", "frontier"]
    assert plots.paths["frontier"].is_file()  # local files always, W&B or not
