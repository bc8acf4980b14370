"""What the multi-site JumpReLU dictionaries share: latents in blocks, each block's decoder
writing a run of stacked sites.

A cross-layer transcoder and a crosscoder both keep ``W_dec`` as a list of ``[n, sites
written, d_out]`` tensors, one per block of ``n`` latents, and read and write
``[batch, sites, d]`` stacks. Their training recipe is the same: each latent's decoder,
concatenated over the sites it writes, at unit norm; the squared error summed over the
model dimension and the sites, averaged over tokens; and the L0 term (or the quadratic
penalty around ``target_l0``) per block of latents, summed over blocks. The variants
differ in what each block reads, which the subclasses define.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gs_lightning.functional import step
from gs_lightning.saes.base import SAE


class BlockedJumpReLU(SAE):
    """Base of :class:`~gs_lightning.saes.CrossLayerTranscoder` and
    :class:`~gs_lightning.saes.Crosscoder`: the decoder constraint, losses and saved form
    of a JumpReLU dictionary whose ``W_dec`` is a ParameterList of ``[n, sites, d_out]``
    blocks and whose ``raw_threshold`` holds every latent's threshold (block-major).

    Subclasses set ``sparsity_coefficient``, ``bandwidth`` and ``target_l0`` and define
    ``n_blocks`` (the blocks the sparsity term counts L0 over)."""

    sparsity_coefficient: float
    bandwidth: float
    target_l0: float | None

    @property
    def n_blocks(self) -> int:
        """Blocks of latents the sparsity term counts separately."""
        raise NotImplementedError

    @property
    def threshold(self) -> Tensor:
        """Thresholds, float32, in the shape of ``raw_threshold``."""
        return self.raw_threshold.float()

    def block_penalty(self, block_l0: Tensor) -> Tensor:
        """The unweighted sparsity term from ``[tokens, blocks]`` (pseudo-differentiable) L0s:
        ``mean_b sum_k l0_bk``, or with ``target_l0`` ``mean_b sum_k (2 / T) (l0_bk - T)^2``."""
        if self.target_l0 is None:
            return block_l0.sum(-1).mean()
        T = float(self.target_l0)
        return ((2.0 / T) * (block_l0 - T).pow(2)).sum(-1).mean()

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        s = step(pre.reshape(-1, self.d_sae), self.threshold.flatten(), self.bandwidth)
        block_l0 = s.view(-1, self.n_blocks, self.d_sae // self.n_blocks).sum(-1)  # [tokens, blocks]
        return {"l0_penalty": warmup * self.sparsity_coefficient * self.block_penalty(block_l0)}

    def reconstruction_losses(self, x: Tensor, target: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """``mse``: squared error summed over the model dimension and the sites, mean over tokens."""
        return {"mse": (x_hat - target).pow(2).sum((-2, -1)).mean()}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each latent's (concatenated) decoder."""
        for W in self.W_dec:
            if W.grad is not None:
                w = W.flatten(1) / W.flatten(1).norm(dim=1, keepdim=True)
                g = W.grad.view(W.shape[0], -1)
                g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise each latent's decoder to unit norm; clamp thresholds at >= 0."""
        for W in self.W_dec:
            W.div_(W.flatten(1).norm(dim=1).view(-1, 1, 1))
        self.raw_threshold.clamp_(min=0.0)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The parameters under their names, ``raw_threshold`` as ``threshold``."""
        tensors = {k: v.detach() for k, v in self.state_dict().items() if k != "raw_threshold"}
        tensors["threshold"] = self.threshold.detach().clone()
        return tensors

    @torch.no_grad()
    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        tensors["raw_threshold"] = tensors.pop("threshold").float()
        super().load_canonical_state_dict(tensors)


def per_site(scale: float | list[float] | Tensor, n_sites: int, like: Tensor) -> Tensor:
    """A scale given as one float or one per site, as ``[n_sites]`` in ``like``'s dtype and device."""
    t = torch.as_tensor(scale, dtype=like.dtype, device=like.device).flatten()
    return t.expand(n_sites) if t.numel() == 1 else t
