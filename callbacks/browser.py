"""Build the feature browser of the SAE a run just saved, when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from callbacks.save_sae import SaveSAE
from gs_lightning.errors import ConfigError


class BuildBrowser(pl.Callback):
    """Run ``python -m gs_lightning browse`` on every SAE that ``callbacks.SaveSAE`` wrote.

    List it after ``callbacks.SaveSAE``. A run on harvested shards reads its own training
    shards; a run on live activations first harvests ``tokens`` tokens of its site into
    ``<log_dir>/browser/harvest``. Each SAE's site goes to ``<sae>/../browser``.
    Off in the quickstart: on its SAE the browser over 1M tokens costs more than the
    20% of the run's time we allow a default callback (docs: "Look inside").

    Args:
        tokens: Tokens to harvest for a live-data run.
        k: Top-activating examples per latent.
        intervals: Activation intervals sampled for examples (0: none).
        samples: Examples per interval.
        neuronpedia: Also write Neuronpedia's upload JSON.
    """

    def __init__(self, tokens: int = 1_000_000, k: int = 20, intervals: int = 10, samples: int = 5,
                 neuronpedia: bool = True) -> None:
        self.tokens, self.k, self.intervals, self.samples, self.neuronpedia = tokens, k, intervals, samples, neuronpedia
        self.built: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Checked before training, so a misordered config costs nothing.
        callbacks = list(trainer.callbacks)
        if not any(isinstance(cb, SaveSAE) for cb in callbacks[: callbacks.index(self)]):
            raise ConfigError("callbacks.BuildBrowser browses the SAE that callbacks.SaveSAE saves: list "
                              "callbacks.SaveSAE before it in trainer.callbacks")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from gs_lightning.browse.build import browse

        saved = [path for cb in trainer.callbacks if isinstance(cb, SaveSAE) for path in cb.saved_paths.values()]
        shards = _training_shards(getattr(trainer, "datamodule", None))
        for path in saved:
            try:
                self.built += browse(str(path), shards=shards, tokens=self.tokens, k=self.k,
                                     intervals=self.intervals, samples=self.samples, neuronpedia=self.neuronpedia,
                                     device=str(pl_module.device.type))
            except ConfigError as err:  # the SAE is saved already: report, do not fail the run
                rank_zero_warn(f"callbacks.BuildBrowser: no browser for {path}: {err}")


def _training_shards(datamodule: object) -> str | None:
    """The site folder a sharded DataModule trains on (its first, for a list), else None."""
    paths = getattr(datamodule, "paths", None)
    if not paths:
        return None
    return str(paths[0] if isinstance(paths, (list, tuple)) else paths)
