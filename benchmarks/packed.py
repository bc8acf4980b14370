"""Many SAEs per read: K packed JumpReLU SAEs against one, and against K separate runs.

Measured side by side in one process at one shape (default B=4096, d_in=384, d_sae=16384):

1. the training step (forward, backward, Adam, decoder constraint) of one SAE (the fused
   step) and of K packed SAEs (the batched fused step), both without Lightning, timed in
   alternation (K single steps, then one packed step, per round). Per-SAE
   throughput is SAE-tokens per second: ``B / t`` for one SAE, ``K B / t`` for K packed;
   ``packed_per_sae`` is their ratio (1.0: packing costs nothing per SAE);
2. the wall time of K sequential ``Trainer.fit`` runs (one per lambda) against one packed
   ``Trainer.fit`` of the K SAEs, a few steps each, all reading the same small set of
   synthetic bf16 shards through :class:`ShardedActivationDataModule` (data set-up, scale
   and checksums included, as a user pays them); and, from the same runs, the steady
   per-step time (the median step after the first), which decides a long run: the
   packed run's first step is much slower than its later ones (K sets of Adam state and
   K-fold activation buffers touched for the first time).

Ends with ``result: packed_per_sae <x>``, ``result: sequential_vs_packed_wall <x>`` and
``result: sequential_vs_packed_per_step <x>``.

Run: ``python benchmarks/packed.py [--batch 4096 --d_in 384 --d_sae 16384 --k 8 --fit_steps 3]``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import CLI

from gs_lightning.console import quiet_third_party
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.data.shard_format import (
    encode_shard,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule
from gs_lightning.train.packed import PackedSAE


def _lambdas(k: int) -> list[float]:
    """K sparsity coefficients, log-spaced from 1e-4 to 1e-2 (a Gemma-Scope-like sweep)."""
    return [float(f"{1e-4 * 100 ** (i / max(1, k - 1)):.3g}") for i in range(k)]


def _make_step(k: int, B: int, d: int, S: int, device: torch.device) -> Callable[[torch.Tensor], None]:
    """One training step of ``k`` packed SAEs (``k == 1``: the single fused step) on a batch."""
    torch.manual_seed(0)
    saes = [JumpReLUSAE(d, S, sparsity_coefficient=c).to(device).train() for c in _lambdas(k)]
    packed = PackedSAE(saes, [str(i) for i in range(k)]).train() if k > 1 else None
    optimizer = torch.optim.Adam([p for s in saes for p in s.parameters()], lr=7e-5, betas=(0.0, 0.999),
                                 fused=True)

    def step(x: torch.Tensor) -> None:
        outs = packed.training_outputs(x) if packed is not None else [saes[0].training_output(x)]
        torch.stack([v for out in outs for v in out.losses.values()]).sum().backward()
        for sae in saes:
            sae.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        for sae in saes:
            sae.after_optimizer_step()

    return step


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_seconds(k: int, B: int, d: int, S: int, device: torch.device, warmup: int,
                 rounds: int) -> tuple[float, float]:
    """Seconds of K single steps and of one packed step of K SAEs, summed over ``rounds``.

    The two alternate within each round, so a machine shared with other work slows both
    alike (our CPU host is shared; its load varies from minute to minute).
    """
    single, packed = _make_step(1, B, d, S, device), _make_step(k, B, d, S, device)
    x = torch.randn(B, d, device=device) / d**0.5
    for _ in range(warmup):
        single(x)
        packed(x)
    single_s = packed_s = 0.0
    for _ in range(rounds):
        single_s += sum(_timed(lambda: single(x), device) for _ in range(k))
        packed_s += _timed(lambda: packed(x), device)
    return single_s / (k * rounds), packed_s / rounds


def _write_shards(folder: Path, shards: int, shard_tokens: int, d: int) -> None:
    folder.mkdir(parents=True)
    manifest = {"model": "synthetic", "site": "synthetic", "d": d, "dtype": "bfloat16", "shards": []}
    generator = torch.Generator().manual_seed(0)
    for i in range(shards):
        acts = torch.randn(shard_tokens, d, generator=generator).to(torch.bfloat16)
        data = encode_shard(acts, torch.zeros(shard_tokens), torch.zeros(shard_tokens))
        (folder / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts, i))
    write_manifest(folder, manifest)


class _StepStarts(pl.Callback):
    """Times at which each training batch starts, and the end of training."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, *args: object) -> None:
        self.times.append(time.perf_counter())


def _fit_seconds(folder: Path, d: int, S: int, B: int, steps: int, device: str, sweep: list[float] | None,
                 coefficient: float = 1e-3) -> tuple[float, float]:
    """Wall seconds of one ``Trainer.fit`` from building the DataModule to the end of fit, and
    the median seconds of its steps after the first (CPU timings: no device sync needed)."""
    start = time.perf_counter()
    starts = _StepStarts()
    data = ShardedActivationDataModule(str(folder), batch_size=B, val_shards=0)
    sae = JumpReLUSAE(d, S, sparsity_coefficient=coefficient)
    module = SAETrainingModule(sae, sweep={"sparsity_coefficient": sweep} if sweep else None)
    trainer = pl.Trainer(max_steps=steps, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[starts])
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    del trainer, module, data, sae
    gc.collect()
    gaps = [b - a for a, b in zip(starts.times, starts.times[1:])]
    return seconds, statistics.median(gaps[1:] or gaps)


def main(batch: int = 4096, d_in: int = 384, d_sae: int = 16384, k: int = 8, device: str = "cpu",
         warmup: int = 1, rounds: int = 2, fit_steps: int = 3) -> None:
    """Print the step table, the fit table and the two headline ratios.

    Args:
        batch: Activations per step.
        d_in: Activation width.
        d_sae: Number of latents of each SAE.
        k: Number of packed SAEs.
        device: ``cpu`` or ``cuda``.
        warmup: Untimed steps of each (single and packed) before timing.
        rounds: Timed rounds, each K single steps then one packed step (mean per step reported).
        fit_steps: Training steps of each ``Trainer.fit``.
    """
    dev = torch.device(device)
    B, d, S = batch, d_in, d_sae
    print(f"packed JumpReLU, K={k}, B={B} d_in={d} d_sae={S}, {dev}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    single, packed = step_seconds(k, B, d, S, dev, warmup, rounds)
    gc.collect()
    per_sae = k * single / packed
    print(f"\n{'training step (no Lightning)':34s} {'s/step':>8s} {'SAE-tokens/s':>13s} {'per SAE vs K=1':>15s}")
    print(f"{'1 SAE, fused step':34s} {single:8.2f} {B / single:13.0f} {1.0:15.3f}")
    print(f"{f'{k} packed SAEs, batched fused step':34s} {packed:8.2f} {k * B / packed:13.0f} {per_sae:15.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        _write_shards(folder, shards=fit_steps + 1, shard_tokens=B, d=d)
        runs = [_fit_seconds(folder, d, S, B, fit_steps, device, None, c) for c in _lambdas(k)]
        sequential, sequential_step = sum(r[0] for r in runs), sum(r[1] for r in runs)
        together, together_step = _fit_seconds(folder, d, S, B, fit_steps, device, _lambdas(k))
    wall = sequential / together
    print(f"\n{f'Trainer.fit, {fit_steps} steps, bf16 shards':34s} {'wall s':>8s} {'s/step after 1st':>17s}")
    print(f"{f'{k} sequential runs (one per lambda)':34s} {sequential:8.1f} {sequential_step:17.2f}")
    print(f"{f'1 packed run of {k} SAEs':34s} {together:8.1f} {together_step:17.2f}")
    print(f"\nlambdas: {_lambdas(k)}")
    print(f"result: packed_per_sae {per_sae:.3f}")
    print(f"result: sequential_vs_packed_wall {wall:.3f}")
    print(f"result: sequential_vs_packed_per_step {sequential_step / together_step:.3f}")


if __name__ == "__main__":
    quiet_third_party()  # Lightning's adverts and notices, as the CLI drops them
    CLI(main, as_positional=False)
    sys.stdout.flush()
