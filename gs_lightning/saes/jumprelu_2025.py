"""JumpReLU with Anthropic's 2025 training losses ("Dictionary learning optimization techniques",
Transformer Circuits, January 2025)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from gs_lightning.kernels.functional import jumprelu_st
from gs_lightning.saes.jumprelu import JumpReLUSAE


class JumpReLU2025SAE(JumpReLUSAE):
    """JumpReLU trained with a tanh sparsity penalty and a pre-activation loss.

    Loss: MSE + ``lambda * sum_i tanh(c * f_i * ||W_dec_i||)`` (a smooth, saturating
    stand-in for L0) + ``lambda_p * sum_i relu(threshold_i - pre_i) * ||W_dec_i||`` (pulls
    latents that never reach their threshold back towards it, against dead latents). The
    JumpReLU passes its pseudo-derivative straight through to ``pre`` as well
    (:func:`~gs_lightning.kernels.functional.jumprelu_st`). The decoder is unconstrained, its norms
    weighting both penalties. The recipe warms lambda up over the whole run
    (``sparsity_warmup_steps = max_steps``) and decays the lr over the last 20%
    (``lr_decay_fraction: 0.2``). No fused path.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        sparsity_coefficient: lambda, the weight of the tanh penalty (at the end of warm-up).
        pre_act_coefficient: lambda_p, the weight of the pre-activation loss (not warmed up).
        tanh_scale: c inside the tanh.
        bandwidth: eps, the width of the rectangle kernel of the pseudo-derivatives.
        threshold_init: Initial threshold of every latent.
        threshold_parameterization: ``log`` trains log(threshold); ``raw`` the threshold, clamped at >= 0.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        skip_connection: A skip-transcoder (needs ``d_out``): adds ``x @ W_skip`` to the
            reconstruction, ``W_skip`` zero at first (:class:`~gs_lightning.saes.SAE`).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        sparsity_coefficient: float = 1e-3,
        pre_act_coefficient: float = 3e-6,
        tanh_scale: float = 4.0,
        bandwidth: float = 2.0,
        threshold_init: float = 0.1,
        threshold_parameterization: Literal["log", "raw"] = "log",
        d_out: int | None = None,
        skip_connection: bool = False,
    ) -> None:
        # Unit encoder columns at init, as this variant has always had (its scale is
        # unmeasured here); the dead-latent remedies stay off (it has its own pre-act loss).
        super().__init__(d_in, d_sae, sparsity_coefficient, bandwidth, threshold_init, threshold_parameterization,
                         encoder_init_scale=1.0, aux_coefficient=0.0, dead_coefficient=0.0,
                         fused=False, d_out=d_out, skip_connection=skip_connection, normalize_decoder=False,
                         decoder_init_norm=1.0, bias_lr_scale=1.0, normalize_gradient=False,
                         subtract_decoder_bias=False)
        self.pre_act_coefficient = pre_act_coefficient
        self.tanh_scale = tanh_scale

    def activation(self, pre: Tensor) -> Tensor:
        return jumprelu_st(pre, self.threshold, self.bandwidth)

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        norms = self.W_dec.norm(dim=1)
        tanh = (self.tanh_scale * f * norms).tanh().sum(-1).mean()
        pre_act = ((self.threshold - pre).relu() * norms).sum(-1).mean()
        return {
            "tanh_penalty": warmup * self.sparsity_coefficient * tanh,
            "pre_act": self.pre_act_coefficient * pre_act,
        }
