"""Keep one checkpoint of the latest step, replaced atomically, for resuming a killed run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl


class LastCheckpoint(pl.Callback):
    """Every ``every_n_steps`` training steps, save the run to ``path``, atomically.

    ``ModelCheckpoint(save_last=True)`` overwrites ``last.ckpt`` in place, so a kill -9
    during the write leaves a truncated file that cannot be resumed from. Here the
    checkpoint is written to a temporary sibling and renamed over ``path``: after a kill
    at any moment, ``path`` holds a complete checkpoint of some finished step (or does not
    exist yet), and ``fit --ckpt_path path`` continues exactly from it (exactly with
    ``ShardedActivationDataModule``, whose stream position is in the checkpoint).

    Args:
        path: The checkpoint file.
        every_n_steps: Steps between saves.
    """

    def __init__(self, path: str, every_n_steps: int = 500) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1")
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step >= (trainer.max_steps or 0) > 0:
            return  # the final step is saved as SAEs, not as a checkpoint
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # all state, to resume; collective under DDP
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
