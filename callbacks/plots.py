"""Pictures of a run at the end of ``fit``: the sparsity-fidelity frontier and feature density."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from gs_lightning.evaluation.metrics import FiringStatistics, PooledFVU
from gs_lightning.evaluation.plots import plot_density, plot_frontier
from gs_lightning.train.parallel import whole_saes


class SavePlots(pl.Callback):
    """Write ``frontier.png`` (L0 against FVU and delta LM loss, one point per SAE: one for a
    single SAE, K for a packed sweep) and ``density.png`` (log10 firing rate per latent on
    the validation set) into ``dirpath``; when a W&B logger is on, log both images and a
    density histogram per SAE there too.

    L0, FVU and density are measured on the validation set with the final weights (a
    latent-sharded SAE is gathered to rank 0 first); the delta LM loss comes from the
    ``DeltaLMLoss`` callback when it ran on the final weights.

    Args:
        dirpath: Output folder; default ``<log_dir>/plots`` (``<default_root_dir>/plots``
            without a logger).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.paths: dict[str, Path] = {}
        self.rows: list[dict[str, Any]] = []
        self.densities: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated_at = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, before the rank check
        saes = whole_saes(pl_module)  # a collective for a latent-sharded SAE: before the rank check
        if trainer.is_global_zero:
            folder = Path(self.dirpath or Path(log_dir or trainer.default_root_dir) / "plots")
            self._draw(trainer, pl_module, folder, saes)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path,
              saes: list[tuple[str | None, Any]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        stats = self._measure(trainer, pl_module, saes)
        self.rows, self.densities = [], {}
        for name, (firing, fvu) in stats.items():
            figures = firing.compute()
            row = {"sae": name, "l0": float(figures["l0"]), "fvu": float(fvu.compute())}
            # delta LM loss only when the last validation saw the final weights.
            key = "val/delta_loss" + ("" if name == "sae" else f"/{name}")
            if key in trainer.callback_metrics and getattr(self, "_validated_at", None) == trainer.global_step:
                row["delta_loss"] = float(trainer.callback_metrics[key])
            self.rows.append(row)
            self.densities[name] = figures["density"]
        if self.rows:
            self.paths["frontier"] = plot_frontier(self.rows, folder / "frontier.png")
            self.paths["density"] = plot_density(self.densities, folder / "density.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _to_wandb(logger, self.paths, self.densities, trainer.global_step)

    @staticmethod
    @torch.no_grad()
    def _measure(trainer: pl.Trainer, pl_module: pl.LightningModule,
                 saes: list[tuple[str | None, Any]]) -> dict[str, tuple[FiringStatistics, PooledFVU]]:
        """Firing statistics and pooled FVU of each SAE's final weights on the validation set."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return {}
        # Rank 0 measures the whole validation set alone: its metrics must not wait for the
        # other ranks at compute() (torchmetrics syncs by default whenever a group is up).
        stats = {name or "sae": (FiringStatistics(sae.d_sae, sync_on_compute=False),
                                 PooledFVU(sae.out_width, sync_on_compute=False)) for name, sae in saes}
        scale = pl_module.input_scale.float()
        out_scale = getattr(pl_module, "target_scale", pl_module.input_scale).float()
        # A gathered latent-sharded SAE lives on the CPU, not on the module's device.
        device = next(saes[0][1].parameters()).device if saes else pl_module.device
        scale, out_scale = scale.to(device), out_scale.to(device)
        for batch in datamodule.val_dataloader():
            pair = isinstance(batch, (tuple, list))
            x = (batch[0] if pair else batch).to(device).float()
            y = batch[1].to(device).float() if pair else x  # a transcoder's target
            for name, sae in saes:
                f = sae.encode(x * scale)
                firing, fvu = stats[name or "sae"]
                firing.update(f.cpu())
                fvu.update(y.cpu(), (sae.decode(f, x * scale) / out_scale).cpu())  # x: a skip path's input
        return {name: s for name, s in stats.items() if s[0].tokens > 0}


def _to_wandb(logger: WandbLogger, paths: dict[str, Path], densities: dict[str, torch.Tensor], step: int) -> None:
    import wandb

    for key, path in paths.items():
        logger.log_image(key=f"plots/{key}", images=[str(path)], step=step)
    histograms = {}
    for name, density in densities.items():
        alive = density[density > 0].double().log10()
        histograms[f"plots/log10_density/{name}"] = wandb.Histogram(alive.numpy())
    logger.experiment.log({**histograms, "trainer/global_step": step})
