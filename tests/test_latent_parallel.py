"""Latent sharding on CPU (2 gloo processes, ``ModelParallelStrategy``) trains the same SAE
as one process: every rank reads the same batches from activation shards and holds half
the latents, the gathered weights after training equal the single-process weights up to
float rounding, ``SaveSAE`` writes the whole SAE, and a run resumed from its distributed
checkpoint ends bit for bit where the uninterrupted sharded run ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import SavePlots, SaveSAE
from gs_lightning.data.shard_format import (
    encode_shard,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.errors import ConfigError
from gs_lightning.formats.io import load_sae, load_sae_config
from gs_lightning.saes import JumpReLUSAE, TopKSAE
from gs_lightning.train.module import SAETrainingModule

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH, D_IN, D_SAE = 10, 128, 16, 256
KILLED_AT = 5  # mid-epoch and mid-window: 10 batches an epoch, windows of 4 batches
PARAMS = ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec", "sae.raw_threshold")
# Latent sharding refuses the dead-latent remedies (on by default): a top-k across shards.
NO_REMEDY = dict(aux_coefficient=0.0, dead_coefficient=0.0)


def write_shards(folder: Path, n_shards: int = 6, rows: int = 2 * BATCH) -> Path:
    """Synthetic sparse activations (structure an SAE can learn) as a shard folder: the
    DataModule trains on the first 5 shards (10 batches an epoch) and validates on the 6th."""
    from gs_lightning.data import SyntheticActivationDataModule

    acts = SyntheticActivationDataModule(d_in=D_IN, n_features=64, active_features=4,
                                         n_tokens=n_shards * rows).load()
    folder.mkdir(parents=True)
    manifest = {"model": "test/model", "site": "blocks.0.hook_resid_post", "d": D_IN, "dtype": "float32",
                "shards": []}
    for i in range(n_shards):
        rows_i = acts[i * rows:(i + 1) * rows].contiguous()
        data = encode_shard(rows_i, torch.arange(rows), torch.arange(rows) % 64)
        (folder / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, rows_i, bucket=i))
    write_manifest(folder, manifest)
    return folder


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

        from gs_lightning.train.parallel import full_state_dict

        local = {k: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
                 for k, p in pl_module.named_parameters()}
        plots = next((cb for cb in trainer.callbacks if isinstance(cb, SavePlots)), None)
        out = {"state": full_state_dict(pl_module), "local_shapes": local, "grads": self.first_grads,
               "plot_rows": plots.rows if plots is not None else [],
               "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
        torch.save(out, Path(self.dirpath) / f"{prefix}rank{trainer.global_rank}.pt")


def train(root: Path, shards: Path, devices: int, max_steps: int = STEPS, ckpt_path: str | None = None) -> None:
    """Fit a JumpReLU SAE on ``shards``: latent-sharded on ``devices`` processes, or alone.

    Both read the same batches (the sharded ranks form one data-parallel replica); a
    checkpoint is written every ``KILLED_AT`` steps.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    from gs_lightning.data import ShardedActivationDataModule

    pl.seed_everything(0)
    data = ShardedActivationDataModule(str(shards), batch_size=BATCH, window_tokens=4 * BATCH)
    # A high initial threshold leaves some latents silent in the last batches: the dead-latent
    # counter then has nonzero entries to compare. Unit encoder columns (Gemma Scope's init) make
    # every latent's pre-activation reach 0.2 on some tokens, so every parameter has a gradient
    # at the first step; sharding does not implement the dead-latent remedies.
    sae = JumpReLUSAE(D_IN, D_SAE, sparsity_coefficient=1e-2, threshold_init=0.2, threshold_parameterization="raw",
                      encoder_init_scale=1.0, bandwidth=0.001, **NO_REMEDY)
    module = SAETrainingModule(sae, lr=1e-2, lr_warmup_steps=3, sparsity_warmup_steps=5,
                               latent_parallel=devices > 1)
    strategy = ModelParallelStrategy() if devices > 1 else "auto"
    saver = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=KILLED_AT, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, strategy=strategy,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=KILLED_AT, default_root_dir=root,
                         callbacks=[saver, SavePlots(str(root / "plots")), SaveGathered(str(root)),
                                    SaveSAE(str(root / "sae"))])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


def _launch(root: Path, shards: Path, max_steps: int = STEPS, ckpt_path: str | None = None) -> subprocess.Popen:
    """A 2-process sharded run; Lightning's launcher starts rank 1 by running this module again."""
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [str(root), str(shards), str(max_steps), *([ckpt_path] if ckpt_path else [])]
    return subprocess.Popen([sys.executable, "-m", "tests.test_latent_parallel", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("latent_parallel")
    shards = write_shards(tmp / "site")
    sharded, killed = _launch(tmp / "sharded", shards), _launch(tmp / "killed", shards, max_steps=KILLED_AT)
    (tmp / "one").mkdir()
    train(tmp / "one", shards, devices=1)  # the one-process reference, meanwhile
    _finish(killed)
    checkpoint = tmp / "killed" / "checkpoints" / f"epoch=0-step={KILLED_AT}.ckpt"
    assert checkpoint.is_dir()  # a distributed checkpoint: a folder of per-rank shards
    resumed = _launch(tmp / "resumed", shards, ckpt_path=str(checkpoint))
    _finish(sharded)
    _finish(resumed)
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
    return {"rank0": load("sharded/rank0.pt"), "rank1": load("sharded/rank1.pt"),
            "one": load("one/rank0.pt"), "init": load("one/init_rank0.pt"),
            "init_sharded": load("sharded/init_rank0.pt"), "resumed": load("resumed/rank0.pt"),
            "killed": load("killed/rank0.pt"), "root": tmp}


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
    # Validation (at steps 5 and 10) computes the global reconstruction and L0 on every rank.
    val, val_one = runs["rank0"]["val"], runs["one"]["val"]
    assert set(val_one) == {"val/fvu", "val/l0", "val/mse", "val/never_fire_frac", "val/dense_frac"}, val_one
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
        SAETrainingModule(JumpReLUSAE(8, 32, **NO_REMEDY), latent_parallel=True,
                          sweep={"sparsity_coefficient": [1e-3, 1e-2]})
    with pytest.raises(ConfigError, match="latent_parallel trains with model.optimizer: adam only"):
        SAETrainingModule(JumpReLUSAE(8, 32, **NO_REMEDY), latent_parallel=True, optimizer="adam8bit")
    with pytest.raises(ConfigError, match="set model.sae.init_args.dense_coefficient, dead_coefficient and aux"):
        SAETrainingModule(JumpReLUSAE(8, 32), latent_parallel=True)  # AuxK is on by default


def test_needs_model_parallel_strategy(tmp_path) -> None:
    from gs_lightning.data import SyntheticActivationDataModule

    module = SAETrainingModule(JumpReLUSAE(8, 32, **NO_REMEDY), latent_parallel=True)
    data = SyntheticActivationDataModule(d_in=8, n_features=16, active_features=2, n_tokens=256, batch_size=64)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="latent_parallel needs trainer.strategy: .*ModelParallelStrategy"):
        trainer.fit(module, datamodule=data)


@pytest.mark.slow
def test_save_sae_writes_the_gathered_sae(runs) -> None:
    # Rank 0 writes the whole dictionary; it loads as a plain SAE equal to the one-process one.
    sharded, one = load_sae(runs["root"] / "sharded" / "sae"), load_sae(runs["root"] / "one" / "sae")
    assert type(sharded) is JumpReLUSAE and sharded.d_sae == D_SAE
    assert load_sae_config(runs["root"] / "sharded" / "sae")["init_args"] == load_sae_config(runs["root"] / "one" / "sae")["init_args"]
    for key, value in one.canonical_state_dict().items():
        torch.testing.assert_close(sharded.canonical_state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # ...and is the trained SAE, not its initial weights.
    assert (one.W_enc - runs["init"]["state"]["sae.W_enc"]).abs().max() > 1e-3


@pytest.mark.slow
def test_resume_from_distributed_checkpoint_is_exact(runs) -> None:
    # Killed at step 5 (mid-epoch), resumed to step 10: every shard, Adam's state, the
    # dead-latent counter and the data position come back; float sums run in the same order.
    resumed, full, killed = runs["resumed"]["state"], runs["rank0"]["state"], runs["killed"]["state"]
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key
    # The resume had work to do: the killed run's weights are far from the final ones.
    assert (killed["sae.W_enc"] - full["sae.W_enc"]).abs().max() > 1e-3


@pytest.mark.slow
def test_save_plots_measures_the_gathered_sae(runs) -> None:
    # Rank 0 measures the whole dictionary on the validation shard: the one-process figures.
    (sharded,), (one,) = runs["rank0"]["plot_rows"], runs["one"]["plot_rows"]
    assert sharded["l0"] == pytest.approx(one["l0"], rel=1e-4) and one["l0"] > 0
    assert sharded["fvu"] == pytest.approx(one["fvu"], rel=1e-4)
    assert (runs["root"] / "sharded" / "plots" / "frontier.png").stat().st_size > 0
    assert runs["rank1"]["plot_rows"] == []  # only rank 0 draws


def test_refuses_delta_lm_loss_before_training(tmp_path) -> None:
    from callbacks import DeltaLMLoss
    from gs_lightning.data import SyntheticActivationDataModule

    module = SAETrainingModule(JumpReLUSAE(8, 32, **NO_REMEDY), latent_parallel=True)
    data = SyntheticActivationDataModule(d_in=8, n_features=16, active_features=2, n_tokens=256, batch_size=64)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[DeltaLMLoss()])
    with pytest.raises(ConfigError, match="callbacks.DeltaLMLoss cannot splice a latent-sharded SAE"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


if __name__ == "__main__":  # a sharded run: python -m tests.test_latent_parallel ROOT SHARDS STEPS [CKPT]
    train(Path(sys.argv[1]), Path(sys.argv[2]), devices=2, max_steps=int(sys.argv[3]),
          ckpt_path=sys.argv[4] if len(sys.argv) > 4 else None)
