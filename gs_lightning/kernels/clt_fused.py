"""A fused training step for the cross-layer transcoder: losses with a hand-written backward.

Through autograd a CLT step at B=2048, L=4, n=4096 spends three quarters of its time
outside the GEMMs: the einsum encode, the JumpReLU and step functions over ``[B, L n]``,
the in-place slice adds of the decode and their backward each allocate and walk
``[B, L n]`` tensors (134 MB in fp32), which glibc serves with fresh mappings whose pages
fault in every step (see :mod:`gs_lightning.kernels.fused`). This function computes the same
numbers as :class:`~gs_lightning.saes.clt.CrossLayerTranscoder`'s autograd path with one
GEMM per layer and direction and ``[L, B, n]`` buffers kept in a
:class:`~gs_lightning.kernels.fused.Workspace`; each layer's slice ``[B, n]`` is contiguous, so a
GEMM writes it in place and the element-wise passes run once over all layers.

With ``x_l = x[:, l]``, ``err = y_hat - y``, ``g = 2 err / B`` (``[B, L d_out]``, layer-major),
``g_{l:} = g[:, l:]`` (the layers source l writes), ``mask = pre > t``,
``near = |pre - t| < eps/2``, ``c`` and ``u`` the upstream gradients of the per-latent
counts ``[L, n]`` and the per-token, per-layer L0 ``[B, L]``:

* forward: ``pre_l = x_l W_enc[l] + b_enc[l]``, ``f_l = mask_l pre_l``,
  ``y_hat = b_dec + sum_l f_l W_dec[l]`` (``W_dec[l]`` flattened to ``[n, (L - l) d_out]``,
  added into the columns of layers ``l..L-1``)
* ``dW_dec[l] = f_l^T g_{l:}``, ``db_dec = sum_b g``, ``g_f_l = g_{l:} W_dec[l]^T``
* ``dt = -(t/eps) sum_b(near g_f) - (1/eps) (c sum_b(near) + sum_b(near u))``
* ``g_pre = mask g_f``, ``dW_enc[l] = x_l^T g_pre_l``, ``db_enc = sum_b g_pre``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gs_lightning.kernels.fused import Workspace, step_threshold_grad


class FusedCLTLoss(torch.autograd.Function):
    """Returns ``(mse, fire_counts, layer_l0, x_hat)`` for a CLT on inputs ``x [B, L, d]``
    reconstructing ``target [B, L, d_out]``.

    ``mse`` is the squared error summed over the model dimension and the layers, averaged
    over the batch. ``fire_counts [L, n]`` (tokens each latent fired on) and ``layer_l0
    [B, L]`` (active latents per token and layer; empty unless ``layer_l0`` is set, as it
    costs a pass over ``[L, B, n]``) are float32 sums of ``H(pre - t)`` carrying the step
    function's pseudo-derivative w.r.t. the threshold. ``x_hat [B, L, d_out]`` (float32)
    carries no gradient. The L decoders come after ``layer_l0`` as ``*W_decs``. GEMMs run in
    ``compute_dtype``; threshold comparisons and the threshold gradient in float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        target: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: float,
        workspace: Workspace,
        compute_dtype: torch.dtype,
        layer_l0: bool,
        *W_decs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit here
            (B, L, _), n, cd, dev = x.shape, W_enc.shape[2], compute_dtype, x.device
            d_out = b_dec.shape[1]
            xc, b_enc_c = x.to(cd), b_enc.to(cd)
            pre = workspace.get("pre", (L, B, n), cd, dev)
            for l in range(L):
                torch.addmm(b_enc_c[l], xc[:, l], W_enc[l].to(cd), out=pre[l])
            t = threshold.float().unsqueeze(1)  # [L, 1, n]
            # 0/1 masks in the compute dtype, as in gs_lightning.kernels.fused (bool arithmetic copies).
            mask = workspace.get("mask", (L, B, n), cd, dev)
            torch.gt(pre, t, out=mask)
            near = workspace.get("near", (L, B, n), cd, dev)
            upper = workspace.get("g_f", (L, B, n), cd, dev)  # free until the backward
            torch.gt(pre, t - bandwidth / 2, out=near)
            torch.lt(pre, t + bandwidth / 2, out=upper)
            near.mul_(upper)
            fire_counts = mask.sum(1, dtype=torch.float32)
            per_token = mask.sum(2, dtype=torch.float32).t() if layer_l0 else fire_counts.new_zeros(B, 0)
            f = pre.mul_(mask)  # the pre-activation buffer now holds f
            # Source layer 0 writes every layer: its GEMM adds to b_dec and creates y_hat.
            y_hat = torch.addmm(b_dec.to(cd).flatten(), f[0], W_decs[0].to(cd).flatten(1))
            for l in range(1, L):
                y_hat[:, l * d_out:].addmm_(f[l], W_decs[l].to(cd).flatten(1))
            x_hat = y_hat.float().view(B, L, d_out)
            err = x_hat - target.float()
            mse = err.pow(2).sum() / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.bandwidth, ctx.compute_dtype = workspace, bandwidth, cd
        ctx.weight_dtypes = (W_enc.dtype, W_decs[0].dtype)
        ctx.save_for_backward(x, threshold, err, *W_decs)
        ctx.mark_non_differentiable(x_hat)
        # Unused outputs get None, not zeros: a zero c would still cost a pass over near.
        ctx.set_materialize_grads(False)
        return mse, fire_counts, per_token, x_hat

    @staticmethod
    def backward(ctx, grad_mse: Tensor | None, grad_counts: Tensor | None,  # type: ignore[override]
                 grad_layer_l0: Tensor | None, *_: Tensor):
        ws: Workspace = ctx.workspace
        if ws.generation != ctx.generation:
            raise RuntimeError(
                "fused CLT step: another forward pass reused the workspace before this "
                "backward ran; call backward after each forward, or set fused: false"
            )
        x, threshold, err, *W_decs = ctx.saved_tensors
        (B, L, _), (n, _, d_out) = x.shape, W_decs[0].shape
        cd, dev, eps = ctx.compute_dtype, x.device, ctx.bandwidth
        enc_dtype, dec_dtype = ctx.weight_dtypes
        f = ws.get("pre", (L, B, n), cd, dev)
        mask = ws.get("mask", (L, B, n), cd, dev)
        near = ws.get("near", (L, B, n), cd, dev)
        g_f = ws.get("g_f", (L, B, n), cd, dev)
        scale = 0.0 if grad_mse is None else 2.0 * grad_mse / B
        g = (err * scale).to(cd).view(B, L * d_out)
        grad_b_dec = g.float().sum(0).view(L, d_out)
        grad_W_decs = []
        for l, W in enumerate(W_decs):
            g_l = g[:, l * d_out:]  # the layers source l writes
            grad_W_decs.append(torch.mm(f[l].t(), g_l).view(n, L - l, d_out).to(dec_dtype))
            torch.mm(g_l, W.to(cd).flatten(1).t(), out=g_f[l])
        # f is no longer needed: reuse its buffer for near * g_f (and near * u).
        near_g = torch.mul(g_f, near, out=f).sum(1, dtype=torch.float32)
        u = None if grad_layer_l0 is None else grad_layer_l0.t()  # [L, B]
        grad_t = -(threshold.float() / eps) * near_g - step_threshold_grad(near, f, grad_counts, u, eps)
        g_pre = g_f.mul_(mask)
        grad_b_enc = g_pre.sum(1, dtype=torch.float32)
        xc = x.to(cd)
        grad_W_enc = torch.empty(L, x.shape[2], n, dtype=cd, device=dev)
        for l in range(L):
            torch.mm(xc[:, l].t(), g_pre[l], out=grad_W_enc[l])
        return (
            None,
            None,
            grad_W_enc.to(enc_dtype),
            grad_b_enc.to(enc_dtype),
            grad_b_dec.to(dec_dtype),
            grad_t.to(threshold.dtype),
            None,
            None,
            None,
            None,
            *grad_W_decs,
        )


def fused_clt_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Sequence[Tensor],
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    workspace: Workspace,
    compute_dtype: torch.dtype | None = None,
    target: Tensor | None = None,
    layer_l0: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedCLTLoss` (see its docstring); ``W_dec`` is
    the L decoders ``[n, L - l, d_out]``, ``target`` defaults to ``x``."""
    return FusedCLTLoss.apply(
        x, x if target is None else target, W_enc, b_enc, b_dec, threshold, bandwidth, workspace,
        compute_dtype or W_enc.dtype, layer_l0, *W_dec,
    )
