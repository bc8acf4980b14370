"""JumpReLU training-step throughput against the matmul peak, and Lightning's overhead.

Measured side by side in one process at one shape (default B=4096, d_in=384, d_sae=16384):

1. the matmul peak on the step's own five GEMM shapes (encode, decode, and the three
   backward GEMMs; the input gradient is not needed), each timed alone into a preallocated
   output;
2. the fused JumpReLU step (forward, backward, Adam, decoder constraint) in fp32, and under
   bf16 autocast; then in fp32 with the default dead-latent remedies (AuxK and the
   pre-activation loss) acting on a fixed 5% of the latents (``remedies_vs_step``: the
   step without them over the step with them);
3. the same step through plain autograd (``fused: false``), for comparison;
4. a whole ``Trainer.fit`` on in-memory activations with logging and a progress bar.

``step_peak_fraction`` = (GEMM FLOPs the step executes, 10 B d d_sae) / step time /
peak. The MFU convention counts 12 B d d_sae "model FLOPs" per step (as if the input
gradient were computed; see docs/results/benchmarks.md); that figure is printed too.

On CUDA (the default device when one is present) the table gains an MFU column: 12 B d
d_sae per step against the GPU's dense bf16 peak (``callbacks.throughput.peak_flops_for``:
Lightning's table of data-sheet figures), the Trainer.fit row is repeated in ``bf16-mixed``,
and the script ends with ``result: mfu_bf16_step`` and ``result: mfu_bf16_fit``. The
Gemma Scope shape (their MFU figure is about 50% on TPUv3):

    python benchmarks/step.py --d_in 2304 --d_sae 131072 --device cuda

Run: ``python benchmarks/step.py [--batch 4096 --d_in 384 --d_sae 16384 --device auto]``
(``--bf16 false --autograd false`` on a CPU without native bf16: those rows take minutes).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from jsonargparse import CLI

from callbacks.progress import StepProgressBar
from callbacks.throughput import device_name, peak_flops_for
from gs_lightning.console import quiet_third_party
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak(B: int, d: int, S: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the step's five GEMM shapes, each alone into a preallocated output."""
    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    x, W_enc, W_dec, f, g = mk(B, d), mk(d, S), mk(S, d), mk(B, S), mk(B, d)
    out_bs, out_bd, out_sd, out_ds = mk(B, S), mk(B, d), mk(S, d), mk(d, S)
    gemms = [
        lambda: torch.mm(x, W_enc, out=out_bs),  # encode
        lambda: torch.mm(f, W_dec, out=out_bd),  # decode
        lambda: torch.mm(f.t(), g, out=out_sd),  # dW_dec
        lambda: torch.mm(g, W_dec.t(), out=out_bs),  # gradient w.r.t. f
        lambda: torch.mm(x.t(), f, out=out_ds),  # dW_enc
    ]
    seconds = sum(_time(fn, 2, 5, device) for fn in gemms)
    return 5 * 2 * B * d * S / seconds


def bare_step_seconds(B: int, d: int, S: int, device: torch.device, fused: bool, bf16: bool, repeats: int,
                      dead_fraction: float | None = None) -> float:
    """Median seconds of one training step (forward, backward, Adam, decoder constraint).

    ``dead_fraction`` None times the step without dead-latent remedies (AuxK and the
    pre-activation loss off); a fraction times the default recipe with that share of the
    latents held dead. On one repeated batch the firing counters would otherwise declare
    whatever this batch misses dead (about half the dictionary), far from a real run's
    few percent (README, "SAE quality"), and the remedies' cost scales with the dead count.
    """
    torch.manual_seed(0)
    off = dict(aux_coefficient=0.0, dead_coefficient=0.0) if dead_fraction is None else {}
    sae = JumpReLUSAE(d, S, fused=fused, **off).to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), fused=True)
    x = torch.randn(B, d, device=device) / d**0.5
    dead = torch.zeros(S, dtype=torch.bool, device=device)
    dead[torch.randperm(S, device=device)[: round((dead_fraction or 0.0) * S)]] = True

    def step() -> None:
        if dead_fraction is not None:
            sae.tokens_since_fired.copy_(dead.double() * sae.dead_tokens)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_output(x)
        torch.stack(list(out.losses.values())).sum().backward()
        sae.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        sae.after_optimizer_step()

    return _time(step, 3, repeats, device)


class _StepTimer(pl.Callback):
    """Wall time of every training batch, start to start."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        _sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        _sync(pl_module.device)
        self.starts.append(time.perf_counter())


def fit_step_seconds(B: int, d: int, S: int, device: torch.device, steps: int, precision: str = "32-true") -> float:
    """Median seconds per step of ``Trainer.fit`` on in-memory data (after 3 warm-up steps)."""
    data = SyntheticActivationDataModule(d_in=d, n_features=1024, active_features=16,
                                         n_tokens=B * (steps + 1), batch_size=B, val_fraction=0.0)
    # Remedies off, as in the bare step it is compared with: this row measures Lightning's
    # overhead, with the progress bar the CLI shows.
    module = SAETrainingModule(JumpReLUSAE(d, S, aux_coefficient=0.0, dead_coefficient=0.0))
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_steps=steps, accelerator=device.type, devices=1, default_root_dir=root,
                             precision=precision,
                             log_every_n_steps=10, callbacks=[timer, StepProgressBar()], enable_checkpointing=False,
                             limit_val_batches=0, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
    gaps = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    return statistics.median(gaps[3:])


def main(batch: int = 4096, d_in: int = 384, d_sae: int = 16384, device: str = "auto", repeats: int = 8,
         fit_steps: int = 14, autograd: bool = True, bf16: bool = True, dead_fraction: float = 0.05) -> None:
    """Print a table of step throughputs and the headline ratios.

    Args:
        batch: Activations per step.
        d_in: Activation width.
        d_sae: Number of latents.
        device: ``cpu``, ``cuda``, or ``auto`` (CUDA when present, else the CPU).
        repeats: Timed steps per configuration (the median is reported).
        fit_steps: Steps of the Lightning fit (the first 3 are warm-up).
        autograd: Also time the unfused autograd step (slow on CPU).
        bf16: Also time the step under bf16 autocast (always on CUDA; on a CPU without
            native bf16 instructions, AVX2 only, it takes minutes).
        dead_fraction: Share of latents held dead in the row that times the dead-latent
            remedies (AuxK and the pre-activation loss; default 5%, the most any lambda of
            the quality benchmark leaves).
    """
    quiet_third_party()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    B, d, S = batch, d_in, d_sae
    gemm_flops, model_flops = 10 * B * d * S, 12 * B * d * S
    nominal = peak_flops_for(dev, torch.bfloat16)
    print(f"JumpReLU step, B={B} d_in={d} d_sae={S}, {device_name(dev)}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}"
          + (f", data-sheet bf16 peak {nominal / 1e12:.0f} TFLOP/s" if nominal else ""))
    peak = gemm_peak(B, d, S, dev, torch.float32)
    rows = [("fp32 GEMM peak (step shapes)", None, peak)]
    if dev.type == "cuda":
        rows.append(("bf16 GEMM peak (step shapes)", None, gemm_peak(B, d, S, dev, torch.bfloat16)))
    fused = bare_step_seconds(B, d, S, dev, fused=True, bf16=False, repeats=repeats)
    rows.append(("fused step fp32", fused, gemm_flops / fused))
    remedies = bare_step_seconds(B, d, S, dev, fused=True, bf16=False, repeats=repeats, dead_fraction=dead_fraction)
    rows.append((f"  + remedies, {dead_fraction:.0%} of latents dead", remedies, gemm_flops / remedies))
    if autograd:
        plain = bare_step_seconds(B, d, S, dev, fused=False, bf16=False, repeats=max(2, repeats // 3))
        rows.append(("autograd step fp32", plain, gemm_flops / plain))
    bf16_step = None
    if bf16 or dev.type == "cuda":
        bf16_step = bare_step_seconds(B, d, S, dev, fused=True, bf16=True, repeats=repeats)
        rows.append(("fused step bf16 autocast", bf16_step, gemm_flops / bf16_step))
    fit = fit_step_seconds(B, d, S, dev, fit_steps)
    rows.append(("Trainer.fit fp32 (in-memory data)", fit, gemm_flops / fit))
    if dev.type == "cuda":
        fit_bf16 = fit_step_seconds(B, d, S, dev, fit_steps, precision="bf16-mixed")
        rows.append(("Trainer.fit bf16-mixed", fit_bf16, gemm_flops / fit_bf16))

    mfu_head = f" {'MFU':>6s}" if nominal else ""
    print(f"\n{'configuration':36s} {'ms/step':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'of fp32 peak':>13s}{mfu_head}")
    for name, seconds, flops in rows:
        ms = f"{seconds * 1e3:9.1f}" if seconds else f"{'':9s}"
        tps = f"{B / seconds:10.0f}" if seconds else f"{'':10s}"
        mfu = (f" {model_flops / seconds / nominal:6.3f}" if seconds else f" {'':6s}") if nominal else ""
        print(f"{name:36s} {ms} {tps} {flops / 1e9:9.1f} {flops / peak:13.2f}{mfu}")
    fraction = gemm_flops / fused / peak
    print(f"\nmodel FLOPs (12 B d d_sae, the MFU count) of the fused step: "
          f"{model_flops / fused / 1e9:.1f} GFLOP/s = {model_flops / fused / peak:.2f} of peak")
    if autograd:
        print(f"fused vs autograd step: {plain / fused:.2f}x")
    if bf16_step is not None:
        print(f"bf16 autocast vs fp32 fused step: {fused / bf16_step:.2f}x")
    print(f"result: step_peak_fraction {fraction:.3f}")
    print(f"result: fit_vs_step {fused / fit:.3f}")
    print(f"result: remedies_vs_step {fused / remedies:.3f}")
    if bf16_step is not None:
        print(f"result: bf16_vs_fp32_step {fused / bf16_step:.3f}")
    if nominal:
        print(f"result: mfu_bf16_step {model_flops / bf16_step / nominal:.3f}")
        print(f"result: mfu_bf16_fit {model_flops / fit_bf16 / nominal:.3f}")
    elif dev.type == "cuda":
        print(f"(no bf16 peak known for {device_name(dev)!r}: MFU not reported; "
              "see callbacks.throughput.peak_flops_for)")


if __name__ == "__main__":
    CLI(main, as_positional=False)
    sys.stdout.flush()
