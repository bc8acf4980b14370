"""Print the final sparsity and reconstruction figures of a run."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class FinalSummary(pl.Callback):
    """At the end of ``fit`` or ``validate``, print L0 and FVU (validation figures if any)."""

    KEYS = ("val/l0", "val/fvu", "val/mse", "val/delta_loss", "val/loss_recovered", "train/l0", "train/fvu",
            "train/dead_frac")

    def summary(self, trainer: pl.Trainer) -> str:
        """One line: step and the metrics of :attr:`KEYS` that were logged."""
        metrics = trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4g}" for k in self.KEYS if k in metrics]
        return f"final (step {trainer.global_step}): " + (", ".join(parts) or "no metrics logged")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _print(self.summary(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            _print(self.summary(trainer))


@rank_zero_only
def _print(line: str) -> None:
    # print, not logging: this is the line a user runs the quickstart to see.
    print(line, flush=True)
