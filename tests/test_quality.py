"""Quality regression: the default JumpReLU recipe must keep producing good SAEs.

A short run on real activations (the embedded model's quickstart site, ~100k tokens) at a
small width, checked against bounds taken from ``benchmarks/quality.py``'s setting with a
margin: the Gemma Scope recipe (unit encoder at init) fails them, so a recipe that slid
back towards it would too. A ``target_l0`` run must land within 10% of its target.
"""

from __future__ import annotations

from itertools import islice

import lightning.pytorch as pl
import pytest
import torch

from gs_lightning.data.memory import InMemoryActivationDataModule
from gs_lightning.evaluation.metrics import FiringStatistics, PooledFVU
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.sites import ActivationExtractor
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

SITE = "blocks.1.hook_resid_post"
D_SAE, STEPS, BATCH = 512, 600, 512
# Measured with these settings: the default recipe at lambda 1e-3 reached L0 43.9 / FVU
# 0.0650 with no never-firing latent (AuxK 1.0, the pre-activation loss 0.1 on the
# thresholds; 43.5 / 0.0638 under AuxK 0.5 alone); the Gemma Scope recipe L0 61.6 /
# FVU 0.0825.
MAX_L0, MAX_FVU, MAX_NEVER_FIRE = 50.0, 0.072, 0.05


@pytest.fixture(scope="module")
def activations() -> tuple[torch.Tensor, torch.Tensor]:
    """~100k train and 16k held-out activations of the quickstart site."""
    lm, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    out = []
    for split, n in (("train", 800), ("validation", 128)):
        contexts = torch.stack(list(islice(iter_contexts(iter_texts("kjv", split=split), tokenizer, 128), n)))
        rows = []
        with ActivationExtractor(lm, [SITE]) as extract, torch.no_grad():
            for ids in contexts.split(32):
                rows.append(extract(ids)[SITE][content_mask(ids, tokenizer)].float())
        out.append(torch.cat(rows))
    train = out[0][torch.randperm(out[0].shape[0], generator=torch.Generator().manual_seed(0))]
    return train, out[1]


class _Rows(InMemoryActivationDataModule):
    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__(batch_size=BATCH, input_scaling="unit_mean_squared_norm", val_fraction=0.0, seed=0)
        self.rows = rows

    def load(self) -> torch.Tensor:
        return self.rows

    @property
    def d_in(self) -> int:
        return self.rows.shape[1]


def _train(sae: JumpReLUSAE, train: torch.Tensor) -> SAETrainingModule:
    torch.manual_seed(0)
    # The quickstart's optimisation (configs/quickstart.yaml), scaled to 600 steps.
    module = SAETrainingModule(sae, lr=1e-3, adam_betas=(0.5, 0.999), lr_warmup_steps=20, lr_decay_fraction=0.2,
                               sparsity_warmup_steps=200)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=_Rows(train))
    return module


@torch.no_grad()
def _measure(module: SAETrainingModule, val: torch.Tensor) -> dict[str, float]:
    sae = module.sae.eval()
    x = val * module.input_scale.float()
    f = sae.encode(x)
    fvu, firing = PooledFVU(val.shape[1]), FiringStatistics(sae.d_sae)
    fvu.update(x, sae.decode(f))
    firing.update(f)
    stats = firing.compute()
    return {"l0": float(stats["l0"]), "fvu": float(fvu.compute()), "never_fire": float(stats["dead_frac"])}


@pytest.mark.slow
def test_default_recipe_reaches_the_benchmarked_quality(activations) -> None:
    train, val = activations
    figures = _measure(_train(JumpReLUSAE(128, D_SAE, sparsity_coefficient=1e-3), train), val)
    assert figures["l0"] < MAX_L0 and figures["fvu"] < MAX_FVU, figures
    assert figures["never_fire"] < MAX_NEVER_FIRE, figures


@pytest.mark.slow
def test_gemma_scope_recipe_fails_the_bounds(activations) -> None:
    """The bounds are not loose: the recipe this project used to ship does not meet them."""
    train, val = activations
    old = JumpReLUSAE(128, D_SAE, sparsity_coefficient=1e-3, encoder_init_scale=1.0, bandwidth=0.001,
                      threshold_init=0.001, aux_coefficient=0.0, dead_coefficient=0.0, normalize_decoder=True,
                      bias_lr_scale=1.0, normalize_gradient=False)
    figures = _measure(_train(old, train), val)
    assert figures["l0"] > MAX_L0 and figures["fvu"] > MAX_FVU, figures  # worse on both axes


@pytest.mark.slow
@pytest.mark.parametrize("target", [10.0, 40.0])
def test_target_l0_lands_within_ten_percent(activations, target: float) -> None:
    train, val = activations
    # The thresholds at the full lr: at the default lr / sqrt(d) (SAELens' units, chosen on
    # synthetic worlds, docs/results/ground_truth.md) a threshold moves at most ~0.05 in these
    # 600 steps, and target 10 stopped at L0 15.8: a short run needs bias_lr_scale 1 (or more steps).
    sae = JumpReLUSAE(128, D_SAE, target_l0=target, sparsity_coefficient=0.01, bias_lr_scale=1.0)
    figures = _measure(_train(sae, train), val)
    assert abs(figures["l0"] - target) < 0.1 * target, figures
