"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs")."""

from __future__ import annotations

from torch import Tensor

from gs_lightning.saes.batchtopk import BatchTopKSAE


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose loss also asks each nested prefix of the dictionary to reconstruct alone.

    For each ``m`` in ``prefixes`` the term ``mse_prefix_<m>`` is the reconstruction error of
    latents ``[0, m)`` only; ``mse`` is the full dictionary's. Early latents thus learn
    general features that later ones refine, instead of being absorbed by them.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        k: Mean active latents per token.
        prefixes: Increasing prefix sizes, each below ``d_sae`` (the full dictionary is ``mse``).
        aux_k: Dead latents used by the AuxK reconstruction.
        aux_coefficient: Weight of the AuxK loss.
        dead_steps_threshold: A latent that has not fired for this many training steps is dead.
        threshold_decay: Decay of the moving average that estimates the inference threshold.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        encoder_init_scale: Norm of the encoder columns at initialisation (as in :class:`TopKSAE`).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        prefixes: list[int],
        aux_k: int = 512,
        aux_coefficient: float = 0.25,
        dead_steps_threshold: int = 100,
        threshold_decay: float = 0.99,
        d_out: int | None = None,
        encoder_init_scale: float | None = None,
    ) -> None:
        prefixes = [int(m) for m in prefixes]
        if not prefixes or prefixes != sorted(set(prefixes)) or not 0 < prefixes[0] or prefixes[-1] >= d_sae:
            raise ValueError(f"prefixes must increase strictly within 1..d_sae-1={d_sae - 1}, got {prefixes}")
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, dead_steps_threshold, threshold_decay, d_out,
                         encoder_init_scale)
        self.prefixes = prefixes

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        losses = {}
        # Grow the reconstruction one group of latents at a time: each prefix costs one
        # [batch, group] @ [group, d_in] product.
        partial, start = self.b_dec, 0
        for m in self.prefixes:
            partial = partial + f[..., start:m] @ self.W_dec[start:m]
            losses[f"mse_prefix_{m}"] = (partial - x).pow(2).sum(-1).mean()
            start = m
        return {**losses, **super().auxiliary_losses(x, pre, f, x_hat, warmup)}
