"""Save a resumable checkpoint when the run is told to stop (SIGTERM), then exit cleanly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (a cluster's or spot instance's notice), save a checkpoint at the next
    batch boundary and exit with ``exit_code``.

    Lightning does the signal handling: its handler sets ``trainer.received_sigterm``
    (broadcast from rank 0 under DDP) and the loop finishes the current batch, then raises
    ``SIGTERMException``. This callback only saves the checkpoint in ``on_exception``, so
    the saved state is that of a completed step: weights, optimizer, schedules, loop
    counters and the DataModule's ``state_dict``. ``fit --ckpt_path <file>`` then resumes
    exactly where an uninterrupted run would be (exact with ``ShardedActivationDataModule``).
    A SIGTERM during validation stops it after the current batch; training resumes
    exactly, that validation is finished on resume.

    Any other exception saves nothing: its state may be mid-step.

    Args:
        dirpath: Folder of the checkpoint; default ``<log_dir>/checkpoints``, next to
            ``ModelCheckpoint``'s files.
        filename: Checkpoint file name, without ``.ckpt``.
        exit_code: Exit status of the stopped process (0, Lightning's, by default; e.g.
            143 lets a job script tell a preempted run from a finished one).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "preempted", exit_code: int = 0) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.exit_code = exit_code
        self.saved_path: Path | None = None

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint goes for ``trainer``'s run."""
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / f"{self.filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        # Collective under DDP (every rank gets here at the same step, rank 0 writes).
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path {path}")
        # Lightning re-raises this same SystemExit after the callbacks: its code is the exit status.
        exception.code = self.exit_code
