"""The optimizers the training module can build: torch Adam, or bitsandbytes' 8-bit Adam.

8-bit Adam stores both moments of a matrix as ``uint8`` codes with one float32 scale per
block of 256 values (about 2.03 bytes a parameter instead of 8), which is what lets a
wide dictionary's optimizer state fit next to its weights on one GPU. On CPU it runs, but
slower than torch's fused Adam: its value is memory on an accelerator.

Only matrices get 8-bit state. Every parameter with fewer than two dimensions (the
threshold, ``b_enc``, ``b_dec``) keeps float32 moments: the threshold's updates are small
and quantised moments would round them away, and vectors cost ``8 * d_sae`` bytes, nothing
next to the matrices. bitsandbytes' own rule (32-bit state below ``min_8bit_size``, 4096
elements) would not protect them: a threshold of d_sae = 16384 latents is above it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from gs_lightning.errors import ConfigError

OptimizerName = Literal["adam", "adam8bit"]
OPTIMIZERS: tuple[str, ...] = ("adam", "adam8bit")


def _bnb_adam8bit() -> type:
    """bitsandbytes' 8-bit Adam class, or a ConfigError that says how to get it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(
            "model.optimizer='adam8bit' needs bitsandbytes, which is not installed: "
            "pip install 'gs-lightning[bnb]' (or pip install bitsandbytes), or set model.optimizer: adam"
        ) from err
    return bnb.optim.Adam8bit


def build_optimizer(
    name: str, params: Iterable[Any], lr: float, betas: tuple[float, float], eps: float, fused: bool
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (tensors or parameter-group dicts).

    ``fused`` picks torch's fused Adam kernel (``adam`` only). With ``adam8bit``, matrices
    get blockwise 8-bit moments and every parameter of fewer than two dimensions float32
    moments; parameter groups are kept as given (one per SAE in a packed sweep).
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "adam8bit":
        base = _bnb_adam8bit()
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        vectors = [p for g in groups for p in g["params"] if p.dim() < 2]
        return _with_fp32_vectors(base)(groups, vectors, lr=lr, betas=betas, eps=eps)
    raise ConfigError(f"model.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def _with_fp32_vectors(base: type) -> type:
    """A subclass of bitsandbytes' optimizer ``base`` that keeps the given parameters' state
    in float32.

    bitsandbytes' per-parameter override (``GlobalOptimManager``) is a process-wide
    singleton keyed by ``id(param)``; this keeps the choice on the optimizer instead.
    """

    class Adam8bitFp32Vectors(base):  # type: ignore[misc, valid-type]
        def __init__(self, params: list[dict[str, Any]], fp32_params: list[Tensor], **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            self._fp32_ids = {id(p) for p in fp32_params}

        def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
            config = super().get_config(gindex, pindex, group)
            if id(group["params"][pindex]) in self._fp32_ids:
                config["optim_bits"] = 32
            return config

    return Adam8bitFp32Vectors


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by dtype (e.g. ``{"torch.uint8": ..., "torch.float32": ...}``),
    step counters of fewer than two elements left out."""
    total: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.numel() > 1:
                key = str(value.dtype)
                total[key] = total.get(key, 0) + value.numel() * value.element_size()
    return total
