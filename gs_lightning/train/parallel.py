"""Latent-sharded model parallelism: one SAE's dictionary split across ranks by latent.

With W ranks, rank r holds latents ``[r S/W, (r+1) S/W)``: the columns ``W_enc[:, shard]``,
``b_enc[shard]``, ``threshold[shard]`` and the rows ``W_dec[shard, :]``; ``b_dec`` is
replicated. Every rank reads the same full batch, computes its own latents and a partial
reconstruction ``f_r @ W_dec[r]``, and the partials are summed across ranks. Parameters
are DTensors (``Shard(1)``, ``Shard(0)``, ``Replicate()``) on Lightning's
``ModelParallelStrategy`` device mesh, so ``full_tensor()`` gathers a weight and the
strategy's distributed checkpoint saves each shard; the maths runs on the local tensors.

Gradients: the loss is replicated (every rank computes the same value from the same
reconstruction), so the sum of partials passes its gradient through unchanged to each
rank's partial (an all-reduce in forward, identity in backward); a rank's parameters then
receive exactly their slice of the single-process gradient, with no gradient
communication. The decoder-row projection and renormalisation are per row, hence local.

Supported: :class:`~gs_lightning.saes.JumpReLUSAE` (either threshold parameterisation,
SAE or transcoder) through the autograd path. Variants whose activation selects across
all latents (TopK, BatchTopK, Matryoshka) would need a global top-k and are refused, as
are packed sweeps.
"""

from __future__ import annotations

import atexit
import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from gs_lightning.errors import ConfigError
from gs_lightning.kernels.functional import jumprelu, step
from gs_lightning.saes import JumpReLUSAE, TrainOutput

# Placement of each parameter along the latent dimension; everything else is replicated.
LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0, "raw_threshold": 0}


def check_supported(sae: Any) -> None:
    """Raise a ConfigError unless ``sae`` can be sharded by latent."""
    if type(sae) is not JumpReLUSAE:
        raise ConfigError(
            f"model.latent_parallel supports JumpReLUSAE only, not {type(sae).__name__}: TopK-style "
            "activations select across all latents (a global top-k would need a gather of every rank's "
            "pre-activations), and other variants are not implemented; set model.latent_parallel: false"
        )
    if sae.W_skip is not None:
        raise ConfigError("model.latent_parallel does not implement the skip path of a skip-transcoder; "
                          "set model.sae.init_args.skip_connection: false or model.latent_parallel: false")
    if sae.dense_coefficient > 0 or sae.tracks_dead:
        raise ConfigError(
            "model.latent_parallel does not implement the dense and dead-latent terms (they act per latent, "
            "across shards); set model.sae.init_args.dense_coefficient, dead_coefficient and aux_coefficient to 0"
        )


def shard_latents(sae: JumpReLUSAE, mesh: DeviceMesh) -> None:
    """Replace ``sae``'s parameters with DTensors sharded by latent over the 1-D ``mesh``.

    Every rank must hold the same full weights when this is called (same seed); each keeps
    its own slice. ``d_sae`` must be divisible by the mesh size (equal shards keep the
    gathered weights in the single-process order).
    """
    check_supported(sae)
    if sae.d_sae % mesh.size() != 0:
        raise ConfigError(f"model.latent_parallel: d_sae={sae.d_sae} is not divisible by {mesh.size()} ranks")
    for name, param in list(sae.named_parameters(recurse=False)):
        dim = LATENT_DIM.get(name)
        placement = Replicate() if dim is None else Shard(dim)
        sharded = distribute_tensor(param.detach(), mesh, [placement])
        setattr(sae, name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def is_sharded(sae: nn.Module) -> bool:
    """Whether :func:`shard_latents` has been applied to ``sae``."""
    return isinstance(getattr(sae, "W_enc", None), DTensor)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in forward; identity in backward.

    The upstream gradient is already the same on every rank (the loss is replicated), and
    it is the gradient of each rank's own summand, so it must not be summed again.
    """

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def sum_over_ranks(partial: Tensor, group: Any = None) -> Tensor:
    """Sum of ``partial`` over the ranks of ``group``, differentiable as described above."""
    return _SumOverRanks.apply(partial, group)


class _SumGradOverRanks(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) of the gradient in backward.

    For the replicated ``b_dec`` inside ``b_dec @ W_enc[:, shard]``: each rank's gradient
    covers its own latents only, and ``b_dec``'s is the sum over all of them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def _local(sae: JumpReLUSAE) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Any]:
    """The local shards ``W_enc, b_enc, W_dec, b_dec, threshold`` (differentiable; ``b_enc`` the
    encoder bias :meth:`JumpReLUSAE.encoder_bias` computes) and the group."""
    W_enc, b_enc, W_dec, b_dec = (p.to_local() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    if sae.threshold_parameterization == "log":
        threshold = sae.log_threshold.to_local().float().exp()
    else:
        threshold = sae.raw_threshold.to_local().float()
    group = sae.W_enc.device_mesh.get_group()
    if sae.subtract_decoder_bias:  # the encoder reads x - b_dec: b_enc - b_dec @ W_enc, per shard
        b_enc = b_enc - _SumGradOverRanks.apply(b_dec, group) @ W_enc
    return W_enc, b_enc, W_dec, b_dec, threshold, group


def _gather_counts(counts: Tensor, group: Any) -> Tensor:
    """Concatenate each rank's ``[d_sae / W]`` firing counts into the full ``[d_sae]``, in rank order."""
    parts = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, counts.contiguous(), group=group)
    return torch.cat(parts)


def sharded_training_output(sae: JumpReLUSAE, x: Tensor, warmup: float, target: Tensor | None = None) -> TrainOutput:
    """:meth:`JumpReLUSAE.training_output` of a latent-sharded SAE: the same losses and
    statistics (``l0`` and ``fire_counts`` over all ``d_sae`` latents) on every rank."""
    target = x if target is None else target
    W_enc, b_enc, W_dec, b_dec, threshold, group = _local(sae)
    pre = x @ W_enc + b_enc
    f = jumprelu(pre, threshold, sae.bandwidth)
    x_hat = sum_over_ranks(f @ W_dec, group) + b_dec
    mse = (x_hat - target).pow(2).sum(-1).mean()
    # Each rank's share of a token's L0 is a sum over its latents; the total is their sum.
    token_l0 = sum_over_ranks(step(pre, threshold, sae.bandwidth).sum(-1), group)
    losses = {"mse": mse, **sae.sparsity_terms(None, token_l0, x.shape[0], warmup)}
    with torch.no_grad():
        fire_counts = _gather_counts((f != 0).sum(0), group)
    return TrainOutput(x_hat, losses, fire_counts.sum().float() / x.shape[0], fire_counts)


@torch.no_grad()
def sharded_reconstruction(sae: JumpReLUSAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_hat, l0 per token, fire counts [d_sae])`` of a latent-sharded SAE, the same on every rank."""
    W_enc, b_enc, W_dec, b_dec, threshold, group = _local(sae)
    f = jumprelu(x @ W_enc + b_enc, threshold, sae.bandwidth)
    x_hat = sum_over_ranks(f @ W_dec, group) + b_dec
    active = (f != 0).float()
    return x_hat, sum_over_ranks(active.sum(-1), group), _gather_counts(active.sum(0), group)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every DTensor gathered into its full tensor (a collective:
    call it on every rank)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def shard_for_strategy(sae: JumpReLUSAE, strategy: Any) -> None:
    """Shard ``sae`` over the tensor-parallel dimension of a ``ModelParallelStrategy``'s mesh,
    or raise a ConfigError for any other strategy or a data-parallel dimension above 1."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(
            f"model.latent_parallel needs trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy, "
            f"not {type(strategy).__name__}"
        )
    mesh = strategy.device_mesh
    if mesh["data_parallel"].size() != 1:
        # Replicas of a sharded SAE would also need their gradients averaged: not implemented.
        raise ConfigError(
            f"model.latent_parallel shards over one node's ranks only; the mesh has data_parallel size "
            f"{mesh['data_parallel'].size()} (set ModelParallelStrategy's data_parallel_size: 1)"
        )
    shard_latents(sae, mesh["tensor_parallel"])


def gathered_sae(sae: JumpReLUSAE) -> JumpReLUSAE | None:
    """An unsharded float copy of a latent-sharded SAE, on the CPU of global rank 0; ``None``
    on the other ranks.

    A collective: call it on every rank. Weights are gathered one at a time and moved to
    the CPU at once, so a device holds at most one full weight beyond its shards (a 1M-wide
    encoder at d=2304 is 9.4 GB in fp32; the whole SAE would be twice that).
    """
    keep = dist.get_rank() == 0
    state: dict[str, Tensor] = {}
    for key, value in sae.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            state[key] = full.detach().to("cpu", copy=True)
        del full
    if not keep:
        return None
    with torch.device("meta"):  # no full-size initialisation: every tensor comes from ``state``
        plain = type(sae)(**sae.init_args())
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def whole_saes(module: nn.Module) -> list[tuple[str | None, Any]]:
    """``module``'s SAEs as ``(name, sae)`` pairs (a packed sweep's members, else ``(None, sae)``),
    a latent-sharded SAE gathered whole by :func:`gathered_sae`: rank 0 gets the plain copy,
    the other ranks ``None``. A collective when the SAE is sharded: call it on every rank."""
    named = module.named_saes() if hasattr(module, "named_saes") else [(None, module.sae)]
    if is_sharded(module.sae):
        return [(named[0][0], gathered_sae(module.sae))]
    return named


def close_process_group() -> None:
    """Destroy the process groups of a multi-process run, and let their threads go.

    Lightning's strategies leave the default group alive, and a gloo group whose worker
    threads are still running when the interpreter shuts down aborts the process (SIGABRT,
    "terminate called without an active exception") after a run that finished, turning its
    exit status into a failure. ``destroy_process_group`` alone is not enough under the
    model-parallel strategy: each ``DeviceMesh`` keeps its groups in a registry, and meshes
    outlive the run in DTensor's caches, so the groups would still be freed (and their
    threads stopped) only during interpreter shutdown.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    for obj in gc.get_objects():
        # A type check, not isinstance: some torch objects warn when isinstance probes them.
        if issubclass(type(obj), DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()
    gc.collect()


_closing_at_exit = False


def close_process_group_at_exit() -> None:
    """Run :func:`close_process_group` when the interpreter exits (registered once).

    ``atexit`` handlers run while the interpreter is still whole, so a script that builds
    its own multi-process ``Trainer`` (not through the CLI, which closes the group itself)
    exits cleanly too.
    """
    global _closing_at_exit
    if not _closing_at_exit:
        atexit.register(close_process_group)
        _closing_at_exit = True
