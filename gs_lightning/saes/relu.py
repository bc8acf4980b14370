"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update)."""

from __future__ import annotations

from torch import Tensor

from gs_lightning.saes.base import SAE


class ReLUSAE(SAE):
    """``f = relu(pre)``, loss MSE + lambda * sum_i f_i ||W_dec_i||.

    The decoder is left unconstrained: weighting the L1 term by row norms removes the
    incentive to shrink ``f`` by growing ``W_dec``.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        sparsity_coefficient: lambda, the weight of the norm-weighted L1 term.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        skip_connection: A skip-transcoder (needs ``d_out``): adds ``x @ W_skip`` to the
            reconstruction, ``W_skip`` zero at first (:class:`~gs_lightning.saes.SAE`).
    """

    def __init__(self, d_in: int, d_sae: int, sparsity_coefficient: float = 5.0, d_out: int | None = None,
                 skip_connection: bool = False) -> None:
        super().__init__(d_in, d_sae, normalize_decoder=False, d_out=d_out, skip_connection=skip_connection)
        self.sparsity_coefficient = sparsity_coefficient

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return {"l1_penalty": warmup * self.sparsity_coefficient * l1}
