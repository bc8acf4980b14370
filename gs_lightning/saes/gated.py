"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gs_lightning.saes.base import SAE


class GatedSAE(SAE):
    """A gate decides which latents fire, a magnitude path how strongly.

    ``pi_gate = x @ W_enc + b_gate``, ``pi_mag = x @ W_mag + b_mag`` with
    ``W_mag = W_enc * exp(r_mag)`` (one shared direction per latent), and
    ``f = H(pi_gate) * relu(pi_mag)``. Loss: MSE, plus lambda * L1 of ``relu(pi_gate)``
    weighted by decoder row norms, plus ``aux``: the reconstruction of ``x`` from
    ``relu(pi_gate)`` through a frozen copy of the decoder, which gives the gate (whose
    step has no gradient) something to learn from without moving the decoder.

    The base class's ``pre`` is here ``x @ W_enc`` before either bias, and the base's
    ``b_enc`` is the paper's ``b_gate`` (exported under that name). Folding an input scale
    into ``W_enc`` scales both paths alike, so the base's folding holds as it is.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        sparsity_coefficient: lambda, the weight of the norm-weighted L1 of ``relu(pi_gate)``.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
    """

    def __init__(self, d_in: int, d_sae: int, sparsity_coefficient: float = 1.0, d_out: int | None = None) -> None:
        # Unit-norm decoder rows, as in peer implementations: left free, rows shrank towards
        # zero in our quickstart (norm 0.002), making their weighted L1 cheap while L0 rose.
        super().__init__(d_in, d_sae, normalize_decoder=True, d_out=d_out)
        self.sparsity_coefficient = sparsity_coefficient
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    @property
    def b_gate(self) -> Tensor:
        """The gate bias (stored as the base's ``b_enc``)."""
        return self.b_enc

    def pre_activation(self, x: Tensor) -> Tensor:
        return x @ self.W_enc

    def pi_gate(self, pre: Tensor) -> Tensor:
        """Gate pre-activations from ``pre = x @ W_enc``."""
        return pre + self.b_gate

    def activation(self, pre: Tensor) -> Tensor:
        pi_mag = pre * self.r_mag.exp() + self.b_mag
        return (self.pi_gate(pre) > 0).to(pre.dtype) * pi_mag.relu()

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        l1 = (self.pi_gate(pre).relu() * self.W_dec.norm(dim=1)).sum(-1).mean()
        return {"l1_penalty": warmup * self.sparsity_coefficient * l1}

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        x_hat_gate = self.pi_gate(pre).relu() @ self.W_dec.detach() + self.b_dec.detach()
        return {"aux": (x_hat_gate - x).pow(2).sum(-1).mean()}

    def canonical_state_dict(self) -> dict[str, Tensor]:
        tensors = super().canonical_state_dict()
        tensors["b_gate"] = tensors.pop("b_enc")
        return tensors

    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        tensors["b_enc"] = tensors.pop("b_gate")
        super().load_canonical_state_dict(tensors)
