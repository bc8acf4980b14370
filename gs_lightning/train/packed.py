"""Many SAEs per read: K SAEs of one shape trained on the same batches (a packed sweep).

Each member stays an ordinary :class:`~gs_lightning.saes.SAE` with its own parameters, so
it gets its own Adam parameter group, its own gradient clipping and its own saved folder.
Only the compute is packed: JumpReLU members run through one batched fused step (their
vectors stacked at each step, their matrices used in place); other variants run their
own ``training_output`` one after another on the shared batch.

A sweep is a mapping from a swept name to one value per member, e.g.
``{"sparsity_coefficient": [1e-4, 3e-4, 1e-3]}``. Names are constructor arguments of the
SAE, ``seed`` (the seed its weights are initialised from) or ``lr`` (its learning rate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gs_lightning.errors import ConfigError
from gs_lightning.kernels.fused import Workspace, fused_packed_jumprelu_loss
from gs_lightning.saes import SAE, JumpReLUSAE, TrainOutput

MODULE_KEYS = ("seed", "lr")
"""Swept names that are not SAE constructor arguments."""


def metric_key(key: str, name: str | None) -> str:
    """``key`` for a lone SAE, ``key/<name>`` for a member of a packed sweep."""
    return key if name is None else f"{key}/{name}"


def sweep_members(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One ``{name: value}`` dict per member; every list must have the same length."""
    if not sweep:
        raise ConfigError("model.sweep is empty: give at least one name with a list of values")
    lengths = {key: len(values) for key, values in sweep.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ConfigError(f"model.sweep lists must be non-empty and of equal length, got lengths {lengths}")
    count = next(iter(lengths.values()))
    return [{key: values[i] for key, values in sweep.items()} for i in range(count)]


def member_name(values: dict[str, Any]) -> str:
    """The member's name in metric keys and folder names, e.g. ``sparsity_coefficient=0.0003``."""
    return ",".join(f"{key}={value}" for key, value in values.items())


class PackedSAE(nn.Module):
    """K SAEs of one class and shape, trained from the same batches.

    Args:
        members: The SAEs; same class, ``d_in`` and ``d_sae``.
        names: One unique name per member.
    """

    def __init__(self, members: list[SAE], names: list[str]) -> None:
        super().__init__()
        if len(members) != len(names) or len(set(names)) != len(names):
            raise ConfigError(f"packed SAEs need one unique name each, got {names}")
        shapes = {(type(m), m.d_in, m.d_sae, m.d_out) for m in members}
        if len(shapes) != 1:
            raise ConfigError(f"packed SAEs must share class, d_in and d_sae, got {sorted(map(str, shapes))}")
        self.members = nn.ModuleList(members)
        self.names = list(names)
        self.d_in, self.d_sae, self.d_out = members[0].d_in, members[0].d_sae, members[0].d_out
        self._workspace = Workspace()

    def named_members(self) -> list[tuple[str, SAE]]:
        """``(name, sae)`` for every member, in order."""
        return list(zip(self.names, self.members))

    def training_outputs(self, x: Tensor, warmup: float = 1.0, target: Tensor | None = None) -> list[TrainOutput]:
        """Each member's :meth:`SAE.training_output` on the shared batch ``x`` (and ``target``,
        for transcoders)."""
        # The packed kernel has no skip term: skip-transcoders take their own (fused) steps.
        if all(isinstance(m, JumpReLUSAE) and m.uses_fused(x) and m.W_skip is None for m in self.members):
            return self._fused_jumprelu_outputs(x, warmup, target)
        return [m.training_output(x, warmup, target) for m in self.members]

    def _fused_jumprelu_outputs(self, x: Tensor, warmup: float, target: Tensor | None) -> list[TrainOutput]:
        members: list[JumpReLUSAE] = list(self.members)  # type: ignore[arg-type]
        # Vectors are stacked (a small copy); the matrices go in as the members' own tensors.
        b_enc = torch.stack([m.encoder_bias() for m in members])
        b_dec, threshold = (torch.stack([getattr(m, name) for m in members]) for name in ("b_dec", "threshold"))
        bandwidth = torch.tensor([m.bandwidth for m in members], device=x.device)
        token_l0 = any(m.needs_token_l0 for m in members)
        mse, counts, tokens, x_hat = fused_packed_jumprelu_loss(
            x, [m.W_enc for m in members], b_enc, [m.W_dec for m in members], b_dec, threshold, bandwidth,
            self._workspace, members[0].compute_dtype(x), target, token_l0=token_l0
        )
        return [m.fused_output(x, target, mse[k], counts[k], tokens[k], x_hat[k], warmup)
                for k, m in enumerate(members)]

    def before_optimizer_step(self) -> None:
        """Each member's own pre-step constraint (e.g. the decoder-row projection)."""
        for m in self.members:
            m.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Each member's own post-step constraint (e.g. renormalising decoder rows)."""
        for m in self.members:
            m.after_optimizer_step()

    def train(self, mode: bool = True) -> "PackedSAE":
        if not mode:
            self._workspace.clear()  # give the [K, batch, d_sae] buffers back while evaluating
        return super().train(mode)


def build_packed(template: SAE, sweep: dict[str, list[Any]]) -> tuple[PackedSAE, list[float | None]]:
    """The members of ``sweep`` built like ``template`` (its class and other arguments).

    Member i is constructed under ``torch.manual_seed(seed_i)``: ``seed_i`` is the sweep's
    ``seed`` value, or else one seed drawn from the global generator and shared by all, so
    members differ only in what is swept. Returns the packed SAEs and each member's lr
    (``None``: the module's).
    """
    base_args = template.init_args()
    unknown = sorted(set(sweep) - set(base_args) - set(MODULE_KEYS))
    if unknown:
        raise ConfigError(
            f"model.sweep: {unknown} are neither arguments of {type(template).__name__} "
            f"({sorted(base_args)}) nor one of {list(MODULE_KEYS)}"
        )
    shared_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    members, names, lrs = [], [], []
    for values in sweep_members(sweep):
        args = {**base_args, **{k: v for k, v in values.items() if k not in MODULE_KEYS}}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(values.get("seed", shared_seed)))
            try:
                members.append(type(template)(**args))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"model.sweep member {member_name(values)}: {err}") from err
        names.append(member_name(values))
        lrs.append(float(values["lr"]) if "lr" in values else None)
    return PackedSAE(members, names), lrs
