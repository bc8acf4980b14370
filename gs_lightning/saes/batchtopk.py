"""BatchTopK SAE (Bussmann et al. 2024): top k*B activations over the batch, a JumpReLU at inference."""

from __future__ import annotations

import torch
from torch import Tensor

from gs_lightning.saes.dead import data_parallel_world
from gs_lightning.saes.topk import DEAD_TOKENS, TopKSAE


class BatchTopKSAE(TopKSAE):
    """Keeps the ``k * B`` largest activations of a batch of ``B`` tokens, k per token on average.

    While training it also tracks a global threshold: an exponential moving average of the
    smallest activation kept in each batch. Out of training mode (``sae.eval()``) the SAE is
    a JumpReLU with that threshold, so a token's latents no longer depend on its batch, and
    it exports as a JumpReLU (a per-latent ``threshold`` filled with the estimate). AuxK
    works as in :class:`TopKSAE`.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        k: Mean active latents per token.
        aux_k: Dead latents used by the AuxK reconstruction; ``None``: half the reconstruction's
            width (as in :class:`TopKSAE`).
        aux_coefficient: Weight of the AuxK loss.
        dead_tokens: A latent that has not fired for this many training tokens is dead (as in :class:`TopKSAE`).
        threshold_decay: Decay of the moving average that estimates the inference threshold.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        encoder_init_scale: Norm of the encoder columns at initialisation (as in :class:`TopKSAE`).
        skip_connection: A skip-transcoder (needs ``d_out``): adds ``x @ W_skip`` to the
            reconstruction, ``W_skip`` zero at first (:class:`~gs_lightning.saes.SAE`).
        dead_steps_threshold: The window in training steps instead (as in :class:`TopKSAE`).
        subtract_decoder_bias: Encode ``x - b_dec`` (as in :class:`TopKSAE`).
        bias_lr_scale: Learning-rate multiplier of the biases (as in :class:`TopKSAE`).
        normalize_gradient: Rescale the gradient to unit norm before each step (as in :class:`TopKSAE`).
        normalize_decoder: Hold decoder rows at unit norm; ``False``: free rows read as
            normalised (as in :class:`TopKSAE`).
        decoder_init_norm: Norm of free decoder rows at initialisation (as in :class:`TopKSAE`).
        aux_relu: AuxK on the positive dead pre-activations only (as in :class:`TopKSAE`).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_k: int | None = None,
        aux_coefficient: float = 1.0,
        dead_tokens: int = DEAD_TOKENS,
        threshold_decay: float = 0.99,
        d_out: int | None = None,
        encoder_init_scale: float | None = None,
        skip_connection: bool = False,
        dead_steps_threshold: int | None = None,
        subtract_decoder_bias: bool | None = None,
        bias_lr_scale: float | None = None,
        normalize_gradient: bool = True,
        normalize_decoder: bool | None = None,
        decoder_init_norm: float = 0.1,
        aux_relu: bool = False,
    ) -> None:
        if not 0 <= threshold_decay < 1:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, dead_tokens, d_out, encoder_init_scale,
                         skip_connection, dead_steps_threshold, subtract_decoder_bias, bias_lr_scale,
                         normalize_gradient, normalize_decoder, decoder_init_norm, aux_relu)
        self.threshold_decay = threshold_decay
        # -1 marks "no batch seen yet"; float32 like every threshold (docs/guide/variants.md, dead latents).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre: Tensor) -> Tensor:
        if not self.training:
            # Before any training batch there is no estimate: behave as a ReLU.
            return pre * (pre.float() > self.threshold.clamp(min=0.0)).to(pre.dtype)
        world = data_parallel_world()
        if world > 1:
            return self._global_batch_topk(pre.relu(), world)
        flat = pre.relu().flatten()
        values, indices = flat.topk(min(self.k * flat.numel() // self.d_sae, flat.numel()))
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)

    def _global_batch_topk(self, relu: Tensor, world: int) -> Tensor:
        """Top ``k * B`` over the *global* batch of ``world`` data-parallel ranks (equal
        local batches): each rank offers its own largest candidates, every rank finds the
        same cut-off value, and keeps its activations at or above it."""
        flat = relu.flatten()
        total = self.k * (flat.numel() // self.d_sae) * world
        with torch.no_grad():
            local = flat.topk(min(total, flat.numel())).values.contiguous()
            gathered = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(gathered, local)
            cut = torch.cat(gathered).topk(min(total, local.numel() * world)).values[-1]
        return relu * (relu >= cut).to(relu.dtype)

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        super().update_statistics(pre, f)
        kept = f[f > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().float()
        # First batch: take its value; afterwards a moving average (no host sync either way).
        updated = torch.lerp(smallest, self.threshold, self.threshold_decay)
        self.threshold.copy_(torch.where(self.threshold < 0, smallest, updated))

    def canonical_state_dict(self) -> dict[str, Tensor]:
        tensors = super().canonical_state_dict()
        tensors["threshold"] = self.threshold.clamp(min=0.0).expand(self.d_sae).clone()
        return tensors

    @torch.no_grad()
    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold").float()
        if not torch.all(threshold == threshold[0]):
            raise RuntimeError("BatchTopKSAE loads one global threshold; the saved thresholds differ per latent")
        tensors["threshold"] = threshold[0].clone()
        super().load_canonical_state_dict(tensors)

