"""JumpReLU maths: the Heaviside step and JumpReLU with rectangle-kernel pseudo-derivatives.

Definitions (Rajamanoharan et al. 2024, as used by Gemma Scope), with ``t`` the
threshold, ``eps`` the bandwidth and ``K(u) = 1[|u| < 1/2]`` the rectangle kernel:

* ``jumprelu(pre, t) = pre * H(pre - t)``;
  d/dpre = ``H(pre - t) * g`` (no straight-through), d/dt = ``-(t/eps) K((pre-t)/eps) g``.
* ``step(pre, t) = H(pre - t)``;
  d/dpre = 0, d/dt = ``-(1/eps) K((pre-t)/eps) g``.
* ``jumprelu_st(pre, t)`` (Anthropic's 2025 recipe): the same forward and d/dt as
  ``jumprelu``, and the jump's pseudo-derivative passed straight through to the input too:
  d/dpre = ``(H(pre - t) + (t/eps) K((pre-t)/eps)) g``.

The threshold gradient is summed over every leading (batch) dimension. All comparisons
and threshold gradients are computed in float32 whatever the dtype of ``pre`` (bf16
would round small threshold updates away), and returned in the threshold's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``K(u) = 1[|u| < 1/2]`` as a float tensor."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to_threshold(grad: Tensor, threshold: Tensor) -> Tensor:
    """Sum a ``[..., d_sae]`` gradient over its leading dims into the threshold's shape."""
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(threshold.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``pre * H(pre - threshold)`` with the pseudo-derivative w.r.t. the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre.float() > threshold.float()).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        pre32, t32 = pre.float(), threshold.float()
        grad_pre = grad_out * (pre32 > t32).to(grad_out.dtype)
        kernel = rectangle((pre32 - t32) / eps)
        grad_t = _sum_to_threshold(-(t32 / eps) * kernel * grad_out.float(), threshold)
        return grad_pre, grad_t, None


class StepFunction(torch.autograd.Function):
    """``H(pre - threshold)`` with the pseudo-derivative w.r.t. the threshold only."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre.float() > threshold.float()).float()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor | None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = rectangle((pre.float() - threshold.float()) / eps)
        grad_t = _sum_to_threshold(-(1.0 / eps) * kernel * grad_out.float(), threshold)
        # The step has no gradient w.r.t. its input: the L0 term never moves W_enc/b_enc.
        return None, grad_t, None


class JumpReLUStraightThroughFunction(JumpReLUFunction):
    """JumpReLU's forward, with the jump's pseudo-derivative w.r.t. both inputs."""

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        pre32, t32 = pre.float(), threshold.float()
        # The jump t * H(pre - t) has derivative t * delta(pre - t) in pre and the opposite in t.
        jump = (t32 / eps) * rectangle((pre32 - t32) / eps) * grad_out.float()
        grad_pre = (grad_out.float() * (pre32 > t32).float() + jump).to(grad_out.dtype)
        return grad_pre, _sum_to_threshold(-jump, threshold), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU activation with rectangle-kernel pseudo-derivatives (see module docstring)."""
    return JumpReLUFunction.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step ``H(pre - threshold)`` in float32, with the threshold pseudo-derivative."""
    return StepFunction.apply(pre, threshold, bandwidth)


def jumprelu_st(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU whose pseudo-derivative also reaches ``pre`` (see module docstring)."""
    return JumpReLUStraightThroughFunction.apply(pre, threshold, bandwidth)


def target_l0_penalty(l0: Tensor, target: float) -> Tensor:
    """Gemma Scope 2's quadratic penalty around a target L0 ``T``, elementwise:
    ``(2 / T) (l0 - T)^2`` (SAELens' ``quadratic`` form); callers average it over tokens
    (and sum it over blocks of latents)."""
    T = float(target)
    return (2.0 / T) * (l0 - T).pow(2)
