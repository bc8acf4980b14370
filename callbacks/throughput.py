"""Training throughput (tokens/s) and model FLOP utilisation (MFU) during fit."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

# Lightning's table (lightning.fabric.utilities.throughput) is the source of device peaks.
# These few dense peaks (no 2:4 sparsity, from NVIDIA's and Google's data sheets) cover
# what its 2.6 table lacks or states with sparsity; they are checked first.
_HOPPER_SXM = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}
_HOPPER_NVL = {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12}
# Substrings of the lower-cased CUDA device name, tried in order. Lightning has no row for
# "NVIDIA H200", "NVIDIA H200 NVL" or "NVIDIA GH200 480GB" (only "h200 sxm1"/"nvl1", with
# sparsity), and its "h100 nvl" row is the H100 SXM's figure with sparsity (1979 TFLOP/s bf16).
_CUDA_PEAKS: dict[str, dict[torch.dtype | str, float]] = {
    "h100 nvl": _HOPPER_NVL,
    "h200 nvl": _HOPPER_NVL,
    "h200": _HOPPER_SXM,  # also GH200: the same Hopper GPU
}
# TPU generations (TPU_ACCELERATOR_TYPE's prefix) Lightning lacks; it has v2, v3, v4 and
# v5litepod (v5e). One figure a chip for every dtype: the matrix units compute in bf16.
_TPU_PEAKS: dict[str, float] = {"v5p": 459e12, "v6e": 918e12}


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Trainer ``precision``: ``bf16-mixed`` -> bfloat16, ``32-true`` -> float32."""
    prefix = str(precision).split("-")[0]
    return {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(prefix, torch.float32)


def peak_flops_for(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` computing matmuls in ``dtype``; ``None`` if unknown.

    From Lightning's ``get_available_flops`` (which counts float32 as TF32 on Ampere and
    later unless ``torch.get_float32_matmul_precision()`` is ``"highest"``), except for the
    devices in :data:`_CUDA_PEAKS` and :data:`_TPU_PEAKS`. ``None`` on the CPU.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        own = next((peaks for key, peaks in _CUDA_PEAKS.items() if key in name), None)
        if own is None:
            return _float(get_available_flops(device, dtype))
        tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return own.get("tfloat32" if tf32 else dtype)
    if device.type == "xla":
        generation = _tpu_generation()
        if generation in _TPU_PEAKS:
            return _TPU_PEAKS[generation]
        try:
            # Lightning reads the TPU type from the Cloud TPU VM's metadata server.
            return _float(get_available_flops(device, dtype))
        except Exception:  # off a Cloud TPU VM (e.g. on GKE) that query fails: no peak then
            return None
    return None


def device_name(device: torch.device) -> str:
    """A printable device name: the CUDA device's name, ``TPU v5e`` on XLA, else the type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xla" and _tpu_generation():
        return f"TPU {_tpu_generation().replace('litepod', 'e')}"
    return device.type


def _tpu_generation() -> str:
    """``v4``, ``v5litepod``, ``v5p``, ... from ``TPU_ACCELERATOR_TYPE`` (e.g. ``v5litepod-16``); set on TPU VMs."""
    return os.environ.get("TPU_ACCELERATOR_TYPE", "").split("-")[0].lower()


def _float(flops: int | None) -> float | None:
    return None if flops is None else float(flops)


def sae_flops_per_token(pl_module: pl.LightningModule) -> float:
    """``12 * d_in * d_sae`` per SAE trained, summed over a sweep's K.

    Forward and backward of encode and decode (2 + 4 FLOPs per weight each): ``6 * d_sae *
    (d_in + d_out)``, which is ``12 * d_in * d_sae`` for an SAE (a transcoder's ``d_out``
    may differ).
    """
    named = pl_module.named_saes() if hasattr(pl_module, "named_saes") else [(None, pl_module.sae)]

    def flops(sae: Any) -> float:
        if hasattr(sae, "flops_per_token"):  # a dictionary of another shape counts its own
            return float(sae.flops_per_token)
        return 6 * sae.d_sae * (sae.d_in + (getattr(sae, "d_out", None) or sae.d_in))

    return float(sum(flops(sae) for _, sae in named))


# Lightning's ThroughputMonitor callback logs a rolling per-step window under its own keys,
# syncs CUDA every step and does not wait for XLA; this callback keeps whole windows of
# every_n_steps and takes only the device peaks from Lightning.
class Throughput(pl.Callback):
    """Log ``perf/tokens_per_s`` and ``perf/mfu`` every ``every_n_steps`` training steps.

    Rates are measured over whole windows of steps between batch ends (data loading,
    forward, backward and optimizer included; validation excluded: a window that
    validation interrupts is dropped). ``tokens_per_s`` counts every rank's batches
    (local batch x world size, no communication). MFU is
    ``flops_per_token * tokens_per_s / (peak_flops * world_size)`` with
    ``flops_per_token = 12 * d_in * d_sae`` times the number of SAEs a packed sweep
    trains. On CUDA and XLA the window's end waits for the device so that queued work is counted.

    Args:
        peak_flops: Peak FLOP/s of one device. Default: the device's dense peak for the
            Trainer's precision (``bf16-mixed`` -> bf16, ``32-true`` -> fp32 or TF32), from
            :func:`peak_flops_for`. On CPU or an unknown device without it, only
            ``perf/tokens_per_s`` is logged.
        every_n_steps: Steps per measurement window.
    """

    def __init__(self, peak_flops: float | None = None, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.peak_flops = peak_flops
        self.every_n_steps = every_n_steps
        self.last_metrics: dict[str, float] = {}
        # A clock the tests replace; perf_counter is monotonic and high resolution.
        self._clock = time.perf_counter
        self._flops_per_token = 0.0
        self._peak: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._window_start: float | None = None
        self._window_steps = 0
        self._window_tokens = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops_per_token = sae_flops_per_token(pl_module)
        self._peak = self.peak_flops
        if self._peak is None:
            dtype = compute_dtype(trainer.precision)
            self._peak = peak_flops_for(pl_module.device, dtype)
            if self._peak is None:
                rank_zero_warn(f"Throughput: no peak FLOP/s known for {device_name(pl_module.device)!r} in {dtype};"
                               " pass peak_flops to log perf/mfu")
        self._reset()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._window_start is None:
            # The window opens at the end of a step, so the first step's compilation or
            # allocation warm-up is never counted.
            self._window_start = self._now(pl_module)
            return
        self._window_steps += 1
        self._window_tokens += _batch_tokens(batch)
        if self._window_steps < self.every_n_steps:
            return
        end = self._now(pl_module)
        self.last_metrics = self.rates(self._window_tokens * trainer.world_size, end - self._window_start,
                                       trainer.world_size)
        self._window_start, self._window_steps, self._window_tokens = end, 0, 0
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=trainer.global_step)

    def rates(self, tokens: int, seconds: float, world_size: int = 1) -> dict[str, float]:
        """``perf/tokens_per_s`` for ``tokens`` (all ranks) in ``seconds``, and ``perf/mfu`` if a peak is known."""
        tokens_per_s = tokens / seconds
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self._peak:
            metrics["perf/mfu"] = self._flops_per_token * tokens_per_s / (self._peak * world_size)
        return metrics

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def _now(self, pl_module: pl.LightningModule) -> float:
        # Device work is asynchronous: without a wait the window would time the host's
        # dispatch, not the device. Once a window (every_n_steps) is cheap.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elif pl_module.device.type == "xla":
            import torch_xla.core.xla_model as xm

            # Waits for the graphs already dispatched; reads nothing back, compiles nothing.
            xm.wait_device_ops()
        return self._clock()


def _batch_tokens(batch: Any) -> int:
    """Rows of a batch: a ``[B, d]`` tensor, or the first of an (input, target) pair."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0])
