"""A small fake synthetic world for the world-harvest tests (``tests.world_helpers``): no SAELens needed."""

from __future__ import annotations

from pathlib import Path

import torch

from gs_lightning.data.ground_truth import GroundTruth


class FakeWorld:
    """Sparse nonnegative codes over a fixed random dictionary, drawn from torch's global generator
    (what :class:`gs_lightning.data.worlds.World` asks of a world)."""

    def __init__(self, n_features: int = 24, d: int = 8, p: float = 0.15) -> None:
        g = torch.Generator().manual_seed(1)
        self.features, self.bias = torch.randn(n_features, d, generator=g), torch.randn(d, generator=g)
        self.n_features, self.d, self.p = n_features, d, p
        self.record = {"source": "fake", "config": {"num_features": n_features, "hidden_dim": d, "p": p}}

    def prepare(self, folder: Path, device: torch.device) -> None:
        pass

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        on = torch.rand(n, self.n_features) < self.p
        true = torch.rand(n, self.n_features) * on
        return true @ self.features + self.bias, true

    def ground_truth(self) -> GroundTruth:
        return GroundTruth(self.features, self.bias)
