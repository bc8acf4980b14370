"""JumpReLU SAE as trained for Gemma Scope (Rajamanoharan et al. 2024; Lieberum et al. 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from gs_lightning.functional import jumprelu, step
from gs_lightning.fused import Workspace, fused_jumprelu_loss
from gs_lightning.saes.base import SAE, TrainOutput


class JumpReLUSAE(SAE):
    """JumpReLU SAE: ``f = pre * H(pre - threshold)``, loss MSE + lambda * L0.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        sparsity_coefficient: lambda, the weight of the L0 term (at the end of warm-up).
            Its scale depends on the input scaling scheme; Gemma Scope sweeps it per site.
        bandwidth: eps, the width of the rectangle kernel of the pseudo-derivatives.
        threshold_init: Initial threshold of every latent.
        threshold_parameterization: ``log`` trains log(threshold) as the paper does;
            ``raw`` trains the threshold itself, clamped at >= 0 (moves faster on short runs).
        fused: Use the fused forward/backward step while training (same numbers, less
            memory traffic); falls back to autograd when gradients to the input are needed.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        sparsity_coefficient: float = 1e-3,
        bandwidth: float = 0.001,
        threshold_init: float = 0.001,
        threshold_parameterization: Literal["log", "raw"] = "log",
        fused: bool = True,
        d_out: int | None = None,
    ) -> None:
        if threshold_parameterization not in ("log", "raw"):
            raise ValueError(f"threshold_parameterization must be 'log' or 'raw', not {threshold_parameterization!r}")
        if bandwidth <= 0 or threshold_init <= 0:
            raise ValueError(f"bandwidth and threshold_init must be > 0, got {bandwidth}, {threshold_init}")
        super().__init__(d_in, d_sae, normalize_decoder=True, d_out=d_out)
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
        self.threshold_init = threshold_init
        self.threshold_parameterization = threshold_parameterization
        self.fused = fused
        init = torch.full((d_sae,), threshold_init, dtype=torch.float32)
        if threshold_parameterization == "log":
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.raw_threshold = nn.Parameter(init)
        self._workspace = Workspace()

    @property
    def threshold(self) -> Tensor:
        """Per-latent threshold, float32, differentiable w.r.t. its parameter."""
        if self.threshold_parameterization == "log":
            return self.log_threshold.float().exp()
        return self.raw_threshold.float()

    def activation(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        l0 = step(pre, self.threshold, self.bandwidth).sum(-1).mean()
        return {"l0_penalty": warmup * self.sparsity_coefficient * l0}

    def uses_fused(self, x: Tensor) -> bool:
        """Whether a training step on ``x`` takes the fused path (it cannot give ``x`` a gradient)."""
        return self.fused and self.training and torch.is_grad_enabled() and not x.requires_grad and x.dim() == 2

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the fused step's GEMMs run in: autocast's when enabled, else the weights'."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.W_enc.dtype

    def training_output(self, x: Tensor, warmup: float = 1.0, target: Tensor | None = None) -> TrainOutput:
        if not self.uses_fused(x):
            return super().training_output(x, warmup, target)
        mse, l0, x_hat, counts = fused_jumprelu_loss(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.bandwidth, self._workspace,
            self.compute_dtype(x), target,
        )
        losses = {"mse": mse, "l0_penalty": warmup * self.sparsity_coefficient * l0}
        return TrainOutput(x_hat, losses, l0.detach(), counts)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.threshold_parameterization == "raw":
            self.raw_threshold.clamp_(min=0.0)

    def train(self, mode: bool = True) -> "JumpReLUSAE":
        if not mode:
            self._workspace.clear()  # give the [batch, d_sae] buffers back while evaluating
        return super().train(mode)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        tensors = {k: self.state_dict()[k].detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors["threshold"] = self.threshold.detach().clone()
        return tensors

    @torch.no_grad()
    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold").float()
        if self.threshold_parameterization == "log":
            # log(0) would be -inf: a latent with threshold 0 gets the smallest normal float.
            tensors["log_threshold"] = threshold.clamp(min=torch.finfo(torch.float32).tiny).log()
        else:
            tensors["raw_threshold"] = threshold
        self.load_state_dict(tensors, strict=True)


