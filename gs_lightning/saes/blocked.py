"""What the multi-site JumpReLU dictionaries share: latents in blocks, each block's decoder
writing a run of stacked sites.

A cross-layer transcoder and a crosscoder both keep ``W_dec`` as a list of ``[n, sites
written, d_out]`` tensors, one per block of ``n`` latents, and read and write
``[batch, sites, d]`` stacks. Their training recipe is the same: each latent's decoder,
concatenated over the sites it writes, at unit norm; the squared error summed over the
model dimension and the sites, averaged over tokens; the L0 term (or the quadratic
penalty around ``target_l0``) per block of latents, summed over blocks; and the
dead-latent remedies of :mod:`gs_lightning.saes.dead`, a dead latent's decoder spanning
the sites it writes. The variants differ in what each block reads, which the subclasses
define (:attr:`BlockedJumpReLU.blocks`, :meth:`BlockedJumpReLU.block_encoder`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gs_lightning.kernels.functional import step, target_l0_penalty
from gs_lightning.saes.base import SAE
from gs_lightning.saes.dead import DeadLatentTracking


class BlockedJumpReLU(DeadLatentTracking, SAE):
    """Base of :class:`~gs_lightning.saes.CrossLayerTranscoder` and
    :class:`~gs_lightning.saes.Crosscoder`: the decoder constraint, losses and saved form
    of a JumpReLU dictionary whose ``W_dec`` is a ParameterList of ``[n, sites, d_out]``
    blocks and whose ``raw_threshold`` holds every latent's threshold (block-major).

    Subclasses set ``sparsity_coefficient``, ``bandwidth`` and ``target_l0``, call
    ``init_remedies`` (:class:`~gs_lightning.saes.dead.DeadLatentTracking`), and define
    :attr:`blocks` and :meth:`block_encoder`."""

    sparsity_coefficient: float
    bandwidth: float
    target_l0: float | None

    @property
    def blocks(self) -> list[tuple[slice, slice]]:
        """Per block of latents (equal sizes, in latent order): the stacked input sites it
        reads and the output sites its decoder ``W_dec[k]`` writes."""
        raise NotImplementedError

    def block_encoder(self, k: int) -> tuple[Tensor, Tensor]:
        """Block k's encoder ``[sites read, d_in, n]`` and bias ``[n]``."""
        raise NotImplementedError

    @property
    def n_blocks(self) -> int:
        """Blocks of latents: the sparsity term counts L0 per block."""
        return len(self.blocks)

    @property
    def latent_blocks(self) -> int | None:  # type: ignore[override]
        """The blocks, where there is one per input site (validation reports L0 per site)."""
        return self.n_blocks if self.n_blocks == self.stacked_sites else None

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One reconstruction per stacked site: ``(sites, out_width)``."""
        return (self.stacked_sites, self.out_width)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """One scale per site, broadcast over ``[batch, sites, d]``."""
        return (self.stacked_sites, 1)

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per encoder and decoder weight (forward 2, backward 4)."""
        return 6 * sum(p.numel() for name, p in self.named_parameters() if name.startswith(("W_enc", "W_dec")))

    @property
    def threshold(self) -> Tensor:
        """Thresholds, float32, in the shape of ``raw_threshold``."""
        return self.raw_threshold.float()

    def sparsity_terms(self, counts: Tensor, block_l0: Tensor | None, tokens: int, warmup: float) -> dict[str, Tensor]:
        """The weighted L0 term from step-function counts carrying pseudo-derivatives: without
        ``target_l0`` the total of ``counts`` (any shape) over ``tokens`` tokens, with it the
        quadratic penalty on ``block_l0 [tokens, n_blocks]``."""
        if self.target_l0 is None:
            penalty = counts.sum() / tokens
        else:
            penalty = target_l0_penalty(block_l0, self.target_l0).sum(-1).mean()
        return {"l0_penalty": warmup * self.sparsity_coefficient * penalty}

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        s = step(pre.reshape(-1, self.d_sae), self.threshold.flatten(), self.bandwidth)
        block_l0 = s.view(-1, self.n_blocks, self.d_sae // self.n_blocks).sum(-1)  # [tokens, blocks]
        return self.sparsity_terms(block_l0, block_l0, block_l0.shape[0], warmup)

    # -- dead latents (the remedies themselves are DeadLatentTracking's) ----------------

    def _dead_groups(self, idx: Tensor) -> list[tuple[int, Tensor]]:
        """``(block, indices within it)`` of the sorted latents ``idx``, blocks in latent order."""
        n = self.d_sae // self.n_blocks
        groups = [(k, idx[(idx >= k * n) & (idx < (k + 1) * n)] - k * n) for k in range(self.n_blocks)]
        return [(k, i) for k, i in groups if i.numel()]

    def dead_pre_activation(self, x: Tensor, idx: Tensor) -> Tensor:
        """Each dead latent reads what its block reads from ``x [tokens, sites, d_in]``."""
        parts = []
        for k, i in self._dead_groups(idx):
            W, b = self.block_encoder(k)
            parts.append(torch.einsum("tsd,sdn->tn", x[:, self.blocks[k][0]], W[..., i]) + b[i])
        return torch.cat(parts, -1)

    def dead_decoders(self, idx: Tensor) -> Tensor:
        """Each dead latent's decoder over every output site, zero where it does not write."""
        sites = self.out_shape[0]
        return torch.cat([F.pad(self.W_dec[k][i], (0, 0, self.blocks[k][1].start, sites - self.blocks[k][1].stop))
                          for k, i in self._dead_groups(idx)]).flatten(1)

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
        tensors = {k: v.detach() for k, v in self.state_dict().items()
                   if k != "raw_threshold" and k not in self.training_buffers}
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
