"""callbacks.Throughput: tokens/s and MFU arithmetic on a fake clock, peaks per device, packed sweeps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks.throughput import Throughput, device_name, peak_flops_for, sae_flops_per_token
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.module import SAETrainingModule
from gs_lightning.saes import JumpReLUSAE

D_IN, D_SAE, BATCH, TICK = 16, 64, 128, 0.25


class Recorder(Logger):
    """Keeps what the callback logs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version = "recorder", 0
    experiment = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith("perf/") for k in metrics):
            self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def _fit(callback: Throughput, steps: int, sweep: dict | None = None) -> Recorder:
    recorder = Recorder()
    data = SyntheticActivationDataModule(d_in=D_IN, n_features=32, active_features=2, n_tokens=4096,
                                         batch_size=BATCH)
    module = SAETrainingModule(JumpReLUSAE(D_IN, D_SAE), lr_warmup_steps=1, sparsity_warmup_steps=1,
                               sweep=sweep)
    callback._clock = lambda: module.global_step * TICK  # every step takes 0.25 s
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=recorder, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return recorder


def test_tokens_per_s_and_mfu_from_known_numbers() -> None:
    recorder = _fit(Throughput(peak_flops=1e9, every_n_steps=4), steps=9)
    # Step 1 opens the window; steps 2-5 and 6-9 close two windows of 4 steps in 1.0 s.
    assert [step for step, _ in recorder.rows] == [5, 9]
    tokens_per_s = 4 * BATCH / (4 * TICK)  # 512
    mfu = 12 * D_IN * D_SAE * tokens_per_s / 1e9  # 12,288 FLOPs a token -> 0.006291456
    for _, metrics in recorder.rows:
        assert metrics["perf/tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-12)
        assert metrics["perf/mfu"] == pytest.approx(mfu, rel=1e-12)


def test_packed_sweep_counts_every_sae() -> None:
    recorder = _fit(Throughput(peak_flops=1e9, every_n_steps=4), steps=5,
                    sweep={"sparsity_coefficient": [1e-4, 1e-3, 1e-2]})
    (_, metrics), = recorder.rows
    # The same tokens/s, three SAEs' FLOPs per token.
    assert metrics["perf/tokens_per_s"] == pytest.approx(512, rel=1e-12)
    assert metrics["perf/mfu"] == pytest.approx(3 * 12 * D_IN * D_SAE * 512 / 1e9, rel=1e-12)


def test_cpu_without_a_peak_logs_tokens_per_s_only() -> None:
    with pytest.warns(UserWarning, match="no peak FLOP/s known for 'cpu'"):
        recorder = _fit(Throughput(every_n_steps=2), steps=3)
    assert recorder.rows == [(3, {"perf/tokens_per_s": pytest.approx(2 * BATCH / (2 * TICK))})]


def test_world_size_scales_tokens_not_mfu() -> None:
    callback = Throughput(peak_flops=2e12)
    callback._flops_per_token, callback._peak = 12.0 * 2304 * 16384, 2e12
    # 8 ranks x 4,096 tokens x 10 steps in 2 s.
    rates = callback.rates(8 * 4096 * 10, 2.0, world_size=8)
    assert rates["perf/tokens_per_s"] == 163840.0
    assert rates["perf/mfu"] == pytest.approx(12 * 2304 * 16384 * 163840 / (8 * 2e12), rel=1e-12)  # 0.4638


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5e", 197e12),
    ("TPU v3", 123e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup(name: str, peak: float | None) -> None:
    assert peak_flops_for(name) == peak


@pytest.mark.parametrize("accelerator,name", [("v4-8", "TPU v4"), ("v5litepod-16", "TPU v5e"), ("v5p-8", "TPU v5p")])
def test_tpu_name_from_the_accelerator_type(monkeypatch, accelerator: str, name: str) -> None:
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", accelerator)
    assert device_name(torch.device("xla", 0)) == name


def test_flops_per_token_of_one_sae() -> None:
    module = SAETrainingModule(JumpReLUSAE(2304, 16384))
    assert sae_flops_per_token(module) == 12 * 2304 * 16384  # 452,984,832


def test_flops_per_token_of_a_transcoder() -> None:
    class Transcoder:  # only the widths matter
        d_in, d_sae, d_out = 100, 1000, 300

    class Module:
        def named_saes(self):
            return [(None, Transcoder())]

    # Encoder 100 x 1000 and decoder 1000 x 300 weights, 6 FLOPs each a token.
    assert sae_flops_per_token(Module()) == 6 * (100 * 1000 + 1000 * 300)
