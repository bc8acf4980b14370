"""Run records: what a run directory must hold to say exactly what produced it.

Every ``fit`` writes, next to Lightning's checkpoints and the saved SAEs:

- ``config.yaml``: the fully resolved config (every default filled in, the seed included),
  which ``python -m gs_lightning fit --config <run>/config.yaml`` re-runs;
- ``run.json``: package versions, the git commit of the code (and whether the checkout
  had uncommitted changes), the data's identity (for harvested shards the sha256 of
  each manifest, which lists every shard's checksum), and the command line;
- ``metrics.json`` at the end of fit: the final logged metrics.

With a W&B logger on, the resolved config and the record go to the run's config too.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger

from gs_lightning.data import files

PACKAGES = ("gs-lightning", "torch", "lightning", "torchmetrics", "transformers", "safetensors", "datasets",
            "jsonargparse", "numpy", "wandb", "bitsandbytes", "torch-xla")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def code_version() -> dict[str, Any]:
    """Git commit of the checkout the package runs from, and whether it had local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "note": "not a git checkout (installed package)"}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def data_identity(datamodule: Any) -> dict[str, Any]:
    """What the training data was: for shards the sha256 of each manifest, for live data
    the model, revision, text and site (from the DataModule's ``metadata``)."""
    identity: dict[str, Any] = {"class": type(datamodule).__name__}
    meta = getattr(datamodule, "metadata", {}) or {}
    identity.update({k: meta[k] for k in ("model", "revision", "site", "target_site", "text", "text_split",
                                          "context_size", "input_scale") if k in meta})
    folders = list(getattr(datamodule, "paths", [])) + list(getattr(datamodule, "target_paths", [])) + \
        list(getattr(datamodule, "val_paths", []))
    if folders:
        identity["manifests"] = {
            folder: hashlib.sha256(files.read_bytes(files.join(folder, "manifest.json"))).hexdigest()
            for folder in folders
        }
    return identity


def run_record(trainer: pl.Trainer) -> dict[str, Any]:
    """The record of the run ``trainer`` is about to fit."""
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "packages": package_versions(),
        "code": code_version(),
        "data": data_identity(trainer.datamodule) if trainer.datamodule is not None else None,
        "accelerator": type(trainer.accelerator).__name__,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
    }


class RecordingSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver that also writes ``run.json`` and ``metrics.json`` and,
    with a W&B (or any) logger, logs the resolved config and the record as hyperparameters."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir is a broadcast: read it on every rank here, never inside
        # save_config, which Lightning calls on rank 0 only (a DDP run would hang).
        self._log_dir = trainer.log_dir
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        record = run_record(trainer)
        if self._log_dir is not None:
            _write_json(Path(self._log_dir) / "run.json", record)
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            if isinstance(logger, Logger) and type(logger).__name__ == "WandbLogger":
                logger.log_hyperparams({"config": json.loads(config), "run": record})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast: every rank must take part
        if trainer.is_global_zero and log_dir is not None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            _write_json(Path(log_dir) / "metrics.json", {"step": trainer.global_step, "metrics": metrics})


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")
