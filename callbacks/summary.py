"""Print the final sparsity and reconstruction figures of a run."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

# The ground-truth scores are logged only on a synthetic world's harvest (they name what it
# recovered of the true features).
VAL_KEYS = ("val/l0", "val/fvu", "val/mse", "val/delta_loss", "val/loss_recovered", "val/never_fire_frac",
            "val/dense_frac", "val/mcc", "val/f1", "val/uniqueness")


def metric_lines(trainer: pl.Trainer, keys: Sequence[str], label: str) -> list[str]:
    """``"<label>: key value, ..."`` per SAE for the ``keys`` that were logged (4 significant
    digits); a packed sweep gives one line per SAE, its name at the end."""
    module = trainer.lightning_module
    names = [name for name, _ in module.named_saes()] if hasattr(module, "named_saes") else [None]
    metrics = trainer.callback_metrics
    lines = []
    for name in names:
        suffix = "" if name is None else f"/{name}"
        parts = [f"{k} {float(metrics[k + suffix]):.4g}" for k in keys if k + suffix in metrics]
        line = f"{label}: " + (", ".join(parts) or "no metrics logged")
        lines.append(line if name is None else f"{line} [{name}]")
    return lines


class FinalSummary(pl.Callback):
    """At the end of ``fit`` or ``validate``, print L0 and FVU (validation figures if any).

    A packed sweep prints one line per SAE, its name at the end.
    """

    KEYS = (*VAL_KEYS, "train/l0", "train/fvu", "train/dead_frac")

    def summary(self, trainer: pl.Trainer) -> str:
        """One line per SAE: step and the metrics of :attr:`KEYS` that were logged."""
        return "\n".join(metric_lines(trainer, self.KEYS, f"final (step {trainer.global_step})"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _print(self.summary(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            _print(self.summary(trainer))


@rank_zero_only
def _print(line: str) -> None:
    # print, not logging: this is the line a user runs the quickstart to see.
    print(line, flush=True)
