"""``optimizer: adam8bit``: bitsandbytes' 8-bit Adam trains about as well as torch Adam,
keeps the matrices' moments in uint8 and the threshold's (and biases') in float32."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch

from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule
from gs_lightning.train.optim import build_optimizer, state_bytes

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (the bnb extra)")


def _fit(optimizer: str, tmp_path) -> tuple[float, float]:
    """(FVU before, FVU after) 150 steps on synthetic activations."""
    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=32, n_features=128, active_features=4, n_tokens=16384,
                                         batch_size=256)
    # W_enc and W_dec have 8192 elements each: above bitsandbytes' 4096-element floor for 8-bit state.
    # The Gemma Scope recipe (unit encoder, no AuxK) this comparison was calibrated on.
    sae = JumpReLUSAE(32, 256, sparsity_coefficient=1e-3, threshold_parameterization="raw", fused=False,
                      encoder_init_scale=1.0, bandwidth=0.001, threshold_init=0.001, aux_coefficient=0.0,
                      dead_coefficient=0.0)
    module = SAETrainingModule(sae, lr=1e-2, lr_warmup_steps=5, sparsity_warmup_steps=30, optimizer=optimizer)
    trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         inference_mode=False)  # validating before fit must not leave inference tensors
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/fvu"]
    trainer.fit(module, datamodule=data)
    if optimizer == "adam8bit":  # the fit really ran the 8-bit optimizer
        import bitsandbytes as bnb

        assert isinstance(trainer.optimizers[0], bnb.optim.Adam8bit)
        assert trainer.optimizers[0].state[sae.W_enc]["state1"].dtype == torch.uint8
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/fvu"]
    return float(before), float(after)


@needs_bnb
@pytest.mark.slow
def test_adam8bit_lowers_the_loss_like_adam(tmp_path) -> None:
    before, adam = _fit("adam", tmp_path)
    before8, adam8 = _fit("adam8bit", tmp_path)
    assert before == pytest.approx(before8)  # same initial SAE, same data
    # The random SAE starts far off (FVU ~30); Adam gets to ~0.31 in 60 steps.
    assert adam < 0.5, (before, adam)
    # 8-bit moments: final FVU within 10% of Adam's (0.308 vs 0.307 when written).
    assert adam8 < 1.1 * adam, (before, adam, adam8)


@needs_bnb
def test_matrix_state_is_uint8_threshold_state_is_fp32() -> None:
    torch.manual_seed(0)
    # d_sae = 8192 > 4096: bitsandbytes alone would give the threshold 8-bit state.
    sae = JumpReLUSAE(16, 8192, threshold_parameterization="raw", fused=False)
    opt = build_optimizer("adam8bit", sae.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8, fused=False)
    out = sae.training_output(torch.randn(64, 16))
    torch.stack(list(out.losses.values())).sum().backward()
    opt.step()
    for name in ("W_enc", "W_dec"):
        state = opt.state[getattr(sae, name)]
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8, name
        assert state["state1"].numel() == 16 * 8192, name
    for name in ("raw_threshold", "b_enc", "b_dec"):
        state = opt.state[getattr(sae, name)]
        assert state["state1"].dtype == state["state2"].dtype == torch.float32, name
    matrices, vectors = 2 * 16 * 8192, 8192 + 8192 + 16
    by_dtype = state_bytes(opt)
    assert by_dtype["torch.uint8"] == 2 * matrices  # two one-byte moments per matrix element
    # float32: both moments of every vector, plus per matrix one absmax per 256-value block
    # and a 256-entry code table for each moment.
    assert by_dtype["torch.float32"] == 4 * (2 * vectors + 2 * (matrices // 256) + 2 * 2 * 256)
    # Against torch Adam's 8 bytes a parameter: under 30% here, with the vectors in fp32.
    assert sum(by_dtype.values()) < 0.3 * 8 * (matrices + vectors)


@needs_bnb
def test_threshold_update_matches_fp32_adam() -> None:
    """The threshold's first 8-bit-optimizer step equals torch Adam's (float32 moments)."""
    torch.manual_seed(0)
    saes = [JumpReLUSAE(16, 8192, threshold_parameterization="raw", fused=False) for _ in range(2)]
    saes[1].load_state_dict(saes[0].state_dict())
    x = torch.randn(64, 16)
    for name, sae in zip(("adam8bit", "adam"), saes):
        opt = build_optimizer(name, sae.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8, fused=False)
        out = sae.training_output(x)
        torch.stack(list(out.losses.values())).sum().backward()
        opt.step()
    moved = (saes[1].raw_threshold - 0.001).abs()
    assert moved.max() > 5e-4  # some thresholds moved by about lr
    torch.testing.assert_close(saes[0].raw_threshold, saes[1].raw_threshold, rtol=1e-5, atol=1e-7)


def test_bad_optimizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.optimizer='sgd' is not one of adam, adam8bit"):
        SAETrainingModule(JumpReLUSAE(8, 16), optimizer="sgd")  # type: ignore[arg-type]


def test_missing_bitsandbytes_is_a_config_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"model.optimizer='adam8bit' needs bitsandbytes"):
        build_optimizer("adam8bit", JumpReLUSAE(8, 16).parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8,
                        fused=False)
