"""The LightningModule that trains any :class:`~gs_lightning.saes.SAE` variant."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gs_lightning.data.ground_truth import GroundTruth, GroundTruthBatch
from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.ground_truth import GroundTruthScorer
from gs_lightning.evaluation.metrics import DENSE_THRESHOLD, batch_fvu
from gs_lightning.evaluation.scoring import ReconstructionScorer
from gs_lightning.saes import SAE, TrainOutput
from gs_lightning.saes.dead import count_firing, is_dead
from gs_lightning.train import parallel
from gs_lightning.train.optim import OPTIMIZERS, OptimizerName, build_optimizer
from gs_lightning.train.packed import PackedSAE, build_packed, metric_key
from gs_lightning.train.schedules import lr_factor, sparsity_warmup


def param_groups(sae: SAE, lr: float) -> list[dict[str, Any]]:
    """Adam parameter groups of one SAE at base learning rate ``lr``: one group per distinct
    multiplier of :meth:`SAE.lr_scales` (a single group when it names none)."""
    scales = sae.lr_scales()
    groups: dict[float, list[nn.Parameter]] = {1.0: []}  # first: the scale-1 group, whose lr is logged
    for name, param in sae.named_parameters():
        groups.setdefault(scales.get(name, 1.0), []).append(param)
    return [{"params": params, "lr": lr * scale} for scale, params in groups.items() if params]


def check_widths(sae: SAE | PackedSAE, datamodule: Any) -> None:
    """Raise a ConfigError naming both widths when the SAE's ``d_in`` (or a transcoder's
    ``d_out``) differs from the data's, or when only one of them has a target site."""
    name = type(datamodule).__name__
    if datamodule.d_in != sae.d_in:
        raise ConfigError(
            f"model.sae.init_args.d_in={sae.d_in} but {name} yields "
            f"activations of width {datamodule.d_in}; set model.sae.init_args.d_in: {datamodule.d_in}"
        )
    stacked, wanted = getattr(datamodule, "stacked_sites", None), getattr(sae, "stacked_sites", None)
    if stacked != wanted:
        def says(n: int | None) -> str:
            return "one site per batch" if n is None else f"{n} stacked sites"
        raise ConfigError(f"the SAE reads {says(wanted)} but {name} yields {says(stacked)}; "
                          "a cross-layer transcoder needs one input site per layer (AlignedShardsDataModule)")
    paired = bool(getattr(datamodule, "paired", False))
    if paired and sae.d_out is None:
        raise ConfigError(
            f"{name} streams (input, target) pairs but model.sae.init_args.d_out is not set; "
            f"set d_out: {datamodule.d_out} to train a transcoder, or drop the data's target"
        )
    if sae.d_out is not None and not paired:
        raise ConfigError(
            f"model.sae.init_args.d_out={sae.d_out} makes a transcoder, but {name} has no target site; "
            "set data.init_args.target_site (live) or target_path (shards), or drop d_out"
        )
    if paired and sae.d_out != datamodule.d_out:
        raise ConfigError(
            f"model.sae.init_args.d_out={sae.d_out} but the target site has width {datamodule.d_out}; "
            f"set d_out: {datamodule.d_out}"
        )


class SAETrainingModule(pl.LightningModule):
    """Trains one SAE, or a packed sweep of K SAEs, on batches of raw activations ``[batch, d_in]``.

    Inputs are multiplied by the data's ``input_scale`` before the SAE sees them; the
    scale is a buffer, so it is saved in checkpoints and folded into the exported SAE.

    When the data is a synthetic world (validation batches are
    :class:`~gs_lightning.data.ground_truth.GroundTruthBatch` and the datamodule's
    ``ground_truth`` holds the true features), each validation epoch also logs the SAE's
    scores against the truth (:mod:`gs_lightning.evaluation.ground_truth`): ``val/mcc``,
    ``val/uniqueness``, ``val/precision``, ``val/recall``, ``val/f1``, ``val/shrinkage``.

    With ``sweep``, ``sae`` is the template of K SAEs (:mod:`gs_lightning.train.packed`) that
    read every batch once; each logs its own metrics under ``<key>/<name>`` (e.g.
    ``train/l0/sparsity_coefficient=0.0003``) and has its own Adam parameter group.

    Args:
        sae: The SAE to train; pick the variant with ``class_path``.
        lr: Adam learning rate after warm-up (Gemma Scope: 7e-5).
        adam_betas: Adam betas (Gemma Scope: (0.0, 0.999)).
        adam_eps: Adam epsilon.
        lr_warmup_steps: Cosine warm-up of the learning rate from 0.1 lr over this many steps.
        lr_decay_fraction: Decay the learning rate linearly to 0 over this final fraction of
            ``trainer.max_steps`` (0 disables; Anthropic's 2025 recipe uses 0.2).
        sparsity_warmup_steps: Linear warm-up of the sparsity coefficient from 0 (Gemma Scope: 10,000).
        dead_window_tokens: A latent that has not fired for this many training tokens counts as dead
            in ``train/dead_frac`` (:mod:`gs_lightning.saes.dead`).
        check_finite: Stop with a clear error when a batch or the loss is NaN/Inf
            (one host sync per step).
        gradient_clip_norm: Clip each SAE's gradient to this norm (after the decoder
            projection). Unlike ``trainer.gradient_clip_val``, which would clip the
            concatenation of a sweep's gradients, every SAE is clipped on its own.
        sweep: Train K SAEs from one read of the data: a swept name per key (a constructor
            argument of the SAE, ``seed`` or ``lr``), one value per SAE, e.g.
            ``{sparsity_coefficient: [1.0e-4, 3.0e-4, 1.0e-3]}``.
        optimizer: ``adam`` (torch, fused where it can be) or ``adam8bit`` (bitsandbytes:
            8-bit moments for the matrices, float32 for the threshold and biases; needs
            the ``bnb`` extra). Same lr, betas, eps and parameter groups either way.
        latent_parallel: Shard the SAE's latents across the ranks of
            ``ModelParallelStrategy`` (:mod:`gs_lightning.train.parallel`; JumpReLU only): every
            rank reads the same batch and holds ``d_sae / W`` latents.
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
        gradient_clip_norm: float | None = None,
        sweep: dict[str, list[int | float | str]] | None = None,
        optimizer: OptimizerName = "adam",
        latent_parallel: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"model.optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        self.save_hyperparameters(ignore=["sae"])
        self.sae: SAE | PackedSAE = sae
        if latent_parallel:
            if sweep is not None:
                raise ConfigError("model.latent_parallel shards one SAE; it cannot be combined with model.sweep")
            parallel.check_supported(sae)
            if optimizer != "adam":  # bitsandbytes' kernels take plain tensors, not DTensor shards
                raise ConfigError("model.latent_parallel trains with model.optimizer: adam only")
        if sae.stacked_sites is not None and sweep is not None:
            raise ConfigError(f"model.sweep packs single-site SAEs; a {type(sae).__name__} stacks "
                              f"{sae.stacked_sites} sites. Sweep it as separate runs: python -m gs_lightning sweep")
        self._lrs: list[float | None] = [None]
        if sweep is not None:
            self.sae, self._lrs = build_packed(sae, sweep)
        self._first_group = list(range(len(self._lrs)))  # set again by configure_optimizers
        # One scalar per site: a shape that broadcasts over a batch (per layer for a CLT).
        self.register_buffer("input_scale", torch.ones(sae.scale_shape, dtype=torch.float64))
        if sae.d_out is not None:  # a transcoder: its target site has its own scale
            self.register_buffer("target_scale", torch.ones(sae.scale_shape, dtype=torch.float64))
        # Tokens since each latent last fired (gs_lightning.saes.dead), for train/dead_frac.
        shape = (sae.d_sae,) if sweep is None else (len(self._lrs), sae.d_sae)
        self.register_buffer("tokens_since_fired", torch.zeros(shape, dtype=torch.float64))
        # One scorer per SAE: torchmetrics states pooled over every validation token and rank.
        self.val_scores = nn.ModuleList([ReconstructionScorer(sae) for _ in self._lrs])
        # One per SAE, made afresh each validation epoch (not submodules: no checkpointed state).
        self._truth_scorers: list[GroundTruthScorer] = []

    def named_saes(self) -> list[tuple[str | None, SAE]]:
        """``(name, sae)`` per SAE trained: ``[(None, sae)]`` alone, the members' names in a sweep."""
        if isinstance(self.sae, PackedSAE):
            return self.sae.named_members()
        return [(None, self.sae)]

    # -- set-up ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None and str(self.trainer.precision) in ("bf16-true", "16-true"):
            # These precisions cast every parameter, the threshold included, to half
            # precision, where Adam's small threshold updates round away.
            raise ConfigError(
                f"trainer.precision={self.trainer.precision!r} would store the SAE threshold in half "
                "precision; use bf16-mixed (matmuls in bf16, weights and threshold in fp32)"
            )
        if self._trainer is not None and self.trainer.world_size > 1:
            parallel.close_process_group_at_exit()  # else gloo may abort a finished run's exit
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "d_in"):
            return
        check_widths(self.sae, datamodule)
        # A checkpoint restored after setup overwrites this with the scale it trained on.
        self.input_scale.copy_(_as_scale(datamodule.input_scale, self.input_scale))
        if hasattr(self, "target_scale"):
            self.target_scale.copy_(_as_scale(datamodule.target_scale, self.target_scale))

    def configure_model(self) -> None:
        if self.hparams.get("latent_parallel") and not parallel.is_sharded(self.sae):
            parallel.shard_for_strategy(self.sae, self.trainer.strategy)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # One parameter group per SAE: each keeps its own lr through the shared schedule.
        members = self.sae.members if isinstance(self.sae, PackedSAE) else [self.sae]
        params: list[dict[str, Any]] = []
        self._first_group = []  # the group whose lr each SAE logs as train/lr (its scale-1 parameters)
        for m, lr in zip(members, self._lrs):
            self._first_group.append(len(params))
            params += param_groups(m, hp.lr if lr is None else lr)
        # fused Adam: one kernel for all parameters instead of a dozen temporaries each.
        # Fused Adam exists on CPU and CUDA only (not XLA).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.sae.parameters())
        optimizer = build_optimizer(hp.get("optimizer", "adam"), params, lr=hp.lr, betas=tuple(hp.adam_betas),
                                    eps=hp.adam_eps, fused=fused)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        schedule = functools.partial(
            lr_factor, warmup_steps=hp.lr_warmup_steps, total_steps=total, decay_fraction=hp.lr_decay_fraction
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training ----------------------------------------------------------------------

    def _scaled(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Raw input, scaled input and (for a transcoder) scaled target of a batch."""
        raw, target = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = raw * self.input_scale.to(raw.dtype)
        if target is not None:
            target = target * self.target_scale.to(target.dtype)
        return raw, x, target

    def training_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        raw, x, target = self._scaled(batch)
        warmup = sparsity_warmup(self.global_step, self.hparams.sparsity_warmup_steps)
        if isinstance(self.sae, PackedSAE):
            outs = self.sae.training_outputs(x, warmup, target)
        elif self.hparams.get("latent_parallel"):
            outs = [parallel.sharded_training_output(self.sae, x, warmup, target)]
        else:
            outs = [self.sae.training_output(x, warmup, target)]
        losses = [torch.stack(list(out.losses.values())).sum() for out in outs]
        # The members' losses share no parameters: the sum's gradient is each one's own.
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if self.hparams.check_finite and not torch.isfinite(loss):
            terms = {metric_key(k, name): v for (name, _), out in zip(self.named_saes(), outs)
                     for k, v in out.losses.items()}
            self._raise_not_finite(raw, terms)
        self._log_train(x if target is None else target, outs, losses, warmup)
        return loss

    def _raise_not_finite(self, batch: Tensor, losses: dict[str, Tensor]) -> None:
        bad = int((~torch.isfinite(batch)).any(-1).sum())
        where = f"{bad} of {batch.shape[0]} activations in batch contain NaN/Inf" if bad else "the inputs are finite"
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {self.global_step}: {where}; loss terms: {terms}")

    @torch.no_grad()
    def _log_train(self, x: Tensor, outs: list[TrainOutput], losses: list[Tensor], warmup: float) -> None:
        """``x`` is what the SAEs reconstruct (the scaled input, or a transcoder's target)."""
        counts = torch.stack([out.fire_counts for out in outs]).view_as(self.tokens_since_fired)
        tokens = torch.tensor(float(x.shape[0]), device=counts.device)
        # Latent-parallel ranks already hold the global counts of the one shared batch.
        if self._trainer is not None and self.trainer.world_size > 1 and not self.hparams.get("latent_parallel"):
            # Dead latents are judged on the global batch: a latent that fired on any rank fired.
            counts = self.trainer.strategy.reduce(counts.float(), reduce_op="sum")
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        count_firing(self.tokens_since_fired, counts, tokens.to(self.tokens_since_fired.dtype))
        dead = is_dead(self.tokens_since_fired, self.hparams.dead_window_tokens).float().mean(-1).view(-1)
        # Dense: firing on more than DENSE_THRESHOLD of this (global) batch's tokens.
        dense = (counts.float() > DENSE_THRESHOLD * tokens).float().mean(-1).view(-1)
        groups = self.trainer.optimizers[0].param_groups if self._trainer is not None else None
        metrics: dict[str, Any] = {"train/sparsity_warmup": warmup}
        for i, ((name, sae), out, loss) in enumerate(zip(self.named_saes(), outs, losses)):
            mine = {
                "train/loss": loss.detach(),
                "train/mse": out.losses["mse"].detach(),
                "train/l0": out.l0,
                "train/fvu": batch_fvu(x, out.x_hat),
                "train/dead_frac": dead[i],
                "train/dense_frac": dense[i],
                "train/lr": groups[self._first_group[i]]["lr"] if groups is not None else 0.0,
            }
            coefficient = getattr(sae, "sparsity_coefficient", None)
            if coefficient is not None:
                mine["train/lambda"] = warmup * coefficient
            for term, value in out.losses.items():
                mine[f"train/loss_{term}"] = value.detach()
            metrics.update({metric_key(k, name): v for k, v in mine.items()})
            if i == 0 and self._show_progress():  # the progress bar shows the first SAE of a sweep
                self.log_dict({"l0": out.l0, "fvu": mine["train/fvu"]}, prog_bar=True, logger=False)
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def _show_progress(self) -> bool:
        """Progress-bar values cost a device-to-host copy each: only when a bar is shown,
        and only on logging steps."""
        if self._trainer is None or self.trainer.progress_bar_callback is None:
            return False
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After DDP's all-reduce and before clipping: project out the parallel component.
        self.sae.before_optimizer_step()
        clip = self.hparams.gradient_clip_norm
        if clip is not None:
            for name, sae in self.named_saes():
                norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
                self.log(metric_key("train/grad_norm", name), norm, on_step=True, on_epoch=False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    # -- validation --------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        truth: GroundTruth | None = getattr(getattr(self._trainer, "datamodule", None), "ground_truth", None)
        if truth is not None and self.hparams.get("latent_parallel"):
            raise ConfigError("ground-truth validation scores a whole decoder; model.latent_parallel shards it "
                              "(train the world's SAE without latent_parallel)")
        # Each latent's best-matching true feature follows its decoder row, so the scorers
        # are made from this epoch's decoders.
        self._truth_scorers = [] if truth is None else [
            GroundTruthScorer(sae.W_dec, truth.features.to(self.device)) for _, sae in self.named_saes()]

    def validation_step(self, batch: Tensor | tuple[Tensor, Tensor] | GroundTruthBatch, batch_idx: int) -> None:
        true_acts = None
        if isinstance(batch, GroundTruthBatch):  # a world's rows with the true feature activations behind them
            if not self._truth_scorers:
                raise ConfigError("validation batches carry true feature activations but the datamodule's "
                                  "ground_truth is None: there are no true features to score them against")
            batch, true_acts = batch.acts, batch.true_acts
        raw, x, _ = self._scaled(batch)
        # What is reconstructed, in raw units: the input, or a transcoder's target site.
        target = batch[1] if isinstance(batch, (tuple, list)) else raw
        out_scale = getattr(self, "target_scale", self.input_scale).to(target.dtype)
        for i, (name, sae) in enumerate(self.named_saes()):
            f, counts = None, None
            if self.hparams.get("latent_parallel"):
                x_hat, _, counts = parallel.sharded_reconstruction(sae, x)
            else:
                f = sae.encode(x)
                x_hat = sae.decode(f, x)
            # Reconstruction in raw units: FVU and MSE are reported on unscaled activations.
            x_hat = x_hat / out_scale
            if true_acts is not None:
                self._truth_scorers[i].update(target, x_hat, f, true_acts)
            self.val_scores[i].update(target, x_hat, f, counts)

    def on_validation_epoch_end(self) -> None:
        # Every score is pooled over the whole validation set (and every rank) before it means
        # anything: a latent that never fires on one batch may fire on the next.
        for i, (name, _) in enumerate(self.named_saes()):
            scorer = self.val_scores[i]
            if scorer.empty:
                continue
            scores = scorer.compute()
            for key, logged in (("l0", "l0"), ("fvu", "fvu"), ("mse", "mse"), ("dead_frac", "never_fire_frac"),
                                ("dense_frac", "dense_frac")):
                self.log(metric_key(f"val/{logged}", name), scores[key].float(), prog_bar=i == 0 and key == "fvu",
                         sync_dist=True)
            for j, value in enumerate(scores.get("fvu_sites", [])):
                self.log(f"val/fvu_site{j}", value.float(), sync_dist=True)
            for j, value in enumerate(scores.get("l0_sites", [])):
                self.log(f"val/l0_site{j}", value.float(), sync_dist=True)
            scorer.reset()
        self._log_truth()

    def _log_truth(self) -> None:
        """Each SAE's scores against the world's truth, pooled over the validation epoch. The
        scorers' counts are torchmetrics states, summed across ranks before ``compute``, which
        also runs MCC's Hungarian match: once per epoch, not per batch."""
        for (name, _), scorer in zip(self.named_saes(), self._truth_scorers):
            if scorer.update_count == 0:  # the validation rows came without their truth
                continue
            scores = scorer.compute()
            for key in ("mcc", "uniqueness", "precision", "recall", "f1", "shrinkage"):
                self.log(metric_key(f"val/{key}", name), getattr(scores, key), sync_dist=True)
        self._truth_scorers = []


def _as_scale(value: float | list[float], like: Tensor) -> Tensor:
    """The data's scale (a float, or one per stacked site) in the shape of the buffer ``like``."""
    scale = torch.as_tensor(value, dtype=like.dtype)
    if scale.numel() != like.numel():
        raise ConfigError(f"the data has {scale.numel()} site scales but the SAE expects {like.numel()}")
    return scale.reshape(like.shape)

