"""A progress bar that counts optimizer steps, for runs that stop at ``max_steps``.

Lightning's bar counts batches of an epoch ("Epoch 0/-2" on an endless stream, where
``max_epochs`` is -1), shows the logger's version as ``v_num`` and every progress-bar
metric with three decimals, which wraps over several lines at 80 columns. An SAE run is
counted in steps: this bar reads ``train ━━━━ 1200/3000 0:02:01 • 0:03:02 9.9it/s l0 71.3
fvu 0.0251``, and prints one line of validation figures at each validation.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_only

from callbacks.summary import metric_lines

# What the bar shows of the first SAE's training metrics (the module logs them only when
# a bar is shown, on logging steps): short names and three significant digits.
BAR_METRICS = ("l0", "fvu")
# The line printed at each validation (the final summary has the rest).
VALIDATION_LINE = ("val/l0", "val/fvu", "val/delta_loss", "val/never_fire_frac")


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps toward ``trainer.max_steps``.

    Without ``max_steps`` (an epoch-counted run on in-memory data) it counts the batches
    of each epoch and reads ``epoch 2/5``. Chosen by the CLI whenever the config names no
    progress bar of its own and ``trainer.enable_progress_bar`` is true.

    Args:
        bar_width: Width of the bar in columns; 20 keeps the whole line within 80.
        refresh_rate: Redraws per second.
    """

    def __init__(self, bar_width: int = 20, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate, theme=RichProgressBarTheme(metrics_format=".3g"))
        self.bar_width = bar_width

    @property
    def validation_description(self) -> str:
        return "val"

    def configure_columns(self, trainer: pl.Trainer) -> list:
        columns = super().configure_columns(trainer)
        columns[1].bar_width = self.bar_width  # the bar itself; Lightning's default is 40
        return columns

    def _get_train_description(self, current_epoch: int) -> str:
        if self._counts_steps():
            return "train"
        return f"epoch {current_epoch + 1}/{self.trainer.max_epochs}"

    def _counts_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._counts_steps():
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The step count rather than the batch index, so that a resumed run and gradient
        # accumulation both read true: completed steps out of max_steps.
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        done = trainer.global_step if self._counts_steps() else batch_idx + 1
        self._update(self.train_progress_bar_id, done)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {key: f"{float(items[key]):.3g}" for key in BAR_METRICS if key in items}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._print("\n".join(metric_lines(trainer, VALIDATION_LINE, f"step {trainer.global_step}")))

    @rank_zero_only
    def _print(self, text: str) -> None:
        # Through the bar's console, so the line lands above the live bar, not inside it.
        if self._console is not None:
            self._console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(text, flush=True)
