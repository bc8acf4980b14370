"""The LightningModule that trains any :class:`~gs_lightning.saes.SAE` variant."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from gs_lightning.errors import ConfigError
from gs_lightning.metrics import PooledFVU, batch_fvu
from gs_lightning.saes import SAE
from gs_lightning.schedules import lr_factor, sparsity_warmup


def check_widths(sae: SAE, datamodule: Any) -> None:
    """Raise a ConfigError naming both widths when the SAE's ``d_in`` differs from the data's."""
    if datamodule.d_in != sae.d_in:
        raise ConfigError(
            f"model.sae.init_args.d_in={sae.d_in} but {type(datamodule).__name__} yields "
            f"activations of width {datamodule.d_in}; set model.sae.init_args.d_in: {datamodule.d_in}"
        )


class SAETrainingModule(pl.LightningModule):
    """Trains one SAE on batches of raw activations ``[batch, d_in]``.

    Inputs are multiplied by the data's ``input_scale`` before the SAE sees them; the
    scale is a buffer, so it is saved in checkpoints and folded into the exported SAE.

    Args:
        sae: The SAE to train; pick the variant with ``class_path``.
        lr: Adam learning rate after warm-up (Gemma Scope: 7e-5).
        adam_betas: Adam betas (Gemma Scope: (0.0, 0.999)).
        adam_eps: Adam epsilon.
        lr_warmup_steps: Cosine warm-up of the learning rate from 0.1 lr over this many steps.
        lr_decay_fraction: Decay the learning rate linearly to 0 over this final fraction of
            ``trainer.max_steps`` (0 disables; Anthropic's 2025 recipe uses 0.2).
        sparsity_warmup_steps: Linear warm-up of the sparsity coefficient from 0 (Gemma Scope: 10,000).
        dead_window_tokens: A latent that has not fired for this many tokens counts as dead.
        check_finite: Stop with a clear error when a batch or the loss is NaN/Inf
            (one host sync per step).
    """

    def __init__(
        self,
        sae: SAE,
        lr: float = 7e-5,
        adam_betas: tuple[float, float] = (0.0, 0.999),
        adam_eps: float = 1e-8,
        lr_warmup_steps: int = 1000,
        lr_decay_fraction: float = 0.0,
        sparsity_warmup_steps: int = 10_000,
        dead_window_tokens: int = 10_000_000,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["sae"])
        self.sae = sae
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float64))
        # Tokens since each latent last fired; float64 counts exactly up to 2^53 tokens.
        self.register_buffer("tokens_since_fired", torch.zeros(sae.d_sae, dtype=torch.float64))
        # torchmetrics states: pooled over every validation token and summed across ranks.
        self.val_fvu = PooledFVU(sae.d_in)
        self.val_l0 = MeanMetric()
        self.val_mse = MeanMetric()

    # -- set-up ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None and str(self.trainer.precision) in ("bf16-true", "16-true"):
            # These precisions cast every parameter, the threshold included, to half
            # precision, where Adam's small threshold updates round away.
            raise ConfigError(
                f"trainer.precision={self.trainer.precision!r} would store the SAE threshold in half "
                "precision; use bf16-mixed (matmuls in bf16, weights and threshold in fp32)"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "d_in"):
            return
        check_widths(self.sae, datamodule)
        # A checkpoint restored after setup overwrites this with the scale it trained on.
        self.input_scale.fill_(float(datamodule.input_scale))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fused Adam: one kernel for all parameters instead of a dozen temporaries each.
        optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), eps=hp.adam_eps, fused=True
        )
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        schedule = functools.partial(
            lr_factor, warmup_steps=hp.lr_warmup_steps, total_steps=total, decay_fraction=hp.lr_decay_fraction
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training ----------------------------------------------------------------------

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = batch * self.input_scale.to(batch.dtype)
        warmup = sparsity_warmup(self.global_step, self.hparams.sparsity_warmup_steps)
        out = self.sae.training_output(x, warmup)
        loss = torch.stack(list(out.losses.values())).sum()
        if self.hparams.check_finite and not torch.isfinite(loss):
            self._raise_not_finite(batch, out.losses)
        self._log_train(x, out, loss, warmup)
        return loss

    def _raise_not_finite(self, batch: Tensor, losses: dict[str, Tensor]) -> None:
        bad = int((~torch.isfinite(batch)).any(-1).sum())
        where = f"{bad} of {batch.shape[0]} activations in batch contain NaN/Inf" if bad else "the inputs are finite"
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {self.global_step}: {where}; loss terms: {terms}")

    @torch.no_grad()
    def _log_train(self, x: Tensor, out: Any, loss: Tensor, warmup: float) -> None:
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired.masked_fill_(out.fire_counts > 0, 0)
        dead = (self.tokens_since_fired >= self.hparams.dead_window_tokens).float().mean()
        metrics = {
            "train/loss": loss.detach(),
            "train/mse": out.losses["mse"].detach(),
            "train/l0": out.l0,
            "train/fvu": batch_fvu(x, out.x_hat),
            "train/dead_frac": dead,
            "train/sparsity_warmup": warmup,
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"] if self._trainer is not None else 0.0,
        }
        coefficient = getattr(self.sae, "sparsity_coefficient", None)
        if coefficient is not None:
            metrics["train/lambda"] = warmup * coefficient
        for name, value in out.losses.items():
            metrics[f"train/loss_{name}"] = value.detach()
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log_dict({"l0": out.l0, "fvu": metrics["train/fvu"]}, prog_bar=True, logger=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After DDP's all-reduce and before clipping: project out the parallel component.
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    # -- validation --------------------------------------------------------------------

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        scale = self.input_scale.to(batch.dtype)
        f = self.sae.encode(batch * scale)
        # Reconstruction in raw units: FVU and MSE are reported on unscaled activations.
        x_hat = self.sae.decode(f) / scale
        self.val_fvu.update(batch, x_hat)
        self.log("val/fvu", self.val_fvu, on_step=False, on_epoch=True, prog_bar=True)
        self.val_l0.update((f != 0).sum(-1).float())
        self.val_mse.update((x_hat - batch).pow(2).sum(-1))
        self.log("val/l0", self.val_l0, on_step=False, on_epoch=True)
        self.log("val/mse", self.val_mse, on_step=False, on_epoch=True)
