"""A fused JumpReLU training step: MSE and firing counts with hand-written backward.

Autograd over a JumpReLU SAE allocates half a dozen ``[batch, d_sae]`` tensors per step
(268 MB each at B=4096, d_sae=16384). glibc serves every allocation above its mmap
threshold with a fresh ``mmap`` and returns it with ``munmap``, so the step pays page
faults on every one of them, and element-wise work and copies end up costing more than the
matmuls (DESIGN.md section 5). This function computes exactly the same losses and
gradients as :mod:`gs_lightning.kernels.functional` does through autograd, but with five GEMMs,
a handful of element-wise passes and ``[batch, d_sae]`` buffers that live across steps
in a :class:`Workspace`.

The step returns the firing counts per latent (``sum_b H(pre - t)``) and, on request,
per token (``sum_i H(pre - t)``), both carrying the step function's pseudo-derivative, so
any sparsity loss built from them (Gemma Scope's mean L0, Gemma Scope 2's quadratic
penalty around a target L0, a penalty on dense latents) gets exactly the threshold
gradient autograd would give it through :func:`gs_lightning.kernels.functional.step`.

Gradients (``err = x_hat - x``, ``g = 2 err / B``, ``mask = pre > t``,
``near = |pre - t| < eps/2``, ``c_i`` and ``u_b`` the upstream gradients of the per-latent
and per-token counts):

* ``dW_dec = f^T g``, ``db_dec = sum_b g``, ``g_f = g W_dec^T``
* ``dt = -(t/eps) sum_b(near * g_f) - (1/eps) (c * sum_b(near) + sum_b(near * u))``
* ``g_pre = mask * g_f``, ``dW_enc = x^T g_pre``, ``db_enc = sum_b g_pre``
* a skip-transcoder's ``x_hat`` adds ``x @ W_skip``: ``dW_skip = x^T g`` (one more GEMM each
  way, ``[B, d_in] x [d_in, d_out]``, small next to the ``d_sae``-wide ones)
"""

from __future__ import annotations

from collections.abc import Sequence

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


def autocast_dtype(x: Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a fused step's GEMMs run in on ``x``'s device: autocast's when it is
    enabled there, else ``default`` (the weights' dtype)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else default


class FusedJumpReLULoss(torch.autograd.Function):
    """Returns ``(mse, fire_counts, token_l0, x_hat)`` for a JumpReLU SAE on a batch ``x``.

    ``mse`` is ``||x - x_hat||^2`` summed over the model dimension and averaged over the
    batch. ``fire_counts`` (``[d_sae]``, on how many tokens each latent fired) and
    ``token_l0`` (``[B]``, active latents per token; empty unless ``token_l0`` is set, as
    it costs a pass over ``[B, d_sae]``) are float32 sums of ``H(pre - t)`` with the step
    function's pseudo-derivative w.r.t. the threshold. ``x_hat`` (float32) carries no
    gradient. GEMMs run in ``compute_dtype``; threshold comparisons and the threshold
    gradient in float32. With ``W_skip [d_in, d_out]`` (a skip-transcoder) ``x_hat`` includes
    ``x @ W_skip`` and ``W_skip`` gets its gradient.
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
        token_l0: bool = False,
        W_skip: Tensor | None = None,
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
            per_token = mask.sum(1, dtype=torch.float32) if token_l0 else fire_counts.new_zeros(0)
            f = pre.mul_(mask)  # the pre-activation buffer now holds f
            x_hat = torch.addmm(b_dec.to(cd), f, W_dec.to(cd))
            if W_skip is not None:
                x_hat.addmm_(xc, W_skip.to(cd))
            x_hat = x_hat.float()
            # A transcoder reconstructs another site's activations of the same tokens.
            err = x_hat - (x if target is None else target).float()
            mse = err.pow(2).sum() / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.bandwidth, ctx.compute_dtype = workspace, bandwidth, cd
        ctx.skip_dtype = None if W_skip is None else W_skip.dtype
        ctx.save_for_backward(x, W_enc, W_dec, threshold, err)
        ctx.mark_non_differentiable(x_hat)
        return mse, fire_counts, per_token, x_hat

    @staticmethod
    def backward(ctx, grad_mse: Tensor, grad_counts: Tensor | None, grad_token: Tensor | None,  # type: ignore[override]
                 *_: Tensor):
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
        # f is no longer needed: reuse its buffer for near * g_f (and near * u below).
        near_g = torch.mul(g_f, near, out=f).sum(0, dtype=torch.float32)
        t = threshold.float()
        grad_t = -(t / eps) * near_g
        grad_t = grad_t - step_threshold_grad(near, f, grad_counts, grad_token, eps)
        g_pre = g_f.mul_(mask)
        grad_b_enc = g_pre.sum(0, dtype=torch.float32)
        xt = x.to(cd).t()
        grad_W_enc = torch.mm(xt, g_pre)
        grad_W_skip = None if ctx.skip_dtype is None else torch.mm(xt, g).to(ctx.skip_dtype)
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
            None,
            grad_W_skip,
        )


def step_threshold_grad(near: Tensor, scratch: Tensor, grad_counts: Tensor | None, grad_token: Tensor | None,
                         eps: Tensor | float) -> Tensor:
    """``(1/eps) (c * sum_b near + sum_b near * u)`` summed over the batch dim (-2): the
    threshold gradient of the step counts, with its sign flipped. ``near`` is ``[..., B, S]``,
    ``c`` (``grad_counts``) ``[..., S]``, ``u`` (``grad_token``) ``[..., B]``; ``scratch``
    is a free buffer of ``near``'s shape."""
    out = torch.zeros(near.shape[:-2] + near.shape[-1:], dtype=torch.float32, device=near.device)
    if grad_counts is not None:
        out += near.sum(-2, dtype=torch.float32) * grad_counts.float()
    if grad_token is not None and grad_token.numel():
        out += torch.mul(near, grad_token.unsqueeze(-1).to(near.dtype), out=scratch).sum(-2, dtype=torch.float32)
    return out / (eps.float().unsqueeze(-1) if isinstance(eps, Tensor) else eps)


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
    token_l0: bool = False,
    W_skip: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedJumpReLULoss` (see its docstring)."""
    return FusedJumpReLULoss.apply(
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, workspace, compute_dtype or W_enc.dtype, target,
        token_l0, W_skip,
    )


class FusedPackedJumpReLULoss(torch.autograd.Function):
    """:class:`FusedJumpReLULoss` for K JumpReLU SAEs of one shape reading the same batch.

    The matrices come as K separate tensors (each member's own ``W_enc [d, S]`` and
    ``W_dec [S, d]``, passed after ``K`` as ``*W_encs, *W_decs``), the vectors stacked with
    a leading K dimension (``b_enc [K, S]``, ``b_dec [K, d]``, ``threshold [K, S]``,
    ``bandwidth [K]``); ``x [B, d]`` is shared. Returns ``mse [K]``, ``fire_counts [K, S]``,
    ``token_l0 [K, B]`` (empty unless requested) and ``x_hat [K, B, d]``, member k's
    numbers being exactly what the single fused step returns for SAE k. The ``[K, B, S]``
    buffers live in the :class:`Workspace` as the single step's do; element-wise passes and reductions run once over all K, and
    each GEMM is the single step's GEMM on member k's own matrices, written into member
    k's slice (on CPU, ``torch.bmm`` at these shapes runs 1.3-1.5x slower than K ``mm``
    calls). The matrices are not stacked: a stack would copy them every step, and on the
    CPU each ``[K, d, S]`` copy or gradient is a fresh mapping of hundreds of MB whose
    pages fault in every time.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: Tensor,
        workspace: Workspace,
        compute_dtype: torch.dtype,
        target: Tensor | None,
        token_l0: bool,
        K: int,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        W_encs, W_decs = weights[:K], weights[K:]
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit here
            (_, S), B, cd, dev = W_encs[0].shape, x.shape[0], compute_dtype, x.device
            xc = x.to(cd)
            pre = workspace.get("pre", (K, B, S), cd, dev)
            b_enc_c = b_enc.to(cd)
            for k in range(K):
                torch.addmm(b_enc_c[k], xc, W_encs[k].to(cd), out=pre[k])
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
            per_token = mask.sum(2, dtype=torch.float32) if token_l0 else fire_counts.new_zeros(K, 0)
            f = pre.mul_(mask)  # the pre-activation buffer now holds f
            x_hat = torch.empty(K, B, W_decs[0].shape[1], dtype=cd, device=dev)  # d_out for a transcoder
            b_dec_c = b_dec.to(cd)
            for k in range(K):
                torch.addmm(b_dec_c[k], f[k], W_decs[k].to(cd), out=x_hat[k])
            x_hat = x_hat.float()
            # A transcoder reconstructs another site's activations of the same tokens.
            err = x_hat - (x if target is None else target).float()
            mse = err.pow(2).sum((1, 2)) / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.compute_dtype, ctx.K = workspace, cd, K
        ctx.weight_dtypes = (W_encs[0].dtype, W_decs[0].dtype)
        ctx.save_for_backward(x, threshold, bandwidth, err, *W_decs)
        ctx.mark_non_differentiable(x_hat)
        return mse, fire_counts, per_token, x_hat

    @staticmethod
    def backward(ctx, grad_mse: Tensor, grad_counts: Tensor | None, grad_token: Tensor | None,  # type: ignore[override]
                 *_: Tensor):
        ws: Workspace = ctx.workspace
        if ws.generation != ctx.generation:
            raise RuntimeError(
                "packed fused JumpReLU step: another forward pass reused the workspace before "
                "this backward ran; call backward after each forward"
            )
        x, threshold, bandwidth, err, *W_decs = ctx.saved_tensors
        K, cd, dev = ctx.K, ctx.compute_dtype, x.device
        (S, _), B = W_decs[0].shape, x.shape[0]
        enc_dtype, dec_dtype = ctx.weight_dtypes
        eps = bandwidth.float().view(K, 1)
        f = ws.get("pre", (K, B, S), cd, dev)
        mask = ws.get("mask", (K, B, S), cd, dev)
        near = ws.get("near", (K, B, S), cd, dev)
        g = (err * (2.0 * grad_mse.view(K, 1, 1) / B)).to(cd)
        grad_b_dec = g.float().sum(1)
        g_f = ws.get("g_f", (K, B, S), cd, dev)
        grad_W_decs = []
        for k in range(K):
            grad_W_decs.append(torch.mm(f[k].t(), g[k]).to(dec_dtype))
            torch.mm(g[k], W_decs[k].to(cd).t(), out=g_f[k])
        # f is no longer needed: reuse its buffer for near * g_f (and near * u).
        near_g = torch.mul(g_f, near, out=f).sum(1, dtype=torch.float32)
        t = threshold.float()
        grad_t = -(t / eps) * near_g - step_threshold_grad(near, f, grad_counts, grad_token, bandwidth)
        g_pre = g_f.mul_(mask)
        grad_b_enc = g_pre.sum(1, dtype=torch.float32)
        xt = x.to(cd).t()
        grad_W_encs = [torch.mm(xt, g_pre[k]).to(enc_dtype) for k in range(K)]
        return (
            None,
            grad_b_enc.to(enc_dtype),
            grad_b_dec.to(dec_dtype),
            grad_t.to(threshold.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            *grad_W_encs,
            *grad_W_decs,
        )


def fused_packed_jumprelu_loss(
    x: Tensor,
    W_enc: Tensor | Sequence[Tensor],
    b_enc: Tensor,
    W_dec: Tensor | Sequence[Tensor],
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: Tensor,
    workspace: Workspace,
    compute_dtype: torch.dtype | None = None,
    target: Tensor | None = None,
    token_l0: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedPackedJumpReLULoss` (see its docstring).

    ``W_enc`` and ``W_dec`` are K members' matrices: a sequence of K tensors, or one tensor
    with a leading K dimension (unbound into K views, gradients flowing back to it).
    """
    W_encs = list(W_enc.unbind(0) if isinstance(W_enc, Tensor) else W_enc)
    W_decs = list(W_dec.unbind(0) if isinstance(W_dec, Tensor) else W_dec)
    if len(W_encs) != len(W_decs):
        raise ValueError(f"{len(W_encs)} encoder matrices but {len(W_decs)} decoder matrices")
    return FusedPackedJumpReLULoss.apply(
        x, b_enc, b_dec, threshold, bandwidth, workspace, compute_dtype or W_encs[0].dtype, target, token_l0,
        len(W_encs), *W_encs, *W_decs,
    )
