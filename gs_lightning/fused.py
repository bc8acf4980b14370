"""A fused JumpReLU training step: MSE and L0 losses with hand-written backward.

Autograd over a JumpReLU SAE allocates half a dozen ``[batch, d_sae]`` tensors per step
(268 MB each at B=4096, d_sae=16384). glibc serves every allocation above its mmap
threshold with a fresh ``mmap`` and returns it with ``munmap``, so the step pays page
faults on every one of them, and element-wise work and copies end up costing more than the
matmuls (DESIGN.md section 5). This function computes exactly the same losses and
gradients as :mod:`gs_lightning.functional` does through autograd, but with five GEMMs,
a handful of element-wise passes and ``[batch, d_sae]`` buffers that live across steps
in a :class:`Workspace`.

Gradients (``err = x_hat - x``, ``g = 2 err / B``, ``mask = pre > t``,
``near = |pre - t| < eps/2``, ``lam`` the upstream gradient of the L0 output):

* ``dW_dec = f^T g``, ``db_dec = sum_b g``, ``g_f = g W_dec^T``
* ``dt = -(t/eps) sum_b(near * g_f) - (lam/(B eps)) sum_b(near)``
* ``g_pre = mask * g_f``, ``dW_enc = x^T g_pre``, ``db_enc = sum_b g_pre``
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Named buffers reused from step to step, reallocated only when a shape changes.

    ``generation`` counts forward passes, so a backward can tell that a later forward
    has overwritten the buffers it needs.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self.generation = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the buffer ``name`` with this shape, dtype and device (uninitialised)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free the old one before allocating the new one
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()


class FusedJumpReLULoss(torch.autograd.Function):
    """Returns ``(mse, l0, x_hat, fire_counts)`` for a JumpReLU SAE on a batch ``x``.

    ``mse`` is ``||x - x_hat||^2`` summed over the model dimension and averaged over the
    batch; ``l0`` the mean number of active latents per token (with the step function's
    pseudo-derivative). ``x_hat`` (float32) and ``fire_counts`` (``[d_sae]`` float32, tokens
    on which each latent fired) carry no gradient. GEMMs run in ``compute_dtype``;
    threshold comparisons and the threshold gradient in float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: float,
        workspace: Workspace,
        compute_dtype: torch.dtype,
        target: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit here
            B, S, cd, dev = x.shape[0], W_enc.shape[1], compute_dtype, x.device
            xc = x.to(cd)
            pre = workspace.get("pre", (B, S), cd, dev)
            torch.addmm(b_enc.to(cd), xc, W_enc.to(cd), out=pre)
            t = threshold.float()
            # Masks are stored as 0/1 in the compute dtype, not bool: multiplying or
            # summing a bool tensor first converts it to a full float/int64 copy (10x slower).
            mask = workspace.get("mask", (B, S), cd, dev)
            torch.gt(pre, t, out=mask)
            near = workspace.get("near", (B, S), cd, dev)
            upper = workspace.get("g_f", (B, S), cd, dev)  # free until the backward
            torch.gt(pre, t - bandwidth / 2, out=near)
            torch.lt(pre, t + bandwidth / 2, out=upper)
            near.mul_(upper)
            fire_counts = mask.sum(0, dtype=torch.float32)
            l0 = fire_counts.sum() / B
            f = pre.mul_(mask)  # the pre-activation buffer now holds f
            x_hat = torch.addmm(b_dec.to(cd), f, W_dec.to(cd)).float()
            # A transcoder reconstructs another site's activations of the same tokens.
            err = x_hat - (x if target is None else target).float()
            mse = err.pow(2).sum() / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.bandwidth, ctx.compute_dtype = workspace, bandwidth, cd
        ctx.save_for_backward(x, W_enc, W_dec, threshold, err)
        ctx.mark_non_differentiable(x_hat, fire_counts)
        return mse, l0, x_hat, fire_counts

    @staticmethod
    def backward(ctx, grad_mse: Tensor, grad_l0: Tensor, *_: Tensor):  # type: ignore[override]
        ws: Workspace = ctx.workspace
        if ws.generation != ctx.generation:
            raise RuntimeError(
                "fused JumpReLU step: another forward pass reused the workspace before this "
                "backward ran; call backward after each forward, or set fused: false"
            )
        x, W_enc, W_dec, threshold, err = ctx.saved_tensors
        B, S, cd, dev, eps = x.shape[0], W_enc.shape[1], ctx.compute_dtype, x.device, ctx.bandwidth
        f = ws.get("pre", (B, S), cd, dev)
        mask = ws.get("mask", (B, S), cd, dev)
        near = ws.get("near", (B, S), cd, dev)
        g = (err * (2.0 * grad_mse / B)).to(cd)
        grad_b_dec = g.float().sum(0)
        grad_W_dec = torch.mm(f.t(), g)
        g_f = ws.get("g_f", (B, S), cd, dev)
        torch.mm(g, W_dec.to(cd).t(), out=g_f)
        # f is no longer needed: reuse its buffer for near * g_f.
        near_g = torch.mul(g_f, near, out=f).sum(0, dtype=torch.float32)
        near_count = near.sum(0, dtype=torch.float32)
        t = threshold.float()
        grad_t = -(t / eps) * near_g - (grad_l0.float() / (B * eps)) * near_count
        g_pre = g_f.mul_(mask)
        grad_b_enc = g_pre.sum(0, dtype=torch.float32)
        grad_W_enc = torch.mm(x.to(cd).t(), g_pre)
        return (
            None,
            grad_W_enc.to(W_enc.dtype),
            grad_b_enc.to(W_enc.dtype),
            grad_W_dec.to(W_dec.dtype),
            grad_b_dec.to(W_dec.dtype),
            grad_t.to(threshold.dtype),
            None,
            None,
            None,
            None,
        )


def fused_jumprelu_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    workspace: Workspace,
    compute_dtype: torch.dtype | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedJumpReLULoss` (see its docstring)."""
    return FusedJumpReLULoss.apply(
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, workspace, compute_dtype or W_enc.dtype, target
    )


class FusedPackedJumpReLULoss(torch.autograd.Function):
    """:class:`FusedJumpReLULoss` for K JumpReLU SAEs of one shape reading the same batch.

    Weights carry a leading K dimension (``W_enc [K, d, S]``, ``b_enc [K, S]``,
    ``W_dec [K, S, d]``, ``b_dec [K, d]``, ``threshold [K, S]``, ``bandwidth [K]``);
    ``x [B, d]`` is shared. Returns ``mse [K]``, ``l0 [K]``, ``x_hat [K, B, d]`` and
    ``fire_counts [K, S]``, member k's numbers being exactly what the single fused step
    returns for SAE k. The ``[K, B, S]`` buffers live in the :class:`Workspace` as the single
    step's do; element-wise passes and reductions run once over all K, and each GEMM is the
    single step's GEMM, written into member k's slice (on CPU, ``torch.bmm`` at these shapes
    runs 1.3-1.5x slower than K ``mm`` calls).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: Tensor,
        workspace: Workspace,
        compute_dtype: torch.dtype,
        target: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit here
            (K, _, S), B, cd, dev = W_enc.shape, x.shape[0], compute_dtype, x.device
            xc = x.to(cd)
            pre = workspace.get("pre", (K, B, S), cd, dev)
            W_enc_c, b_enc_c = W_enc.to(cd), b_enc.to(cd)
            for k in range(K):
                torch.addmm(b_enc_c[k], xc, W_enc_c[k], out=pre[k])
            t = threshold.float().unsqueeze(1)  # [K, 1, S]
            half = (bandwidth.float() / 2).view(K, 1, 1)
            # 0/1 masks in the compute dtype, as in the single step (bool arithmetic copies).
            mask = workspace.get("mask", (K, B, S), cd, dev)
            torch.gt(pre, t, out=mask)
            near = workspace.get("near", (K, B, S), cd, dev)
            upper = workspace.get("g_f", (K, B, S), cd, dev)  # free until the backward
            torch.gt(pre, t - half, out=near)
            torch.lt(pre, t + half, out=upper)
            near.mul_(upper)
            fire_counts = mask.sum(1, dtype=torch.float32)
            l0 = fire_counts.sum(1) / B
            f = pre.mul_(mask)  # the pre-activation buffer now holds f
            x_hat = torch.empty(K, B, W_dec.shape[2], dtype=cd, device=dev)  # d_out for a transcoder
            W_dec_c, b_dec_c = W_dec.to(cd), b_dec.to(cd)
            for k in range(K):
                torch.addmm(b_dec_c[k], f[k], W_dec_c[k], out=x_hat[k])
            x_hat = x_hat.float()
            # A transcoder reconstructs another site's activations of the same tokens.
            err = x_hat - (x if target is None else target).float()
            mse = err.pow(2).sum((1, 2)) / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.compute_dtype = workspace, cd
        ctx.save_for_backward(x, W_enc, W_dec, threshold, bandwidth, err)
        ctx.mark_non_differentiable(x_hat, fire_counts)
        return mse, l0, x_hat, fire_counts

    @staticmethod
    def backward(ctx, grad_mse: Tensor, grad_l0: Tensor, *_: Tensor):  # type: ignore[override]
        ws: Workspace = ctx.workspace
        if ws.generation != ctx.generation:
            raise RuntimeError(
                "packed fused JumpReLU step: another forward pass reused the workspace before "
                "this backward ran; call backward after each forward"
            )
        x, W_enc, W_dec, threshold, bandwidth, err = ctx.saved_tensors
        (K, d, S), B, cd, dev = W_enc.shape, x.shape[0], ctx.compute_dtype, x.device
        eps = bandwidth.float().view(K, 1)
        f = ws.get("pre", (K, B, S), cd, dev)
        mask = ws.get("mask", (K, B, S), cd, dev)
        near = ws.get("near", (K, B, S), cd, dev)
        g = (err * (2.0 * grad_mse.view(K, 1, 1) / B)).to(cd)
        grad_b_dec = g.float().sum(1)
        grad_W_dec = torch.empty(K, S, W_dec.shape[2], dtype=cd, device=dev)  # d_out for a transcoder
        g_f = ws.get("g_f", (K, B, S), cd, dev)
        W_dec_c = W_dec.to(cd)
        for k in range(K):
            torch.mm(f[k].t(), g[k], out=grad_W_dec[k])
            torch.mm(g[k], W_dec_c[k].t(), out=g_f[k])
        # f is no longer needed: reuse its buffer for near * g_f.
        near_g = torch.mul(g_f, near, out=f).sum(1, dtype=torch.float32)
        near_count = near.sum(1, dtype=torch.float32)
        t = threshold.float()
        grad_t = -(t / eps) * near_g - (grad_l0.float().view(K, 1) / (B * eps)) * near_count
        g_pre = g_f.mul_(mask)
        grad_b_enc = g_pre.sum(1, dtype=torch.float32)
        grad_W_enc = torch.empty(K, d, S, dtype=cd, device=dev)
        xt = x.to(cd).t()
        for k in range(K):
            torch.mm(xt, g_pre[k], out=grad_W_enc[k])
        return (
            None,
            grad_W_enc.to(W_enc.dtype),
            grad_b_enc.to(W_enc.dtype),
            grad_W_dec.to(W_dec.dtype),
            grad_b_dec.to(W_dec.dtype),
            grad_t.to(threshold.dtype),
            None,
            None,
            None,
            None,
        )


def fused_packed_jumprelu_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: Tensor,
    workspace: Workspace,
    compute_dtype: torch.dtype | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedPackedJumpReLULoss` (see its docstring)."""
    return FusedPackedJumpReLULoss.apply(
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, workspace, compute_dtype or W_enc.dtype, target
    )
