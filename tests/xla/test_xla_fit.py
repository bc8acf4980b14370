"""Fit through Lightning on an XLA device (the CPU PJRT device off-TPU): after warm-up no
step compiles a new graph and no step waits for the device (no device-to-host transfer).

Run with the separate environment: ``bash scripts/setup_xla.sh`` once, then
``.venv-xla/bin/python -m pytest -q tests/xla``.
"""

from __future__ import annotations

from typing import Any

import pytest

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla is not installed: bash scripts/setup_xla.sh, "
                                "then run this tier with .venv-xla/bin/python -m pytest tests/xla")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from lightning.pytorch.accelerators import XLAAccelerator  # noqa: E402
from torch_xla import runtime as xr  # noqa: E402

from callbacks import Throughput  # noqa: E402
from gs_lightning.data import SyntheticActivationDataModule  # noqa: E402
from gs_lightning.saes import JumpReLUSAE  # noqa: E402
from gs_lightning.train.module import SAETrainingModule  # noqa: E402

pytestmark = pytest.mark.xla
WARMUP, STEPS = 4, 10


class PJRTAccelerator(XLAAccelerator):
    """Lightning's XLA accelerator counting the PJRT runtime's devices.

    The stock one asks the TPU metadata server how many chips there are, which fails (or
    waits) on a host without TPUs; the PJRT runtime knows its devices on any host.
    """

    @staticmethod
    def auto_device_count() -> int:
        return xr.global_runtime_device_count()

    @staticmethod
    def is_available() -> bool:
        return PJRTAccelerator.auto_device_count() > 0

    @staticmethod
    def parse_devices(devices: Any) -> int:
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("xla", i) for i in range(int(devices))]


def _counts() -> dict[str, int]:
    """Graph compilations, device-to-host transfers and ``.item()``-style scalar reads so far."""
    def samples(name: str) -> int:
        data = met.metric_data(name)
        return 0 if data is None else int(data[0])

    return {"compile": samples("CompileTime"), "transfer_from_device": samples("TransferFromDeviceTime"),
            "local_scalar_dense": int(met.counter_value("aten::_local_scalar_dense") or 0),
            "execute": samples("ExecuteTime")}


class Probe(pl.Callback):
    """Records the counters at the end of every training step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, int]] = {}
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Executions run asynchronously and are counted when they finish: wait for the ones
        # already dispatched (no read-back, no compile) so the counts do not race them.
        xm.wait_device_ops()
        self.at[trainer.global_step] = _counts()
        self.devices.add(pl_module.device.type)


@pytest.mark.parametrize("progress_bar", [
    False,
    pytest.param(True, marks=pytest.mark.xfail(strict=True, reason="with a progress bar shown the module logs l0 "
                                               "and fvu to it, and Lightning reads both on the host every batch")),
], ids=["no_progress_bar", "progress_bar"])
def test_steps_after_warmup_neither_compile_nor_sync(tmp_path, progress_bar: bool) -> None:
    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=32, n_features=64, active_features=3, n_tokens=4096, batch_size=128)
    # check_finite reads the loss on the host every step: off on XLA. The warm-ups end
    # before WARMUP: while they run, the schedules' values change the traced graph. The
    # module itself picks torch's unfused Adam off CPU/CUDA (the fused one has no XLA kernel).
    # The dead-latent remedies find dead latents with a host sync each step (configs/tpu_host.yaml
    # turns them off).
    module = SAETrainingModule(JumpReLUSAE(32, 128, threshold_parameterization="raw", aux_coefficient=0.0,
                                           dead_coefficient=0.0), lr=1e-3,
                               lr_warmup_steps=2, sparsity_warmup_steps=2, check_finite=False)
    probe = Probe()
    # Throughput waits for the device at each window's end (every 2 steps): no read-back.
    throughput = Throughput(peak_flops=1e12, every_n_steps=2)
    trainer = pl.Trainer(accelerator=PJRTAccelerator(), devices=1, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=progress_bar, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10_000,
                         callbacks=[throughput, probe], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert probe.devices == {"xla"}  # (Lightning moves the module back to the CPU at the end)
    assert trainer.global_step == STEPS
    before, after = probe.at[WARMUP], probe.at[STEPS]
    delta = {k: after[k] - before[k] for k in before}
    print(f"counters at step {WARMUP}: {before}; steps {WARMUP + 1}-{STEPS} added {delta}")
    assert delta["compile"] == 0, delta  # one cached graph per step once the schedules settle
    assert delta["transfer_from_device"] == 0, delta  # nothing waits for the device
    assert delta["local_scalar_dense"] == 0, delta
    assert delta["execute"] >= STEPS - WARMUP, delta  # the steps did run on the device
    rates = throughput.last_metrics
    assert rates["perf/tokens_per_s"] > 0 and rates["perf/mfu"] == pytest.approx(
        12 * 32 * 128 * rates["perf/tokens_per_s"] / 1e12), rates
    # And training happened on the device: the weights moved and are finite.
    w = module.sae.W_enc.detach().cpu()
    assert torch.isfinite(w).all()
