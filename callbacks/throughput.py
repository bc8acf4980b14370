"""Training throughput (tokens/s) and model FLOP utilisation (MFU) during fit."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

# Dense bf16 peak FLOP/s of one device (no structured sparsity), from the vendors' data
# sheets. Matched in this order as case-insensitive substrings of the device name, so the
# specific H100 variants come before the plain (SXM) one.
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v3": 123e12,  # per chip (2 cores)
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
}


def peak_flops_for(device_name: str) -> float | None:
    """The :data:`PEAK_FLOPS` entry whose key occurs in ``device_name``; ``None`` if none does."""
    name = device_name.lower()
    return next((peak for key, peak in PEAK_FLOPS.items() if key.lower() in name), None)


def device_name(device: torch.device) -> str:
    """A name :func:`peak_flops_for` understands: the CUDA device's name, ``TPU vN`` on XLA, else the type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xla":
        # e.g. v4-8, v5litepod-16, v5p-8; set on Cloud TPU VMs.
        accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "")
        generation = accelerator.split("-")[0].replace("litepod", "e")
        if generation:
            return f"TPU {generation}"
    return device.type


def sae_flops_per_token(pl_module: pl.LightningModule) -> float:
    """``12 * d_in * d_sae`` per SAE trained, summed over a sweep's K.

    Forward and backward of encode and decode (2 + 4 FLOPs per weight each): ``6 * d_sae *
    (d_in + d_out)``, which is ``12 * d_in * d_sae`` for an SAE (a transcoder's ``d_out``
    may differ).
    """
    named = pl_module.named_saes() if hasattr(pl_module, "named_saes") else [(None, pl_module.sae)]
    return float(sum(6 * sae.d_sae * (sae.d_in + (getattr(sae, "d_out", None) or sae.d_in)) for _, sae in named))


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
        peak_flops: Peak FLOP/s of one device. Default: looked up from the device name in
            :data:`PEAK_FLOPS` (H100, H200, A100 bf16 dense; TPU v3/v4/v5e/v5p/v6e). On CPU
            or an unknown device without it, only ``perf/tokens_per_s`` is logged.
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
            name = device_name(pl_module.device)
            self._peak = peak_flops_for(name)
            if self._peak is None:
                rank_zero_warn(f"Throughput: no peak FLOP/s known for {name!r}; pass peak_flops to log perf/mfu")
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
