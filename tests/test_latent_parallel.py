"""Latent sharding on CPU (2 gloo processes, ``ModelParallelStrategy``) trains the same SAE
as one process: every rank reads the same batch and holds half the latents, and the
gathered weights after training equal the single-process weights up to float rounding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from gs_lightning.cli import close_process_group
from gs_lightning.errors import ConfigError
from gs_lightning.module import SAETrainingModule
from gs_lightning.saes import JumpReLUSAE, TopKSAE

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH, D_IN, D_SAE = 10, 128, 16, 256
PARAMS = ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec", "sae.raw_threshold")


class SaveGathered(pl.Callback):
    """Test hook: every rank writes the gathered ``state_dict``, its local parameter shapes
    and the gathered gradients of the first step to ``<dirpath>/[init_]rank<r>.pt`` when
    training starts and when fit ends."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.first_grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        if not self.first_grads:  # Adam's steps are nearly scale-free: check the gradients themselves
            self.first_grads = {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                                for k, p in pl_module.named_parameters()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "init_")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "")

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        from torch.distributed.tensor import DTensor

        from gs_lightning.parallel import full_state_dict

        local = {k: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
                 for k, p in pl_module.named_parameters()}
        out = {"state": full_state_dict(pl_module), "local_shapes": local, "grads": self.first_grads,
               "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
        torch.save(out, Path(self.dirpath) / f"{prefix}rank{trainer.global_rank}.pt")


def train(root: Path, devices: int) -> None:
    """Fit a JumpReLU SAE for ``STEPS`` steps: latent-sharded on ``devices`` processes, or alone."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from gs_lightning.data import SyntheticActivationDataModule

    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=D_IN, n_features=64, active_features=4, n_tokens=BATCH * 8,
                                         batch_size=BATCH, val_fraction=0.125)
    sae = JumpReLUSAE(D_IN, D_SAE, sparsity_coefficient=1e-2, threshold_parameterization="raw")
    module = SAETrainingModule(sae, lr=1e-2, lr_warmup_steps=3, sparsity_warmup_steps=5,
                               latent_parallel=devices > 1)
    strategy = ModelParallelStrategy() if devices > 1 else "auto"
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=devices, strategy=strategy,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                         callbacks=[SaveGathered(str(root))])  # 7 batches an epoch: validates after step 7
    trainer.fit(module, datamodule=data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("latent_parallel")
    (tmp / "sharded").mkdir()
    (tmp / "one").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Lightning's launcher starts rank 1 by running this module's command line again.
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_latent_parallel", str(tmp / "sharded")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train(tmp / "one", devices=1)  # the one-process reference, meanwhile
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
    return {"rank0": load("sharded/rank0.pt"), "rank1": load("sharded/rank1.pt"),
            "one": load("one/rank0.pt"), "init": load("one/init_rank0.pt"),
            "init_sharded": load("sharded/init_rank0.pt")}


@pytest.mark.slow
def test_sharded_weights_match_one_process(runs) -> None:
    sharded, one, init = runs["rank0"]["state"], runs["one"]["state"], runs["init"]["state"]
    for key in PARAMS:
        assert sharded[key].shape == one[key].shape, key  # gathered to the full shape
        assert torch.equal(sharded[key], runs["rank1"]["state"][key]), key  # both ranks gather the same
        torch.testing.assert_close(sharded[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
        # The comparison has teeth: training moved every parameter far beyond the tolerance.
        assert (one[key] - init[key]).abs().max() > 1e-3, key
    # The dead-latent counter is the global one (every rank saw the whole batch).
    torch.testing.assert_close(sharded["tokens_since_fired"], one["tokens_since_fired"], rtol=0, atol=0)
    assert (one["tokens_since_fired"] > 0).any()
    # Validation (after step 7) computes the global reconstruction and L0 on every rank.
    val, val_one = runs["rank0"]["val"], runs["one"]["val"]
    assert set(val_one) == {"val/fvu", "val/l0", "val/mse"}, val_one
    for key in val_one:
        assert val[key] == pytest.approx(val_one[key], rel=1e-4), key


@pytest.mark.slow
def test_first_step_gradients_match_one_process(runs) -> None:
    # A gradient summed over ranks in backward would be 2x here (Adam alone would hide it).
    sharded, one = runs["rank0"]["grads"], runs["one"]["grads"]
    for key in PARAMS:
        assert one[key].abs().max() > 0, key
        torch.testing.assert_close(sharded[key], one[key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.slow
def test_each_rank_holds_half_the_latents(runs) -> None:
    half = D_SAE // 2
    expected = {"sae.W_enc": (D_IN, half), "sae.b_enc": (half,), "sae.W_dec": (half, D_IN),
                "sae.raw_threshold": (half,), "sae.b_dec": (D_IN,)}
    for rank in ("rank0", "rank1"):
        assert runs[rank]["local_shapes"] == expected, rank
    # The shards, gathered in rank order, are the single process's initial weights exactly.
    init_one, init_sharded = runs["init"]["state"], runs["init_sharded"]["state"]
    for key in PARAMS:
        torch.testing.assert_close(init_sharded[key], init_one[key], rtol=0, atol=0, msg=key)


def test_refuses_topk_sweeps_and_adam8bit() -> None:
    with pytest.raises(ConfigError, match="latent_parallel supports JumpReLUSAE only, not TopKSAE"):
        SAETrainingModule(TopKSAE(8, 32, k=4), latent_parallel=True)
    with pytest.raises(ConfigError, match="cannot be combined with model.sweep"):
        SAETrainingModule(JumpReLUSAE(8, 32), latent_parallel=True, sweep={"sparsity_coefficient": [1e-3, 1e-2]})
    with pytest.raises(ConfigError, match="latent_parallel trains with model.optimizer: adam only"):
        SAETrainingModule(JumpReLUSAE(8, 32), latent_parallel=True, optimizer="adam8bit")


def test_needs_model_parallel_strategy(tmp_path) -> None:
    from gs_lightning.data import SyntheticActivationDataModule

    module = SAETrainingModule(JumpReLUSAE(8, 32), latent_parallel=True)
    data = SyntheticActivationDataModule(d_in=8, n_features=16, active_features=2, n_tokens=256, batch_size=64)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="latent_parallel needs trainer.strategy: .*ModelParallelStrategy"):
        trainer.fit(module, datamodule=data)


def test_refuses_save_sae_before_training(tmp_path) -> None:
    from callbacks import SaveSAE
    from gs_lightning.data import SyntheticActivationDataModule

    module = SAETrainingModule(JumpReLUSAE(8, 32), latent_parallel=True)
    data = SyntheticActivationDataModule(d_in=8, n_features=16, active_features=2, n_tokens=256, batch_size=64)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[SaveSAE()])
    with pytest.raises(ConfigError, match="callbacks.SaveSAE cannot export a latent-sharded SAE"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0

if __name__ == "__main__":  # the sharded run: python -m tests.test_latent_parallel ROOT
    train(Path(sys.argv[1]), devices=2)
    close_process_group()  # else gloo may abort the exit (see its docstring)
