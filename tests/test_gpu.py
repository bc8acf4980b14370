"""The CUDA tier (``pytest -m gpu``; skipped without CUDA by tests/conftest.py).

The fused JumpReLU step against autograd on the GPU in fp32 and under bf16 autocast (and
the CLT's fused step in fp32), a short ``fit`` of the quickstart on one GPU in
``bf16-mixed``, DDP over NCCL on two GPUs against one GPU, 8-bit Adam's CUDA kernels, and
the Throughput callback's device wait.
``scripts/gpu_check.sh`` runs these and the step benchmark on a fresh GPU host.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda", 0)
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (the bnb extra)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# -- the fused step against autograd ---------------------------------------------------

B, D_IN, D_SAE = 128, 32, 256


def _case() -> tuple[JumpReLUSAE, torch.Tensor]:
    """A perturbed SAE and a batch, both drawn on the CPU so that every machine gets the same numbers."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(D_IN, D_SAE, sparsity_coefficient=0.1, bandwidth=0.05, threshold_init=0.05)
    with torch.no_grad():  # away from the symmetric init, so every term is exercised
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.uniform_(-0.1, 0.1)
    return sae, torch.randn(B, D_IN)


def _step(sae: JumpReLUSAE, x: torch.Tensor, fused: bool, bf16: bool, device: torch.device):
    """One training step's output and parameter gradients, on a copy of ``sae`` on ``device``."""
    sae = copy.deepcopy(sae).to(device).train()
    sae.fused = fused
    x = x.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        assert sae.uses_fused(x) == fused
        out = sae.training_output(x, warmup=0.7)
    sum(out.losses.values()).backward()
    return out, {name: p.grad for name, p in sae.named_parameters()}


def _margin(sae: JumpReLUSAE, x: torch.Tensor) -> float:
    """The least distance (float64) of a pre-activation from the threshold or the edges
    of the pseudo-derivative's window ``t +- bandwidth / 2``."""
    pre = x.double() @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    t = sae.threshold.detach().double()
    return min(float((pre - edge).abs().min()) for edge in (t, t - sae.bandwidth / 2, t + sae.bandwidth / 2))


def test_fused_step_equals_autograd_on_cuda_fp32() -> None:
    sae, x = _case()
    # fp32 rounding moves these pre-activations by ~1e-8: no mask can differ between the paths.
    assert _margin(sae, x) > 1e-6
    (fused, g_fused), (plain, g_plain) = (_step(sae, x, f, bf16=False, device=CUDA) for f in (True, False))
    assert fused.x_hat.device.type == CUDA.type and fused.x_hat.dtype == torch.float32
    assert torch.equal(fused.fire_counts.float(), plain.fire_counts.float())
    assert fused.l0.item() == plain.l0.item() > 0
    for key in plain.losses:
        torch.testing.assert_close(fused.losses[key], plain.losses[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(fused.x_hat, plain.x_hat, rtol=1e-5, atol=1e-6)
    for name, grad in g_plain.items():
        assert grad.abs().sum() > 0, name  # every parameter, the threshold included, gets a gradient
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_clt_step_equals_autograd_on_cuda() -> None:
    """The cross-layer transcoder's fused step (per-layer GEMMs into [L, B, n] buffers) on
    the GPU, with some latents held dead so that the remedies' gather runs too."""
    from gs_lightning.saes.clt import CrossLayerTranscoder

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(3, D_IN, 3 * 64, sparsity_coefficient=0.1, target_l0=4.0, aux_k=8)
    with torch.no_grad():
        clt.b_enc.uniform_(-0.1, 0.1)
        clt.b_dec.uniform_(-0.1, 0.1)
    clt.tokens_since_fired[torch.arange(0, 3 * 64, 7)] = clt.dead_tokens
    x, y = torch.randn(B, 3, D_IN), torch.randn(B, 3, D_IN)
    runs = []
    for fused in (True, False):
        model = copy.deepcopy(clt).to(CUDA).train()
        model.fused = fused
        assert model.uses_fused(x.to(CUDA)) == fused
        out = model.training_output(x.to(CUDA), 0.7, y.to(CUDA))
        sum(out.losses.values()).backward()
        runs.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (fused, g_fused), (plain, g_plain) = runs
    assert torch.equal(fused.fire_counts.float(), plain.fire_counts.float()) and plain.losses["aux_k"] > 0
    for key in plain.losses:
        torch.testing.assert_close(fused.losses[key], plain.losses[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_step_under_bf16_autocast_on_cuda() -> None:
    """bf16 GEMMs (8-bit mantissa) against the fp32 autograd step: within bf16's rounding,
    as close as autograd under the same autocast, and the threshold's gradient in fp32."""
    sae, x = _case()
    reference, g_ref = _step(sae, x, fused=False, bf16=False, device=CUDA)
    fused, g_fused = _step(sae, x, fused=True, bf16=True, device=CUDA)
    plain, g_plain = _step(sae, x, fused=False, bf16=True, device=CUDA)
    for grads in (g_fused, g_plain):
        assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 weights, fp32 gradients
    # Rounding only: the firing pattern barely moves (a few of 32,768 comparisons).
    assert (fused.fire_counts.float() - reference.fire_counts.float()).abs().sum() <= 0.01 * B * D_SAE
    assert _rel(fused.losses["mse"], reference.losses["mse"]) < 0.02
    # The threshold's gradient counts pre-activations inside a window, whose edges bf16 moves
    # (4% off on a CPU's bf16; the weights' gradients 0.2-1.5%).
    for name, grad in g_ref.items():
        fused_err, plain_err = _rel(g_fused[name], grad), _rel(g_plain[name], grad)
        assert fused_err < (0.15 if name == "raw_threshold" else 0.05), (name, fused_err)
        # The fused step loses no more than autograd does in bf16 (plus slack for rounding order).
        assert fused_err < 2 * plain_err + 0.01, (name, fused_err, plain_err)


# -- training on one GPU ---------------------------------------------------------------

def test_quickstart_fit_on_one_gpu_in_bf16_mixed(tmp_path: Path) -> None:
    """configs/quickstart.yaml, live activations from the embedded model, on the GPU in bf16-mixed."""
    from test_configs import SMALL_DATA

    from gs_lightning.cli import main

    small = [arg for key, value in SMALL_DATA["LiveActivationDataModule"].items()
             for arg in (f"--data.init_args.{key}", str(value))]
    cli = main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.accelerator", "gpu",
                "--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "60",
                "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path), *small])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 60 and trainer.precision == "bf16-mixed"
    assert trainer.strategy.root_device.type == "cuda"
    # bf16-mixed runs the matmuls in bf16 but keeps the weights and the threshold in fp32.
    for name, p in module.sae.named_parameters():
        assert p.device.type == "cuda" and p.dtype == torch.float32, name
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # The same 60 steps on a CPU in fp32: val/fvu 0.022, val/l0 441 of 2,048, loss recovered 0.996.
    assert 0 < metrics["val/fvu"] < 0.1, metrics
    assert 100 < metrics["val/l0"] < 1500, metrics
    assert metrics["val/loss_recovered"] > 0.9, metrics
    assert list(tmp_path.rglob("sae/sae.safetensors"))


def test_throughput_waits_for_the_gpu_and_logs_mfu() -> None:
    from callbacks import Throughput

    throughput = Throughput(peak_flops=1e14, every_n_steps=5)
    module = SAETrainingModule(JumpReLUSAE(256, 4096))
    data = SyntheticActivationDataModule(d_in=256, n_features=512, active_features=8, n_tokens=16 * 2048,
                                         batch_size=2048)
    trainer = pl.Trainer(max_steps=11, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         callbacks=[throughput], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    rates = throughput.last_metrics
    assert rates["perf/tokens_per_s"] > 2048  # a step of 2,048 tokens takes well under a second
    assert rates["perf/mfu"] == pytest.approx(12 * 256 * 4096 * rates["perf/tokens_per_s"] / 1e14, rel=1e-9)


# -- 8-bit Adam's CUDA kernels ---------------------------------------------------------

@needs_bnb
def test_adam8bit_on_cuda_follows_adam() -> None:
    """Five steps from the same SAE and batches: 8-bit Adam's matrices move like torch
    Adam's (up to the moments' 8-bit codes), its threshold like it (fp32 moments)."""
    from gs_lightning.train.optim import build_optimizer

    torch.manual_seed(0)
    base = JumpReLUSAE(64, 8192, threshold_parameterization="raw", fused=False)  # 524,288-element matrices
    batches = torch.randn(5, 256, 64)
    moved = {}
    for name in ("adam8bit", "adam"):
        sae = copy.deepcopy(base).to(CUDA)
        opt = build_optimizer(name, sae.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=name == "adam")
        for x in batches:  # the first step is exact; later ones read the quantised moments back
            out = sae.training_output(x.to(CUDA))
            torch.stack(list(out.losses.values())).sum().backward()
            opt.step()
            opt.zero_grad()
        moved[name] = {n: (p.detach() - getattr(base, n).detach().to(CUDA)).double().flatten()
                       for n, p in sae.named_parameters()}
        if name == "adam8bit":
            for n in ("W_enc", "W_dec"):
                state = opt.state[getattr(sae, n)]
                assert state["state1"].dtype == state["state2"].dtype == torch.uint8, n
                assert state["state1"].device.type == CUDA.type, n
            assert opt.state[sae.raw_threshold]["state1"].dtype == torch.float32
    for n in ("W_enc", "W_dec", "raw_threshold"):
        eight, adam = moved["adam8bit"][n], moved["adam"][n]
        assert adam.abs().max() > 2e-3, n  # five steps of about lr each
        cosine = float(torch.nn.functional.cosine_similarity(eight, adam, dim=0))
        # On a CPU (bitsandbytes' CPU kernels): 0.9995 for W_enc, 0.9997 for W_dec, 0.99996
        # for the threshold (fp32 moments, but gradients through the weights that differ).
        assert cosine > (0.999 if n == "raw_threshold" else 0.995), (n, cosine)
        assert abs(float(eight.norm() / adam.norm()) - 1) < 0.02, n


def _fit_with(optimizer: str, tmp_path: Path) -> tuple[float, float, pl.Trainer]:
    """(val/fvu before, after, the Trainer) of a short bf16-mixed fit on the GPU."""
    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=64, n_features=256, active_features=4, n_tokens=40 * 1024,
                                         batch_size=1024)
    module = SAETrainingModule(JumpReLUSAE(64, 1024), lr=3e-3, lr_warmup_steps=5, sparsity_warmup_steps=20,
                               optimizer=optimizer)
    trainer = pl.Trainer(max_steps=60, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=False)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/fvu"]
    trainer.fit(module, datamodule=data)
    return before, trainer.validate(module, datamodule=data, verbose=False)[0]["val/fvu"], trainer


@needs_bnb
def test_adam8bit_fit_on_cuda(tmp_path: Path) -> None:
    """``model.optimizer: adam8bit`` in a short bf16-mixed fit: 8-bit state on the GPU, and
    the FVU falls as far as with torch Adam."""
    import bitsandbytes as bnb

    before, adam, _ = _fit_with("adam", tmp_path)
    before8, adam8, trainer = _fit_with("adam8bit", tmp_path)
    opt, sae = trainer.optimizers[0], trainer.lightning_module.sae
    assert isinstance(opt, bnb.optim.Adam8bit)
    for n in ("W_enc", "W_dec"):
        assert opt.state[getattr(sae, n)]["state2"].dtype == torch.uint8, n
        assert opt.state[getattr(sae, n)]["state2"].device.type == "cuda", n
    assert before8 == pytest.approx(before)  # the same SAE and data
    # The same fits on a CPU in fp32: FVU 0.175 -> 0.100 (Adam) and 0.102 (8-bit Adam).
    assert adam < 0.75 * before, (before, adam)
    assert adam8 < 1.1 * adam, (adam, adam8)


# -- DDP over NCCL on two GPUs ----------------------------------------------------------

STEPS, BATCH = 12, 512
PARAMS = ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec", "sae.raw_threshold")


class _SaveState(pl.Callback):
    """Every rank writes its module's state to ``<dirpath>/[init_]rank<r>.pt`` at train start and fit end."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "init_")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "")

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.dirpath) / f"{prefix}rank{trainer.global_rank}.pt")


def train_on_gpus(root: Path, shards: Path, devices: int) -> None:
    """The JumpReLU SAE of tests/test_ddp.py on ``devices`` GPUs at a global batch of ``BATCH``, in fp32."""
    from gs_lightning.data import ShardedActivationDataModule

    pl.seed_everything(0)
    module = SAETrainingModule(JumpReLUSAE(8, 256, threshold_parameterization="raw"), lr=1e-2, lr_warmup_steps=3,
                               sparsity_warmup_steps=5)
    data = ShardedActivationDataModule(str(shards), batch_size=BATCH // devices, window_tokens=1024)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="gpu", devices=devices,
                         strategy="ddp" if devices > 1 else "auto", precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root,
                         callbacks=[_SaveState(str(root))])
    trainer.fit(module, datamodule=data)
    if devices > 1:
        assert trainer.strategy.root_device.type == "cuda"
        assert torch.distributed.get_backend() == "nccl"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"DDP needs 2 GPUs, {torch.cuda.device_count()} visible")
def test_ddp_on_two_gpus_matches_one_gpu(tmp_path: Path) -> None:
    from test_shards import write_folder

    shards = write_folder(tmp_path / "site", n_shards=6, rows=512)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    ddp.mkdir(), one.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Lightning's DDP launcher starts rank 1 by running this module's command line again.
    run = subprocess.run([sys.executable, "-m", "tests.test_gpu", str(ddp), str(shards)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=200)
    assert run.returncode == 0, run.stdout
    train_on_gpus(one, shards, devices=1)
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    rank0, rank1, single, init = (load(ddp / "rank0.pt"), load(ddp / "rank1.pt"), load(one / "rank0.pt"),
                                  load(one / "init_rank0.pt"))
    for key in PARAMS:
        assert torch.equal(rank0[key], rank1[key]), key  # NCCL's all-reduce leaves the replicas identical
        # Two half-batch means averaged against one full-batch mean: float rounding only.
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
        assert (single[key] - init[key]).abs().max() > 1e-2, key  # training moved them far beyond that


if __name__ == "__main__":  # the DDP run: python -m tests.test_gpu ROOT SHARDS
    train_on_gpus(Path(sys.argv[1]), Path(sys.argv[2]), devices=2)
