"""Delta LM loss as part of validation: how much next-token loss the SAE costs the model."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import lightning.pytorch as pl
import torch

from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.replacement import ReplacementPart, replacement_lm_loss
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.train.packed import metric_key


class DeltaLMLoss(pl.Callback):
    """After each validation, splice the SAE into the model and log ``val/delta_loss``,
    ``val/kl``, ``val/loss_recovered`` and ``val/ce_clean``.

    A packed sweep measures every SAE in turn (the model runs three times per SAE) and
    logs ``val/delta_loss/<name>`` and so on. A dictionary over stacked sites (a cross-layer
    transcoder) replaces every site it writes at once: the replacement model's figures
    (:func:`gs_lightning.evaluation.replacement_lm_loss`).

    The model, site and text come from the DataModule's ``metadata`` (model, site,
    text, val_split, context_size), so this works with any activation source that
    records them.

    Args:
        n_contexts: Held-out contexts evaluated each time (three forward passes each).
        batch_size: Contexts per forward pass.
    """

    def __init__(self, n_contexts: int = 64, batch_size: int = 8) -> None:
        self.n_contexts, self.batch_size = n_contexts, batch_size
        self._lm: Any = None
        self._stacked: tuple[list[str], list[str]] | None = None
        self._contexts: list[torch.Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "hparams", {}).get("latent_parallel"):
            # Refused before the model loads, rather than failing at the first validation.
            raise ConfigError("model.latent_parallel: callbacks.DeltaLMLoss cannot splice a latent-sharded SAE "
                              "into the model; drop it from trainer.callbacks and measure the saved SAE with "
                              "`python -m gs_lightning evaluate`")
        meta = dict(getattr(trainer.datamodule, "metadata", {}) or {})
        missing = [k for k in ("model", "site", "text", "context_size") if not meta.get(k)]
        if missing:
            raise ConfigError(f"callbacks.DeltaLMLoss needs the data's {missing}; "
                              f"{type(trainer.datamodule).__name__} does not record them")
        # float32, as evaluate measures; the same copy as a float32 live DataModule's.
        model, tokenizer = shared_language_model(meta["model"], meta.get("revision"), "float32")
        # A transcoder reads `site` and replaces `target_site`; a stacked dictionary reads
        # `input_sites` and replaces `target_sites` (or its inputs).
        self._lm = (model.to(pl_module.device), tokenizer, meta["site"], meta.get("target_site"))
        inputs = meta.get("input_sites")
        self._stacked = None if inputs is None else (list(inputs), list(meta.get("target_sites") or inputs))
        texts = iter_texts(meta["text"], split=meta.get("val_split", "validation"),
                           column=meta.get("text_column", "text"))
        self._contexts = list(itertools.islice(iter_contexts(texts, tokenizer, meta["context_size"]), self.n_contexts))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._lm is None:
            return
        model, tokenizer, site, target_site = self._lm
        named = pl_module.named_saes() if hasattr(pl_module, "named_saes") else [(None, pl_module.sae)]
        for name, sae in named:
            target_scale = getattr(pl_module, "target_scale", None)
            if self._stacked is not None:
                result = self._replacement(sae, pl_module, model, tokenizer)
            else:
                result = delta_lm_loss(model, tokenizer, sae, target_site or site, self._contexts, self.batch_size,
                                       input_scale=float(pl_module.input_scale),
                                       source_site=site if target_site else None,
                                       target_scale=None if target_scale is None else float(target_scale))
            for key in ("delta_loss", "kl", "loss_recovered", "ce_clean"):
                # Every rank measures the same contexts: the mean over ranks is that value, and
                # sync_dist keeps epoch-level logging consistent under DDP.
                pl_module.log(metric_key(f"val/{key}", name), result[key], on_epoch=True, sync_dist=True)

    def _replacement(self, sae: Any, pl_module: pl.LightningModule, model: Any, tokenizer: Any) -> dict[str, float]:
        """The replacement model's figures for a stacked dictionary, on a raw-unit copy of it."""
        raw = copy.deepcopy(sae)
        target_scale = getattr(pl_module, "target_scale", None)
        raw.fold_input_scale(pl_module.input_scale.flatten().tolist(),
                             None if target_scale is None else target_scale.flatten().tolist())
        inputs, outputs = self._stacked
        return replacement_lm_loss(model, tokenizer, [ReplacementPart(raw, inputs, outputs)], self._contexts,
                                   self.batch_size)
