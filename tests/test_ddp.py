"""DDP on CPU (2 gloo processes) trains the same SAE as one process at the same global batch.

``ShardedActivationDataModule`` cuts one global sequence of batches and gives rank r
batches r, r+W, ...; the sequence of rows does not depend on the batch size (windows of
whole batches). So at a local batch of B/2, step s of rank 0 reads rows [sB, sB + B/2)
and rank 1 rows [sB + B/2, (s+1)B): together exactly the rows that one process reads at
step s with batch B. Every loss term is a mean over tokens, so DDP's averaged gradient is
the gradient of the global batch and the weights agree up to float rounding.

Per-latent statistics: the module's dead-latent counter sums firing counts over ranks,
and BatchTopK selects the top k*B of the global batch on every rank, so its threshold
estimate is the global one; both are tested equal to one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH = 12, 128
SAES = ("jumprelu", "batchtopk")


class SaveFinalState(pl.Callback):
    """Test hook: every rank writes its module's ``state_dict`` to ``<dirpath>/[init_]rank<r>.pt``
    when training starts and when fit ends."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "init_")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "")

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.dirpath) / f"{prefix}rank{trainer.global_rank}.pt")


def train(root: Path, shards: Path, sae: str, devices: int) -> None:
    """Fit ``sae`` on ``devices`` CPU processes at a global batch of ``BATCH``; states land in ``root``.

    The Trainer is built directly, so the test controls every option of the two runs.
    """
    from gs_lightning.data import ShardedActivationDataModule
    from gs_lightning.saes import BatchTopKSAE, JumpReLUSAE
    from gs_lightning.train.module import SAETrainingModule

    pl.seed_everything(0)
    # 32x wider than its input, the default threshold 1 / sqrt(8) would sit ~16 typical
    # pre-activations up and nothing would fire in this short run: the former sigma0-based numbers.
    build = {"jumprelu": lambda: JumpReLUSAE(8, 256, threshold_parameterization="raw", bandwidth=0.022,
                                             threshold_init=0.0022),
             "batchtopk": lambda: BatchTopKSAE(8, 256, k=4, aux_k=16)}[sae]
    module = SAETrainingModule(build(), lr=1e-2, lr_warmup_steps=3, sparsity_warmup_steps=5)
    # The same global batch: B/2 on each of 2 ranks, B on one process.
    data = ShardedActivationDataModule(str(shards), batch_size=BATCH // devices, window_tokens=256)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=root, callbacks=[SaveFinalState(str(root))])
    trainer.fit(module, datamodule=data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per SAE variant: the final state of rank 0 and rank 1 under DDP and of one process."""
    from test_shards import (
        write_folder,  # the synthetic shard folder of the DataModule's tests
    )

    tmp = tmp_path_factory.mktemp("ddp")
    # 5 training shards x 128 rows: 5 global batches an epoch, so 12 steps cross two epochs.
    shards = write_folder(tmp / "site", n_shards=6, rows=128)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for sae in SAES:
        for kind in ("ddp", "one"):
            (tmp / f"{sae}_{kind}").mkdir()
    # Lightning's DDP launcher starts rank 1 by running this module's command line again.
    procs = {sae: subprocess.Popen([sys.executable, "-m", "tests.test_ddp", str(tmp / f"{sae}_ddp"), str(shards), sae],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for sae in SAES}
    for sae in SAES:  # the one-process references run in-process meanwhile
        train(tmp / f"{sae}_one", shards, sae, devices=1)
    results = {}
    for sae, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
        results[sae] = {"rank0": load(f"{sae}_ddp/rank0.pt"), "rank1": load(f"{sae}_ddp/rank1.pt"),
                        "one": load(f"{sae}_one/rank0.pt"), "init": load(f"{sae}_one/init_rank0.pt")}
    return results


PARAMS = ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec")


@pytest.mark.slow
def test_ddp_weights_match_one_process(runs) -> None:
    ddp, one, rank1 = runs["jumprelu"]["rank0"], runs["jumprelu"]["one"], runs["jumprelu"]["rank1"]
    for key in (*PARAMS, "sae.raw_threshold"):
        assert torch.equal(ddp[key], rank1[key]), key  # DDP keeps the replicas identical
        # Float rounding only: the all-reduce sums two half-batch means.
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # The comparison has teeth: training moved the weights far beyond the tolerance.
    init = runs["jumprelu"]["init"]
    for key in (*PARAMS, "sae.raw_threshold"):
        assert (one[key] - init[key]).abs().max() > 1e-2, key


@pytest.mark.slow
def test_dead_latent_counter_matches_one_process(runs) -> None:
    # The module sums firing counts and tokens over ranks before updating the counter.
    ddp, one = runs["jumprelu"]["rank0"], runs["jumprelu"]["one"]
    # Guard: the statistic is not trivially zero (latents went unfired for some steps).
    assert (one["tokens_since_fired"] > 0).sum() > 50
    torch.testing.assert_close(ddp["tokens_since_fired"], one["tokens_since_fired"], rtol=0, atol=0)


@pytest.mark.slow
def test_batchtopk_matches_one_process(runs) -> None:
    # Every rank finds the global batch's k*B-th activation (all_gather of local candidates).
    ddp, one = runs["batchtopk"]["rank0"], runs["batchtopk"]["one"]
    assert float(one["sae.threshold"]) > 0  # an estimate was made
    for key in (*PARAMS, "sae.threshold"):
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # AuxK's dead-latent counters: a latent fired if it fired on either rank's half.
    assert (one["sae.tokens_since_fired"] > 0).any()
    assert torch.equal(ddp["sae.tokens_since_fired"], one["sae.tokens_since_fired"])
    assert torch.equal(runs["batchtopk"]["rank1"]["sae.tokens_since_fired"], one["sae.tokens_since_fired"])


if __name__ == "__main__":  # the DDP run: python -m tests.test_ddp ROOT SHARDS SAE
    train(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], devices=2)
