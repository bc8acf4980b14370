"""callbacks.Throughput: tokens/s and MFU arithmetic on a fake clock, peaks per device and dtype, packed sweeps."""

from __future__ import annotations

import sys
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks.throughput import (
    Throughput,
    compute_dtype,
    device_name,
    peak_flops_for,
    sae_flops_per_token,
)
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

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


def _fit(callback: Throughput, steps: int, sweep: dict | None = None, precision: str = "32-true") -> Recorder:
    recorder = Recorder()
    data = SyntheticActivationDataModule(d_in=D_IN, n_features=32, active_features=2, n_tokens=4096,
                                         batch_size=BATCH)
    module = SAETrainingModule(JumpReLUSAE(D_IN, D_SAE), lr_warmup_steps=1, sparsity_warmup_steps=1,
                               sweep=sweep)
    callback._clock = lambda: module.global_step * TICK  # every step takes 0.25 s
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=recorder, callbacks=[callback],
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


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("name,dtype,peak", [
    # Lightning's rows
    ("NVIDIA H100 80GB HBM3", BF16, 989.4e12), ("NVIDIA H100 PCIe", BF16, 756e12),
    ("NVIDIA A100-SXM4-80GB", BF16, 312e12), ("NVIDIA A100 80GB PCIe", FP16, 312e12),
    ("NVIDIA GeForce RTX 4090", BF16, 82.6e12),
    # ours: no row in Lightning, or its row is the with-sparsity figure (H100 NVL: 1978.8e12)
    ("NVIDIA H200", BF16, 989.4e12), ("NVIDIA GH200 480GB", BF16, 989.4e12),
    ("NVIDIA H200 NVL", BF16, 835.5e12), ("NVIDIA H100 NVL", BF16, 835.5e12),
])
def test_cuda_peak_for_the_dtype(monkeypatch, name: str, dtype: torch.dtype, peak: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_for(torch.device("cuda", 0), dtype) == peak


@pytest.mark.parametrize("name,matmul_precision,peak", [
    ("NVIDIA A100-SXM4-80GB", "highest", 19.5e12), ("NVIDIA A100-SXM4-80GB", "high", 156e12),  # Lightning: TF32
    ("NVIDIA H200", "highest", 66.9e12), ("NVIDIA H200", "high", 494.7e12),  # ours
])
def test_fp32_peak_is_tf32_unless_matmul_precision_is_highest(monkeypatch, name: str, matmul_precision: str,
                                                               peak: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr("lightning.fabric.accelerators.cuda._is_ampere_or_later", lambda device=None: True)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert peak_flops_for(torch.device("cuda", 0), FP32) == peak
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_gpu_and_the_cpu_have_no_peak(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.warns(UserWarning, match="does not support torch.bfloat16"):  # Lightning's warning
        assert peak_flops_for(torch.device("cuda", 0), BF16) is None
    assert peak_flops_for(torch.device("cpu"), BF16) is None


def _fake_tpu_env(monkeypatch, env: dict[str, str] | Exception) -> None:
    """Lightning asks torch_xla for the TPU VM's metadata: stand in for torch_xla."""
    def get_tpu_env() -> dict[str, str]:
        if isinstance(env, Exception):
            raise env
        return env

    tpu = types.ModuleType("torch_xla._internal.tpu")
    tpu.get_tpu_env = get_tpu_env
    internal = types.ModuleType("torch_xla._internal")
    internal.tpu = tpu
    for name, module in (("torch_xla", types.ModuleType("torch_xla")), ("torch_xla._internal", internal),
                         ("torch_xla._internal.tpu", tpu)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("lightning.fabric.accelerators.xla._XLA_GREATER_EQUAL_2_1", True)


@pytest.mark.parametrize("accelerator,metadata,peak", [
    ("v4-8", {"TYPE": "V4"}, 275e12), ("v3-8", {"ACCELERATOR_TYPE": "v3-8"}, 123e12),
    ("v5litepod-16", {"ACCELERATOR_TYPE": "v5litepod-16"}, 197e12),  # Lightning's rows
    ("v5p-8", {"TYPE": "V5P"}, 459e12), ("v6e-8", {"TYPE": "V6E"}, 918e12),  # ours
    ("v4-8", ConnectionError("no metadata server"), None),  # off a TPU VM
])
def test_tpu_peak(monkeypatch, accelerator: str, metadata, peak: float | None) -> None:
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", accelerator)
    _fake_tpu_env(monkeypatch, metadata)
    for dtype in (BF16, FP32):  # the matrix units compute in bf16 either way
        assert peak_flops_for(torch.device("xla", 0), dtype) == peak


@pytest.mark.parametrize("accelerator,name", [("v4-8", "TPU v4"), ("v5litepod-16", "TPU v5e"), ("v5p-8", "TPU v5p")])
def test_tpu_name_from_the_accelerator_type(monkeypatch, accelerator: str, name: str) -> None:
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", accelerator)
    assert device_name(torch.device("xla", 0)) == name


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", BF16), ("bf16-true", BF16), ("16-mixed", FP16),
                                             ("32-true", FP32), ("64-true", torch.float64), ("32", FP32)])
def test_compute_dtype_of_a_precision(precision: str, dtype: torch.dtype) -> None:
    assert compute_dtype(precision) is dtype


def test_peak_follows_the_trainers_precision(monkeypatch) -> None:
    asked = []

    def lookup(device: torch.device, dtype: torch.dtype) -> float:
        asked.append((device.type, dtype))
        return {BF16: 4e9, FP32: 1e9}[dtype]

    monkeypatch.setattr("callbacks.throughput.peak_flops_for", lookup)
    recorder = _fit(Throughput(every_n_steps=4), steps=5, precision="bf16-mixed")
    assert asked == [("cpu", BF16)]
    (_, metrics), = recorder.rows
    # 512 tokens/s at 12,288 FLOPs a token against the bf16 peak of 4 GFLOP/s.
    assert metrics["perf/mfu"] == pytest.approx(12 * D_IN * D_SAE * 512 / 4e9, rel=1e-12)


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
