"""Dead latents, defined once: what "dead" means, how it is counted, and the remedies.

A latent is dead when it has not fired for ``window`` training tokens. Every reader counts
the same way, :func:`count_firing`: per latent a float64 count of the tokens since it last
fired (exact up to 2^53 tokens), advanced by each batch's token count and reset to 0 where
the latent fired; under data parallelism the counts and tokens are the global batch's. The
SAEs' remedies (:class:`DeadLatentTracking`), the training module's ``train/dead_frac``
and its checkpoints all hold that count. Evaluation's ``dead_frac`` and validation's
``val/never_fire_frac`` are the same definition with the window the whole scored set: a
latent that fired on none of its tokens (:mod:`gs_lightning.evaluation.scoring`).

Two terms bring dead latents back:

* the pre-activation loss ``dead_coefficient * mean_b sum_{i dead} relu(t_i - pre_bi)``
  (Anthropic's 2025 form restricted to dead latents, as SAELens does), whose gradient
  reaches the thresholds only unless the caller lets ``pre`` carry one (JumpReLU family);
* AuxK (Gao et al. 2024), :func:`aux_k_loss`: the ``aux_k`` largest pre-activations of
  each token's dead latents (relu'd for the JumpReLU family, signed for the TopK family)
  reconstruct the residual ``target - x_hat`` (held fixed) through their decoders, so they
  learn directions the live latents miss (every TopK and JumpReLU variant).
"""

from __future__ import annotations

import torch
from torch import Tensor


def data_parallel_world() -> int:
    """Ranks sharing a batch through data parallelism (1 outside torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def count_firing(tokens_since_fired: Tensor, counts: Tensor, tokens: Tensor | float) -> None:
    """Advance ``tokens_since_fired`` (float64, ``[..., d_sae]``) in place by one batch of
    ``tokens`` tokens on which latent i fired ``counts[..., i]`` times."""
    tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)


def is_dead(tokens_since_fired: Tensor, window: float) -> Tensor:
    """``[..., d_sae]`` bool: latents that have not fired for ``window`` tokens."""
    return tokens_since_fired >= window


def aux_k_loss(pre_dead: Tensor, decoders: Tensor, residual: Tensor, aux_k: int, relu: bool = True) -> Tensor:
    """AuxK: ``mean_b ||e_b - f_aux_b @ decoders||^2`` where ``f_aux`` keeps the ``aux_k``
    largest of each token's dead pre-activations ``pre_dead [tokens, n]`` and ``e = residual
    [tokens, out]``, the part of the target the live latents miss (detach it).

    ``relu``: the kept values are relu'd (Gao et al.), so a dead latent whose pre-activations
    are all negative gets no gradient; ``False`` keeps their sign (SAELens), which reaches it.
    Columns of live latents may be passed masked to -inf (a static shape); they count as 0."""
    values, chosen = pre_dead.topk(min(aux_k, pre_dead.shape[-1]), dim=-1)
    values = values.relu() if relu else torch.where(values.isfinite(), values, 0.0)
    f_aux = torch.zeros_like(pre_dead).scatter(-1, chosen, values)
    return (f_aux @ decoders - residual).pow(2).sum(-1).mean()


class DeadLatentTracking:
    """Mixin of an :class:`~gs_lightning.saes.SAE` that counts its dead latents.

    The class calls :meth:`init_remedies` (the JumpReLU family) or sets ``aux_k``,
    ``aux_coefficient`` and a window and calls :meth:`init_dead_tracking` (TopK); the JumpReLU
    family also says how to gather its dead latents' pre-activations and decoders
    (:meth:`dead_pre_activation`, :meth:`dead_decoders`)."""

    training_buffers: tuple[str, ...] = ("tokens_since_fired",)
    dead_pull_encoder: bool = False
    """Let the pre-activation loss pull the dead latents' pre-activations up too."""
    dead_coefficient: float = 0.0
    aux_coefficient: float
    aux_k: int
    dead_tokens: int
    tokens_since_fired: Tensor

    def init_dead_tracking(self) -> None:
        """Register the counters ``tokens_since_fired [d_sae]``, zero: none is dead before a window."""
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.float64))

    def init_remedies(self, dead_coefficient: float, aux_coefficient: float, aux_k: int, dead_tokens: int) -> None:
        """Check and set the JumpReLU family's remedy settings, then :meth:`init_dead_tracking`."""
        if min(dead_coefficient, aux_coefficient) < 0:
            raise ValueError("dead_coefficient and aux_coefficient must be >= 0, "
                             f"got {dead_coefficient}, {aux_coefficient}")
        if dead_tokens <= 0 or aux_k <= 0:
            raise ValueError(f"dead_tokens and aux_k must be > 0, got {dead_tokens}, {aux_k}")
        self.dead_coefficient, self.aux_coefficient = dead_coefficient, aux_coefficient
        self.aux_k, self.dead_tokens = aux_k, dead_tokens
        self.init_dead_tracking()

    @property
    def dead_window(self) -> float:
        """Training tokens without firing after which a latent is dead (``dead_tokens``)."""
        return self.dead_tokens

    @property
    def dead(self) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired for :attr:`dead_window` training tokens."""
        return is_dead(self.tokens_since_fired, self.dead_window)

    @property
    def tracks_dead(self) -> bool:
        """Whether a dead-latent remedy is on (and the dead counters are kept)."""
        return self.dead_coefficient > 0 or self.aux_coefficient > 0

    @torch.no_grad()
    def track_firing(self, counts: Tensor, tokens: int) -> None:
        """Advance the counters by one local batch of ``tokens`` tokens (global under data parallelism)."""
        if not self.tracks_dead:
            return
        counts = counts.detach().float()
        world = data_parallel_world()
        if world > 1:  # dead means unfired on every rank's share of the batch
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        count_firing(self.tokens_since_fired, counts, tokens * world)

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
        ``target`` as ``x_hat``, on the gathered dead latents; empty when disabled or out of
        training, zero while no latent is dead."""
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
            decoders = self.dead_decoders(idx).float()
            residual = (target - x_hat).detach().reshape(-1, decoders.shape[-1]).float()
            losses["aux_k"] = self.aux_coefficient * aux_k_loss(pre_dead, decoders, residual, self.aux_k)
        return losses

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        """The remedies on the autograd path (``x`` is the reconstruction target there)."""
        return self.dead_losses(x, x, x_hat, pre)

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        self.track_firing((f != 0).reshape(-1, self.d_sae).sum(0), f.numel() // self.d_sae)
