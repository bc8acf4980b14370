"""A fused JumpReLU training step: MSE and firing counts with hand-written backward.

Autograd over a JumpReLU SAE allocates half a dozen ``[batch, d_sae]`` tensors per step
(268 MB each at B=4096, d_sae=16384). glibc serves every allocation above its mmap
threshold with a fresh ``mmap`` and returns it with ``munmap``, so the step pays page
faults on every one of them, and element-wise work and copies end up costing more than the
matmuls (docs/results/benchmarks.md, "The training step"). This module computes exactly
the same losses and gradients as :mod:`gs_lightning.kernels.functional` does through autograd, but
with five GEMMs, a handful of element-wise passes and ``[batch, d_sae]`` buffers that live
across steps in a :class:`Workspace`.

One kernel, :class:`FusedJumpReLULoss`, steps K SAEs of one shape on the same batch (a
packed sweep); one SAE is its case K = 1 (:func:`fused_jumprelu_loss`). Its JumpReLU gate
(:func:`gate`, :func:`gate_backward`) and its workspace bookkeeping
(:func:`keep_for_backward`, :func:`saved_buffers`) also serve the cross-layer
transcoder's step (:mod:`gs_lightning.kernels.clt_fused`), whose L layers are K blocks of
latents with their own GEMMs.

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


def gate(workspace: Workspace, pre: Tensor, threshold: Tensor, half: Tensor | float,
         per_token: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The JumpReLU gate over K blocks of latents, in the workspace's buffers.

    ``pre [K, B, S]`` is the workspace's ``pre`` buffer, ``threshold [K, S]``, ``half`` half
    the bandwidth (a float, or ``[K, 1, 1]``). Fills the ``mask`` (``pre > t``) and ``near``
    (``|pre - t| < eps/2``) buffers, overwrites ``pre`` with ``f = pre * mask`` and returns
    ``f``, the firing counts per latent ``[K, S]`` and, if ``per_token``, per token ``[K, B]``
    (else None), both float32.
    """
    t = threshold.float().unsqueeze(1)  # [K, 1, S]
    # Masks are stored as 0/1 in the compute dtype, not bool: multiplying or
    # summing a bool tensor first converts it to a full float/int64 copy (10x slower).
    mask = workspace.get("mask", pre.shape, pre.dtype, pre.device)
    torch.gt(pre, t, out=mask)
    near = workspace.get("near", pre.shape, pre.dtype, pre.device)
    upper = workspace.get("g_f", pre.shape, pre.dtype, pre.device)  # free until the backward
    torch.gt(pre, t - half, out=near)
    torch.lt(pre, t + half, out=upper)
    near.mul_(upper)
    fire_counts = mask.sum(1, dtype=torch.float32)
    per_token_counts = mask.sum(2, dtype=torch.float32) if per_token else None
    return pre.mul_(mask), fire_counts, per_token_counts


def keep_for_backward(ctx, workspace: Workspace, compute_dtype: torch.dtype, x_hat: Tensor, *tensors: Tensor) -> None:
    """Save ``tensors`` for a fused step's backward, with the workspace whose buffers that
    backward reads and the forward pass that filled them; ``x_hat`` gets no gradient."""
    workspace.generation += 1
    ctx.workspace, ctx.generation = workspace, workspace.generation
    ctx.compute_dtype, ctx.device = compute_dtype, x_hat.device
    ctx.save_for_backward(*tensors)
    ctx.mark_non_differentiable(x_hat)


def saved_buffers(ctx, step: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The buffers ``(f, mask, near, g_f)`` of shape ``[K, B, S]`` that :func:`gate` left in
    the workspace for this backward; refuses if a later forward has overwritten them."""
    ws: Workspace = ctx.workspace
    if ws.generation != ctx.generation:
        raise RuntimeError(
            f"{step}: another forward pass reused the workspace before this backward ran; "
            "call backward after each forward, or set fused: false"
        )
    return tuple(ws.get(name, shape, ctx.compute_dtype, ctx.device) for name in ("pre", "mask", "near", "g_f"))


def gate_backward(buffers: tuple[Tensor, Tensor, Tensor, Tensor], threshold: Tensor, eps: Tensor | float,
                  grad_counts: Tensor | None, grad_token: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Back through :func:`gate` once the ``g_f`` buffer holds the gradient w.r.t. ``f``:
    returns the threshold gradient ``[K, S]`` (float32), ``g_pre`` (in ``g_f``'s buffer)
    and the encoder bias gradient ``[K, S]`` (float32). ``buffers`` are
    :func:`saved_buffers`'; ``eps`` is a float or ``[K, 1]``; ``grad_counts [K, S]`` and
    ``grad_token [K, B]`` are the upstream gradients of the two firing counts."""
    f, mask, near, g_f = buffers
    # f is no longer needed: reuse its buffer for near * g_f (and near * u).
    near_g = torch.mul(g_f, near, out=f).sum(1, dtype=torch.float32)
    grad_t = -(threshold.float() / eps) * near_g
    grad_t = grad_t - step_threshold_grad(near, f, grad_counts, grad_token, eps)
    g_pre = g_f.mul_(mask)
    return grad_t, g_pre, g_pre.sum(1, dtype=torch.float32)


def step_threshold_grad(near: Tensor, scratch: Tensor, grad_counts: Tensor | None, grad_token: Tensor | None,
                        eps: Tensor | float) -> Tensor:
    """``(1/eps) (c * sum_b near + sum_b near * u)`` summed over the batch dim (-2): the
    threshold gradient of the step counts, with its sign flipped. ``near`` is ``[..., B, S]``,
    ``c`` (``grad_counts``) ``[..., S]``, ``u`` (``grad_token``) ``[..., B]``, ``eps`` a float
    or ``[..., 1]``; ``scratch`` is a free buffer of ``near``'s shape."""
    out = torch.zeros(near.shape[:-2] + near.shape[-1:], dtype=torch.float32, device=near.device)
    if grad_counts is not None:
        out += near.sum(-2, dtype=torch.float32) * grad_counts.float()
    if grad_token is not None and grad_token.numel():
        out += torch.mul(near, grad_token.unsqueeze(-1).to(near.dtype), out=scratch).sum(-2, dtype=torch.float32)
    return out / eps


class FusedJumpReLULoss(torch.autograd.Function):
    """Returns ``(mse, fire_counts, token_l0, x_hat)`` for K JumpReLU SAEs of one shape
    reading the same batch ``x [B, d_in]``; one SAE is the case K = 1
    (:func:`fused_jumprelu_loss`).

    The matrices come as K separate tensors after ``K``: each member's ``W_enc [d_in, S]``,
    then each one's ``W_dec [S, d_out]``, then, for skip-transcoders, each one's
    ``W_skip [d_in, d_out]`` (``x_hat`` adds ``x @ W_skip`` and ``W_skip`` gets its
    gradient). The vectors come stacked with a leading K dimension (``b_enc [K, S]``,
    ``b_dec [K, d_out]``, ``threshold [K, S]``), or for one SAE without it, and then every
    result comes without it too; ``bandwidth`` is one float for all members or a ``[K]``
    tensor.

    ``mse [K]`` is ``||x - x_hat||^2`` summed over the model dimension and averaged over
    the batch. ``fire_counts [K, S]`` (on how many tokens each latent fired) and
    ``token_l0 [K, B]`` (active latents per token; ``[K, 0]`` unless ``token_l0`` is set,
    as it costs a pass over ``[K, B, S]``) are float32 sums of ``H(pre - t)`` with the step
    function's pseudo-derivative w.r.t. the threshold. ``x_hat [K, B, d_out]`` (float32)
    carries no gradient. GEMMs run in ``compute_dtype``; threshold comparisons and the
    threshold gradient in float32.

    The ``[K, B, S]`` buffers live in the :class:`Workspace`; element-wise passes and
    reductions run once over all K, and each GEMM is one member's own, written into its
    slice (on CPU, ``torch.bmm`` at these shapes runs 1.3-1.5x slower than K ``mm`` calls).
    The matrices are not stacked: a stack would copy them every step, and on the CPU each
    ``[K, d, S]`` copy or gradient is a fresh mapping of hundreds of MB whose pages fault
    in every time.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: Tensor | float,
        workspace: Workspace,
        compute_dtype: torch.dtype,
        target: Tensor | None,
        token_l0: bool,
        K: int,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        W_encs, W_decs, W_skips = weights[:K], weights[K:2 * K], weights[2 * K:]
        # One SAE's vectors and results go without the leading K: views here, not autograd
        # nodes around the call, since the single step is every JumpReLU fit's hot path.
        ctx.vector_shapes = tuple(v.shape for v in (b_enc, b_dec, threshold))
        b_enc, b_dec, threshold = b_enc.reshape(K, -1), b_dec.reshape(K, -1), threshold.reshape(K, -1)
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit here
            (_, S), B, cd, dev = W_encs[0].shape, x.shape[0], compute_dtype, x.device
            xc = x.to(cd)
            pre = workspace.get("pre", (K, B, S), cd, dev)
            b_enc_c = b_enc.to(cd)
            for k in range(K):
                torch.addmm(b_enc_c[k], xc, W_encs[k].to(cd), out=pre[k])
            # A float bandwidth stays a Python scalar: on CUDA, dividing by a scalar multiplies
            # by its reciprocal, so a tensor would move the single step's threshold gradient
            # by an ulp.
            per_member = isinstance(bandwidth, Tensor)
            half = (bandwidth.float() / 2).view(K, 1, 1) if per_member else bandwidth / 2
            f, fire_counts, per_token = gate(workspace, pre, threshold, half, token_l0)
            x_hat = torch.empty(K, B, W_decs[0].shape[1], dtype=cd, device=dev)  # d_out for a transcoder
            b_dec_c = b_dec.to(cd)
            for k in range(K):
                torch.addmm(b_dec_c[k], f[k], W_decs[k].to(cd), out=x_hat[k])
                if W_skips:
                    x_hat[k].addmm_(xc, W_skips[k].to(cd))
            x_hat = x_hat.float()
            # A transcoder reconstructs another site's activations of the same tokens.
            err = x_hat - (x if target is None else target).float()
            mse = err.pow(2).sum((1, 2)) / B
        keep_for_backward(ctx, workspace, cd, x_hat, x, threshold, err, *W_decs)
        ctx.K, ctx.eps = K, bandwidth.float().view(K, 1) if per_member else bandwidth
        ctx.weight_dtypes = (W_encs[0].dtype, W_decs[0].dtype, W_skips[0].dtype if W_skips else None)
        if per_token is None:
            per_token = fire_counts.new_zeros(K, 0)
        if len(ctx.vector_shapes[0]) == 1:
            return mse[0], fire_counts[0], per_token[0], x_hat[0]
        return mse, fire_counts, per_token, x_hat

    @staticmethod
    def backward(ctx, grad_mse: Tensor, grad_counts: Tensor | None, grad_token: Tensor | None,  # type: ignore[override]
                 *_: Tensor):
        x, threshold, err, *W_decs = ctx.saved_tensors
        K, cd, (S, _), B = ctx.K, ctx.compute_dtype, W_decs[0].shape, x.shape[0]
        enc_dtype, dec_dtype, skip_dtype = ctx.weight_dtypes
        buffers = saved_buffers(ctx, "fused JumpReLU step", (K, B, S))
        f, g_f = buffers[0], buffers[3]
        g = (err * (2.0 * grad_mse.view(K, 1, 1) / B)).to(cd)
        grad_b_dec = g.float().sum(1)
        grad_W_decs = []
        for k in range(K):
            grad_W_decs.append(torch.mm(f[k].t(), g[k]).to(dec_dtype))
            torch.mm(g[k], W_decs[k].to(cd).t(), out=g_f[k])
        grad_t, g_pre, grad_b_enc = gate_backward(buffers, threshold, ctx.eps, grad_counts, grad_token)  # [K, S]
        xt = x.to(cd).t()
        grad_W_encs = [torch.mm(xt, g_pre[k]).to(enc_dtype) for k in range(K)]
        grad_W_skips = [] if skip_dtype is None else [torch.mm(xt, g[k]).to(skip_dtype) for k in range(K)]
        b_enc_shape, b_dec_shape, threshold_shape = ctx.vector_shapes
        return (
            None,
            grad_b_enc.to(enc_dtype).view(b_enc_shape),
            grad_b_dec.to(dec_dtype).view(b_dec_shape),
            grad_t.to(threshold.dtype).view(threshold_shape),
            *(None,) * 6,
            *grad_W_encs,
            *grad_W_decs,
            *grad_W_skips,
        )


def fused_jumprelu_loss(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor, bandwidth: float,
    workspace: Workspace, compute_dtype: torch.dtype | None = None, target: Tensor | None = None,
    token_l0: bool = False, W_skip: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`FusedJumpReLULoss` for one SAE, the case K = 1: vectors and results without
    the leading K (``mse`` a scalar, ``fire_counts [S]``, ``token_l0 [B]`` or empty,
    ``x_hat [B, d_out]``), ``bandwidth`` a float, ``W_skip`` a skip-transcoder's matrix."""
    skip = () if W_skip is None else (W_skip,)
    return FusedJumpReLULoss.apply(
        x, b_enc, b_dec, threshold, bandwidth, workspace, compute_dtype or W_enc.dtype, target, token_l0, 1,
        W_enc, W_dec, *skip,
    )


def fused_packed_jumprelu_loss(
    x: Tensor, W_enc: Tensor | Sequence[Tensor], b_enc: Tensor, W_dec: Tensor | Sequence[Tensor], b_dec: Tensor,
    threshold: Tensor, bandwidth: Tensor, workspace: Workspace, compute_dtype: torch.dtype | None = None,
    target: Tensor | None = None, token_l0: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`FusedJumpReLULoss` for K SAEs (see its docstring).

    ``W_enc`` and ``W_dec`` are K members' matrices: a sequence of K tensors, or one tensor
    with a leading K dimension (unbound into K views, gradients flowing back to it).
    """
    W_encs = list(W_enc.unbind(0) if isinstance(W_enc, Tensor) else W_enc)
    W_decs = list(W_dec.unbind(0) if isinstance(W_dec, Tensor) else W_dec)
    if len(W_encs) != len(W_decs):
        raise ValueError(f"{len(W_encs)} encoder matrices but {len(W_decs)} decoder matrices")
    return FusedJumpReLULoss.apply(
        x, b_enc, b_dec, threshold, bandwidth, workspace, compute_dtype or W_encs[0].dtype, target, token_l0,
        len(W_encs), *W_encs, *W_decs,
    )
