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

from gs_lightning.kernels.fused import (
    Workspace,
    gate,
    gate_backward,
    keep_for_backward,
    saved_buffers,
)


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
            f, fire_counts, per_token = gate(workspace, pre, threshold, bandwidth / 2, layer_l0)
            # Source layer 0 writes every layer: its GEMM adds to b_dec and creates y_hat.
            y_hat = torch.addmm(b_dec.to(cd).flatten(), f[0], W_decs[0].to(cd).flatten(1))
            for l in range(1, L):
                y_hat[:, l * d_out:].addmm_(f[l], W_decs[l].to(cd).flatten(1))
            x_hat = y_hat.float().view(B, L, d_out)
            err = x_hat - target.float()
            mse = err.pow(2).sum() / B
        keep_for_backward(ctx, workspace, cd, x_hat, x, threshold, err, *W_decs)
        ctx.bandwidth, ctx.weight_dtypes = bandwidth, (W_enc.dtype, W_decs[0].dtype)
        # Unused outputs get None, not zeros: a zero c would still cost a pass over near.
        ctx.set_materialize_grads(False)
        return mse, fire_counts, fire_counts.new_zeros(B, 0) if per_token is None else per_token.t(), x_hat

    @staticmethod
    def backward(ctx, grad_mse: Tensor | None, grad_counts: Tensor | None,  # type: ignore[override]
                 grad_layer_l0: Tensor | None, *_: Tensor):
        x, threshold, err, *W_decs = ctx.saved_tensors
        (B, L, _), (n, _, d_out), cd = x.shape, W_decs[0].shape, ctx.compute_dtype
        enc_dtype, dec_dtype = ctx.weight_dtypes
        buffers = saved_buffers(ctx, "fused CLT step", (L, B, n))
        f, g_f = buffers[0], buffers[3]
        scale = 0.0 if grad_mse is None else 2.0 * grad_mse / B
        g = (err * scale).to(cd).view(B, L * d_out)
        grad_b_dec = g.float().sum(0).view(L, d_out)
        grad_W_decs = []
        for l, W in enumerate(W_decs):
            g_l = g[:, l * d_out:]  # the layers source l writes
            grad_W_decs.append(torch.mm(f[l].t(), g_l).view(n, L - l, d_out).to(dec_dtype))
            torch.mm(g_l, W.to(cd).flatten(1).t(), out=g_f[l])
        u = None if grad_layer_l0 is None else grad_layer_l0.t()  # [L, B]
        grad_t, g_pre, grad_b_enc = gate_backward(buffers, threshold, ctx.bandwidth, grad_counts, u)
        xc = x.to(cd)
        grad_W_enc = torch.empty(L, x.shape[2], n, dtype=cd, device=x.device)
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
