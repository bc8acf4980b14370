"""TopK SAE with the AuxK auxiliary loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor

from gs_lightning.saes.base import SAE


class TopKSAE(SAE):
    """``f = TopK(relu(pre))``: the k largest activations of each token; loss MSE + AuxK.

    No sparsity penalty: k fixes L0. AuxK reconstructs the residual ``x - x_hat`` from the
    ``aux_k`` largest pre-activations among *dead* latents (none fired for
    ``dead_steps_threshold`` training steps), which gives them a gradient back to life.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        k: Active latents per token.
        aux_k: Dead latents used by the AuxK reconstruction (Gao et al.: 512).
        aux_coefficient: Weight of the AuxK loss (Gao et al.: 1/32).
        dead_steps_threshold: A latent that has not fired for this many training steps is dead.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
    """

    training_buffers = ("steps_since_fired",)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_k: int = 512,
        aux_coefficient: float = 1 / 32,
        dead_steps_threshold: int = 1000,
        d_out: int | None = None,
    ) -> None:
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        if aux_k < 0 or dead_steps_threshold <= 0:
            raise ValueError(f"aux_k must be >= 0 and dead_steps_threshold > 0, got {aux_k}, {dead_steps_threshold}")
        super().__init__(d_in, d_sae, normalize_decoder=True, d_out=d_out)
        self.k = k
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient
        self.dead_steps_threshold = dead_steps_threshold
        self.register_buffer("steps_since_fired", torch.zeros(d_sae, dtype=torch.long))

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        return {}

    @property
    def dead(self) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired for ``dead_steps_threshold`` steps."""
        return self.steps_since_fired >= self.dead_steps_threshold

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        if not self.training or self.aux_k == 0:
            return {}
        return {"aux_k": self.aux_coefficient * self.aux_k_loss(x, pre, x_hat)}

    def aux_k_loss(self, x: Tensor, pre: Tensor, x_hat: Tensor) -> Tensor:
        """``||e - e_hat||^2`` with ``e = x - x_hat`` (a fixed target) and ``e_hat`` decoded,
        without ``b_dec``, from the top ``aux_k`` dead latents; 0 while none are dead."""
        # min(aux_k, d_sae) keeps the shape static (no host sync on the number dead); live
        # latents are masked to -inf, and relu zeroes any of them topk still picks.
        n = min(self.aux_k, self.d_sae)
        masked = pre.masked_fill(~self.dead, float("-inf"))
        values, indices = masked.topk(n, dim=-1)
        f_aux = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        e = (x - x_hat).detach()
        return (f_aux @ self.W_dec - e).pow(2).sum(-1).mean() * self.dead.any()

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        fired = (f != 0).reshape(-1, self.d_sae).any(0)
        if data_parallel_world() > 1:  # dead means unfired on every rank's share of the batch
            fired = fired.to(torch.int32)
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
            fired = fired.bool()
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)


def data_parallel_world() -> int:
    """Ranks sharing a batch through data parallelism (1 outside torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
