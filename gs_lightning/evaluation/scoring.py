"""Reconstruction scores of an SAE over a whole set of tokens, computed in one place.

The validation loop, ``python -m gs_lightning evaluate`` and the suite's evaluation all
feed a :class:`ReconstructionScorer` their batches, whatever they come from (validation
rows, a language model's activations, a harvest's shards):

* ``fvu``: pooled over the set, ``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``
  (:class:`~gs_lightning.evaluation.metrics.PooledFVU`), and ``explained_variance = 1 - fvu``;
* ``mse``: the squared error summed over the output, averaged over tokens;
* ``l0``, ``density`` (each latent's firing rate), ``dense_frac`` (latents firing on more than
  :data:`~gs_lightning.evaluation.metrics.DENSE_THRESHOLD` of tokens) and ``dead_frac``: latents that
  fired on none of the tokens, i.e. dead (:mod:`gs_lightning.saes.dead`) with the whole set
  as the window;
* for a dictionary over stacked sites, ``fvu_sites`` (per output site) and ``l0_sites``
  (per block of latents, where there is one per input site).

The states are torchmetrics states, summed across ranks by ``compute``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from gs_lightning.evaluation.metrics import (
    DENSE_THRESHOLD,
    FiringStatistics,
    PooledFVU,
    explained_variance,
)
from gs_lightning.saes import SAE


class ReconstructionScorer(nn.Module):
    """Pooled reconstruction and firing scores of one SAE (shapes taken from ``sae``)."""

    def __init__(self, sae: SAE, dense_threshold: float = DENSE_THRESHOLD) -> None:
        super().__init__()
        sites = sae.out_shape[0] if len(sae.out_shape) > 1 else 0
        self.latent_blocks = sae.latent_blocks or 0
        self.fvu = PooledFVU(sae.out_width * max(sites, 1))
        self.site_fvu = nn.ModuleList([PooledFVU(sae.out_width) for _ in range(sites)])
        self.mse = MeanMetric()
        self.firing = FiringStatistics(sae.d_sae, dense_threshold)

    @property
    def empty(self) -> bool:
        """Whether no batch was scored since the last reset."""
        return self.firing.update_count == 0

    @torch.no_grad()
    def update(self, target: Tensor, x_hat: Tensor, f: Tensor | None = None, counts: Tensor | None = None) -> None:
        """Score one batch: ``target`` and its reconstruction ``x_hat`` (``[tokens, *out_shape]``,
        in the units to score), and the latents ``f [tokens, d_sae]`` or, where only they
        are at hand (a latent-sharded SAE), the firing ``counts [d_sae]``."""
        self.fvu.update(target.flatten(1), x_hat.flatten(1))  # stacked sites: one row per token
        for j, metric in enumerate(self.site_fvu):
            metric.update(target[:, j], x_hat[:, j])
        self.mse.update((x_hat - target).pow(2).flatten(1).sum(-1))
        if f is not None:
            self.firing.update(f)
        else:
            self.firing.update(counts, tokens=target.shape[0])

    def compute(self) -> dict[str, Any]:
        """The scores (tensors) of every batch since the last reset, across ranks."""
        stats, fvu = self.firing.compute(), self.fvu.compute()
        scores = {"l0": stats["l0"], "fvu": fvu, "explained_variance": explained_variance(fvu),
                  "mse": self.mse.compute(), "dead_frac": stats["dead_frac"], "dense_frac": stats["dense_frac"],
                  "density": stats["density"], "tokens": stats["tokens"]}
        if len(self.site_fvu):
            scores["fvu_sites"] = torch.stack([metric.compute() for metric in self.site_fvu])
        if self.latent_blocks:
            scores["l0_sites"] = stats["density"].view(self.latent_blocks, -1).sum(-1)
        return scores

    def reset(self) -> None:
        for metric in (self.fvu, self.mse, self.firing, *self.site_fvu):
            metric.reset()


@torch.no_grad()
def score(sae: SAE, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """The scores of ``sae`` on ``(input, target)`` batches (the target is what it
    reconstructs: the input itself for an SAE), with scalars as floats and ``tokens`` an int."""
    scorer = ReconstructionScorer(sae).to(next(sae.parameters()).device)
    for x, y in batches:
        f = sae.encode(x)
        scorer.update(y, sae.decode(f, x), f)
    scores = scorer.compute()
    return {k: int(v) if k == "tokens" else float(v) if v.dim() == 0 else v for k, v in scores.items()}
