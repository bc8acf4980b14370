"""Pooled FVU and the learning-rate / sparsity schedules against hand-computed values."""

import math

import pytest
import torch

from gs_lightning.evaluation.metrics import (
    FiringStatistics,
    PooledFVU,
    batch_fvu,
    explained_variance,
)
from gs_lightning.train.schedules import lr_factor, sparsity_warmup


def test_pooled_fvu_differs_from_mean_of_batch_fvus() -> None:
    # Batch 1: x = [1, 3] (mean 2, variance sum 2), errors 1 each -> SSE 2, FVU 1.
    # Batch 2: x = [10, 10] (variance 0 within the batch), errors 0.5 each -> SSE 0.5.
    # Pooled: x = [1, 3, 10, 10], mean 6, sum of squares about the mean 25+9+16+16 = 66,
    # SSE 2.5 -> FVU 2.5 / 66; the per-batch FVU of batch 2 is infinite.
    x1, xh1 = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.0]])
    x2, xh2 = torch.tensor([[10.0], [10.0]]), torch.tensor([[10.5], [9.5]])
    metric = PooledFVU(1)
    metric.update(x1, xh1)
    metric.update(x2, xh2)
    assert metric.compute().item() == pytest.approx(2.5 / 66, rel=1e-6)
    assert batch_fvu(x1, xh1).item() == pytest.approx(1.0)
    assert math.isinf(batch_fvu(x2, xh2).item())


def test_fvu_is_about_the_mean_not_zero() -> None:
    # A constant offset: predicting the mean exactly leaves FVU 1, though MSE/||x||^2 is tiny.
    x = 100.0 + torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    x_hat = torch.full_like(x, 100.0)
    metric = PooledFVU(2)
    metric.update(x, x_hat)
    assert metric.compute().item() == pytest.approx(1.0)


def test_lr_warmup_is_cosine_from_a_tenth() -> None:
    assert lr_factor(0, 1000) == pytest.approx(0.1)
    assert lr_factor(500, 1000) == pytest.approx(0.55)
    assert lr_factor(250, 1000) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert lr_factor(1000, 1000) == 1.0 and lr_factor(50_000, 1000) == 1.0


def test_lr_decay_over_final_fraction() -> None:
    assert lr_factor(799, 0, total_steps=1000, decay_fraction=0.2) == 1.0
    assert lr_factor(900, 0, total_steps=1000, decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_factor(1000, 0, total_steps=1000, decay_fraction=0.2) == 0.0


def test_sparsity_warmup_is_linear_from_zero() -> None:
    assert sparsity_warmup(0, 10_000) == 0.0
    assert sparsity_warmup(2_500, 10_000) == 0.25
    assert sparsity_warmup(20_000, 10_000) == 1.0
    assert sparsity_warmup(3, 0) == 1.0


def test_validation_metrics_pool_over_tokens_not_batches() -> None:
    # Two validation batches of different sizes: L0 and MSE must be means over tokens.
    from gs_lightning.saes import ReLUSAE
    from gs_lightning.train.module import SAETrainingModule

    sae = ReLUSAE(2, 2)
    with torch.no_grad():  # identity encoder, zero decoder: f = relu(x), x_hat = 0
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.zero_()
    module = SAETrainingModule(sae)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    module.validation_step(torch.tensor([[1.0, 1.0]]), 0)  # l0 2, mse 2
    module.validation_step(torch.tensor([[1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]), 1)  # l0 1, 0, 0; mse 2 each
    scores = module.val_scores[0].compute()
    assert scores["l0"].item() == pytest.approx(3 / 4)  # per-batch mean of means would say 1.17
    assert scores["mse"].item() == pytest.approx(2.0)


def test_firing_statistics_by_hand() -> None:
    stats = FiringStatistics(3, dense_threshold=0.5)
    stats.update(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    stats.update(torch.tensor([[0.0, 3.0, 0.0]]))
    out = stats.compute()
    assert float(out["l0"]) == pytest.approx(1.0)  # 3 activations over 3 tokens
    assert float(out["dead_frac"]) == pytest.approx(1 / 3)  # latent 2 never fired
    assert float(out["dense_frac"]) == pytest.approx(1 / 3)  # latent 1 fired on 2 of 3 tokens
    torch.testing.assert_close(out["density"], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert explained_variance(0.25) == 0.75
