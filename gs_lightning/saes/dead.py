"""The dead-latent remedies of the JumpReLU dictionaries, in one place.

A latent that has not fired for ``dead_tokens`` training tokens is dead. Two terms bring
dead latents back (see :class:`~gs_lightning.saes.JumpReLUSAE` for their measured effect):

* the pre-activation loss ``dead_coefficient * mean_b sum_{i dead} relu(t_i - pre_bi)``
  (Anthropic's 2025 form restricted to dead latents, as SAELens does), whose gradient
  reaches the thresholds only unless the caller lets ``pre`` carry one;
* AuxK (Gao et al. 2024): the ``aux_k`` largest ``relu(pre)`` of each token's dead latents
  reconstruct the residual ``target - x_hat`` (held fixed) through their decoders, so they
  learn directions the live latents miss.

:class:`DeadLatentTracking` keeps the counters (a float64 buffer, global under data
parallelism) and computes both terms from the dead latents' pre-activations and decoders,
which each variant gathers its own way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gs_lightning.saes.topk import data_parallel_world


class DeadLatentTracking:
    """Mixin of an :class:`~gs_lightning.saes.SAE` with the dead-latent remedies.

    The class sets ``dead_coefficient``, ``aux_coefficient``, ``aux_k`` and ``dead_tokens``,
    registers the float64 buffer ``tokens_since_fired [d_sae]`` (see :func:`check_remedies`)
    and says how to gather its dead latents' pre-activations and decoders
    (:meth:`dead_pre_activation`, :meth:`dead_decoders`)."""

    training_buffers: tuple[str, ...] = ("tokens_since_fired",)
    dead_pull_encoder: bool = False
    """Let the pre-activation loss pull the dead latents' pre-activations up too."""
    dead_coefficient: float
    aux_coefficient: float
    aux_k: int
    dead_tokens: int
    tokens_since_fired: Tensor

    @property
    def dead(self) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @property
    def tracks_dead(self) -> bool:
        """Whether a dead-latent remedy is on (and the dead counters are kept)."""
        return self.dead_coefficient > 0 or self.aux_coefficient > 0

    @torch.no_grad()
    def track_firing(self, counts: Tensor, tokens: int) -> None:
        """Advance the dead-latent counters by one batch (global under data parallelism)."""
        if not self.tracks_dead:
            return
        counts = counts.detach().float()
        world = data_parallel_world()
        if world > 1:  # dead means unfired on every rank's share of the batch
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        self.tokens_since_fired.add_(tokens * world).masked_fill_(counts > 0, 0)

    def remedy_names(self) -> list[str]:
        """The loss terms the remedies add, in order (zero while no latent is dead)."""
        return [n for n, c in (("dead_pre_act", self.dead_coefficient), ("aux_k", self.aux_coefficient)) if c > 0]

    def dead_pre_activation(self, x: Tensor, idx: Tensor) -> Tensor:
        """``[tokens, n_dead]``: the pre-activations of latents ``idx`` on inputs ``x``."""
        raise NotImplementedError

    def dead_decoders(self, idx: Tensor) -> Tensor:
        """``[n_dead, out]``: the decoders of latents ``idx``, flattened like a token's reconstruction."""
        raise NotImplementedError

    def dead_losses(self, x: Tensor, target: Tensor, x_hat: Tensor, pre: Tensor | None = None) -> dict[str, Tensor]:
        """Both remedies for inputs ``x`` (or their pre-activations ``pre``) reconstructing
        ``target`` as ``x_hat``; empty when disabled or out of training, zero while no
        latent is dead."""
        if not self.tracks_dead or not self.training:
            return {}
        idx = self.dead.nonzero().squeeze(-1)  # one host sync; the set is usually small
        if idx.numel() == 0:
            return {name: x_hat.new_zeros((), dtype=torch.float32) for name in self.remedy_names()}
        # Only the dead columns: a [tokens, n_dead] product, not another [tokens, d_sae] pass
        # (and no graph for it when no term sends a gradient through pre).
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.aux_coefficient > 0 or self.dead_pull_encoder)):
            pre_dead = (self.dead_pre_activation(x, idx) if pre is None
                        else pre.reshape(-1, self.d_sae)[:, idx]).float()
        losses = {}
        if self.dead_coefficient > 0:
            # Held fixed (unless dead_pull_encoder), pre leaves the dead latents' directions to
            # AuxK; only their thresholds come down.
            t = self.threshold.flatten()[idx]
            gap = (t - (pre_dead if self.dead_pull_encoder else pre_dead.detach())).relu()
            losses["dead_pre_act"] = self.dead_coefficient * gap.sum(-1).mean()
        if self.aux_coefficient > 0:
            values, chosen = pre_dead.topk(min(self.aux_k, idx.numel()), dim=-1)
            f_aux = torch.zeros_like(pre_dead).scatter(-1, chosen, values.relu())
            decoders = self.dead_decoders(idx).float()
            residual = (target - x_hat).detach().reshape(-1, decoders.shape[-1]).float()
            losses["aux_k"] = self.aux_coefficient * (f_aux @ decoders - residual).pow(2).sum(-1).mean()
        return losses

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        """The remedies on the autograd path (``x`` is the reconstruction target there)."""
        return self.dead_losses(x, x, x_hat, pre)

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        self.track_firing((f != 0).reshape(-1, self.d_sae).sum(0), f.numel() // self.d_sae)

def check_remedies(dead_coefficient: float, aux_coefficient: float, aux_k: int, dead_tokens: int) -> None:
    """Raise ValueError, naming the values, unless the remedies' settings are valid."""
    if min(dead_coefficient, aux_coefficient) < 0:
        raise ValueError(f"dead_coefficient and aux_coefficient must be >= 0, got {dead_coefficient}, {aux_coefficient}")
    if dead_tokens <= 0 or aux_k <= 0:
        raise ValueError(f"dead_tokens and aux_k must be > 0, got {dead_tokens}, {aux_k}")
