"""SAELens as the peer of ``benchmarks/quality.py`` and ``benchmarks/synthetic.py``: its training SAEs and its own trainer.

Each SAELens SAE is trained by SAELens' ``SAETrainer`` (its Adam, lr schedule, L0
warm-up, dead-latent bookkeeping and gradient clipping at norm 1), one ``step`` per batch
of the stream gs_lightning trains on, so both tools see the same tokens in the same
order. At the end SAELens' own conversion makes the inference SAE (``save_inference_model``
then ``SAE.load_from_disk``: BatchTopK becomes a JumpReLU, TopK stays TopK), with the
input normalisation folded in as SAELens folds it, so it reads raw activations.

Needs the ``bench`` extra (``pip install -e ".[bench]"``); :func:`available` says whether
it is installed.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def available() -> bool:
    """Whether SAELens can be imported."""
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PeerRun:
    """One SAELens SAE in training: its trainer, and what the table needs to know."""

    name: str
    family: str
    trainer: Any
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def step(self, batch: Tensor) -> None:
        """One SAELens training step on a raw batch (timed)."""
        start = time.perf_counter()
        self.trainer.step(batch)
        self.trainer.n_training_steps += 1  # fit() advances this after each step; we drive the loop
        self.seconds += time.perf_counter() - start

    def inference_sae(self) -> nn.Module:
        """The SAE as trained so far, as SAELens ships it: a copy with the input scaling
        folded in, of the inference class. Training can go on afterwards."""
        from sae_lens import SAE

        sae, factor = copy.deepcopy(self.trainer.sae), self.trainer.activation_scaler.scaling_factor
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
        with tempfile.TemporaryDirectory() as folder:
            sae.save_inference_model(folder)
            return SAE.load_from_disk(folder, device="cpu").eval()


def make_run(name: str, family: str, cfg: Any, steps: int, batch: int, schedule: dict[str, Any],
             scaling_factor: float) -> PeerRun:
    """A SAELens training SAE of config ``cfg`` with its trainer.

    ``schedule`` holds SAETrainerConfig fields (lr, lr_warm_up_steps, adam_beta1, ...);
    ``scaling_factor`` multiplies raw activations (SAELens' activation scaler, set up
    front from the harvest's statistics instead of estimated from the first batches,
    which would consume stream batches that gs_lightning trains on).
    """
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = _training_class(family)(cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                                   device="cpu", lr_end=schedule.get("lr", 3e-4) / 10, **schedule)
    trainer = SAETrainer(trainer_cfg, sae, data_provider=iter(()))
    trainer.activation_scaler.scaling_factor = scaling_factor
    return PeerRun(name, family, trainer, settings={**schedule})


def split_fields(fields: dict[str, Any], trainer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A peer configuration as (SAE config fields, SAETrainerConfig fields): ``trainer`` with the
    configuration's ``lr``, if it names one, since SAELens sets the learning rate on its trainer."""
    sae_fields = {k: v for k, v in fields.items() if k != "lr"}
    return sae_fields, {**trainer, **({"lr": fields["lr"]} if "lr" in fields else {})}


def _training_class(family: str) -> Any:
    import sae_lens

    return {"jumprelu": sae_lens.JumpReLUTrainingSAE, "topk": sae_lens.TopKTrainingSAE,
            "batchtopk": sae_lens.BatchTopKTrainingSAE,
            "matryoshka": sae_lens.MatryoshkaBatchTopKTrainingSAE}[family]


def topk_config(family: str, d_in: int, d_sae: int, k: int, prefixes: list[int] | None = None) -> Any:
    """SAELens' TopK, BatchTopK or Matryoshka BatchTopK config at its defaults, with ``k``."""
    import sae_lens

    if family == "topk":
        return sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    if family == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k,
                                                         matryoshka_widths=[*(prefixes or []), d_sae])


def saelens_scaling_factor(d_in: int, mean_norm: float) -> float:
    """SAELens' ``expected_average_only_in`` normalisation: scale raw inputs to E||x|| = sqrt(d)."""
    return math.sqrt(d_in) / mean_norm


@torch.no_grad()
def encode_dense(sae: nn.Module, x: Tensor) -> Tensor:
    """``sae.encode(x)`` as a dense tensor (SAELens' TopK may hand back a sparse one)."""
    f = sae.encode(x)
    return f.to_dense() if f.is_sparse else f
