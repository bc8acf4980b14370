"""Save the trained SAE (input scale folded in) as safetensors + JSON at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from gs_lightning.io import save_sae


class SaveSAE(pl.Callback):
    """Write ``sae.safetensors`` and ``config.json`` when ``fit`` ends.

    Args:
        dirpath: Output folder; default ``<log_dir>/sae`` of the run.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "sae"
        datamodule = getattr(trainer, "datamodule", None)
        metadata = dict(getattr(datamodule, "metadata", {}) or {})
        metadata["global_step"] = trainer.global_step
        metadata["final_metrics"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and v.numel() == 1
        }
        self.saved_path = save_sae(pl_module.sae, path, float(pl_module.input_scale), metadata)
        print(f"saved SAE to {self.saved_path}", flush=True)
