"""Metrics pooled over a whole evaluation set, correct across ranks (torchmetrics states).

FVU is the fraction of variance unexplained *about the mean*:
``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with sums over every token seen, not an
average of per-batch ratios (which is biased) and not variance about zero (which makes
any SAE look good on activations with a large mean).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense (train, val, evaluate)."""


class PooledFVU(Metric):
    """Fraction of variance unexplained, pooled over every update (and every rank)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, d_in: int, **kwargs: Any) -> None:
        """``kwargs`` go to torchmetrics' ``Metric`` (e.g. ``sync_on_compute=False``)."""
        super().__init__(**kwargs)
        # float64: sums of squares over millions of tokens lose digits in float32.
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:  # type: ignore[override]
        x64 = x.detach().reshape(-1, x.shape[-1]).double()
        self.sse += (x_hat.detach().reshape_as(x64).double() - x64).pow(2).sum()
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum()
        self.n += x64.shape[0]

    def compute(self) -> Tensor:
        total_var = self.sum_sq - self.sum_x.pow(2).sum() / self.n
        return (self.sse / total_var).float()


class FiringStatistics(Metric):
    """How often each latent fires, pooled over every update (and every rank).

    ``compute`` returns L0 (mean active latents per token), the dead fraction (latents
    that never fired on these tokens), the dense fraction (latents firing on more than
    ``dense_threshold`` of tokens), the per-latent firing rate (feature density) and the
    number of tokens.
    """

    full_state_update = False

    def __init__(self, d_sae: int, dense_threshold: float = 0.1, **kwargs: Any) -> None:
        """``kwargs`` go to torchmetrics' ``Metric`` (e.g. ``sync_on_compute=False``)."""
        super().__init__(**kwargs)
        self.dense_threshold = dense_threshold
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, f: Tensor, tokens: int | None = None) -> None:  # type: ignore[override]
        """Count the latents active in activations ``f [..., d_sae]``; or, with ``tokens``,
        add ``f [d_sae]`` as per-latent firing counts over that many tokens."""
        if tokens is not None:
            self.fires += f.detach().to(torch.float64)
            self.tokens += tokens
            return
        active = (f.detach() != 0).reshape(-1, f.shape[-1])
        self.fires += active.sum(0, dtype=torch.float64)
        self.tokens += active.shape[0]

    def compute(self) -> dict[str, Tensor]:
        density = self.fires / self.tokens
        return {
            "l0": self.fires.sum() / self.tokens,
            "dead_frac": (self.fires == 0).double().mean(),
            "dense_frac": (density > self.dense_threshold).double().mean(),
            "density": density,
            "tokens": self.tokens.clone(),
        }


def explained_variance(fvu: Tensor | float) -> Tensor | float:
    """Explained variance, ``1 - FVU`` (both about the mean)."""
    return 1 - fvu


def batch_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """FVU of one batch about the batch mean (for training logs; eval uses :class:`PooledFVU`)."""
    x = x.detach().float()
    centred = x - x.mean(0, keepdim=True)
    return (x_hat.detach().float() - x).pow(2).sum() / centred.pow(2).sum()
