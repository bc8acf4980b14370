"""Save the trained SAE (input scale folded in) as safetensors + JSON at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from gs_lightning.formats.io import plain_scale, save_sae
from gs_lightning.train.parallel import whole_saes


class SaveSAE(pl.Callback):
    """Write ``sae.safetensors`` and ``config.json`` when ``fit`` ends.

    A packed sweep writes one such folder per SAE, named after it: ``dirpath`` with the
    SAE's name inserted before its last part, e.g. ``<log_dir>/sparsity_coefficient=0.0003/sae``.
    A latent-sharded SAE (``model.latent_parallel``) is gathered and written whole by rank 0.

    Args:
        dirpath: Output folder; default ``<log_dir>/sae`` of the run.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: Path | None = None
        self.saved_paths: dict[str | None, Path] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, before the rank check
        named = whole_saes(pl_module)  # a collective for a latent-sharded SAE: before the rank check
        if not trainer.is_global_zero:
            return
        path = Path(self.dirpath) if self.dirpath else Path(log_dir or trainer.default_root_dir) / "sae"
        datamodule = getattr(trainer, "datamodule", None)
        for name, sae in named:
            metadata = dict(getattr(datamodule, "metadata", {}) or {})
            metadata["global_step"] = trainer.global_step
            metadata["final_metrics"] = final_metrics(trainer.callback_metrics, name)
            if name is not None:
                metadata["sweep_member"] = name
            target = path if name is None else path.parent / name / path.name
            target_scale = getattr(pl_module, "target_scale", None)
            self.saved_paths[name] = save_sae(sae, target, plain_scale(pl_module.input_scale), metadata,
                                              None if target_scale is None else plain_scale(target_scale))
            print(f"saved SAE to {self.saved_paths[name]}", flush=True)
        self.saved_path = next(iter(self.saved_paths.values()))


def final_metrics(metrics: dict[str, Any], name: str | None) -> dict[str, float]:
    """Scalar ``a/b`` metrics of one SAE under their plain keys (``val/l0/<name>`` -> ``val/l0``).

    For a sweep member, metrics of other members are left out; shared ones (no member
    suffix, e.g. ``train/sparsity_warmup``) are kept.
    """
    def scalar(key: str) -> bool:
        return "/" in key and metrics[key].numel() == 1

    if name is None:
        return {k: float(v) for k, v in metrics.items() if scalar(k)}
    suffix = f"/{name}"
    own = {k[: -len(suffix)]: float(v) for k, v in metrics.items() if k.endswith(suffix) and scalar(k)}
    # A shared key has one slash (train/x); members' keys have two (train/x/<name>).
    shared = {k: float(v) for k, v in metrics.items() if scalar(k) and k.count("/") == 1}
    return {**shared, **own}
