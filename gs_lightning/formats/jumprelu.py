"""JumpReLU tensors, the form Gemma Scope, Gemma Scope 2 and SAELens store: turning an SAE
into them (a ReLU SAE is a JumpReLU with threshold 0) and a :class:`JumpReLUSAE` back out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gs_lightning.errors import ConfigError
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def check_one_site(sae: SAE, format_name: str) -> None:
    """A ConfigError when ``sae`` stacks several sites (a CLT, a crosscoder): ``format_name``
    holds one site's dictionary."""
    if sae.stacked_sites is not None:
        raise ConfigError(f"a {type(sae).__name__} over {sae.stacked_sites} stacked sites cannot be written as "
                          f"{format_name}, which holds one site's dictionary")


def jumprelu_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAE as JumpReLU tensors (float32; ``W_skip [d_in, d_out]`` too for a
    skip-transcoder), or a ConfigError if it is not one."""
    tensors = {k: v.detach().float().cpu() for k, v in sae.canonical_state_dict().items()}
    if isinstance(sae, ReLUSAE):
        tensors["threshold"] = torch.zeros(sae.d_sae)  # relu(pre) == pre * H(pre - 0)
    _check_names(sae, set(tensors))
    return tensors


def check_jumprelu(sae: SAE, format_name: str) -> None:
    """A ConfigError unless ``sae`` is one site's JumpReLU (or ReLU) dictionary (looks at the
    tensors' names only: nothing is copied)."""
    check_one_site(sae, format_name)
    _check_names(sae, set(sae.canonical_state_dict()) | ({"threshold"} if isinstance(sae, ReLUSAE) else set()))


def _check_names(sae: SAE, names: set[str]) -> None:
    if names - {"W_skip"} != set(GEMMA_SCOPE_KEYS):
        raise ConfigError(
            f"{type(sae).__name__} cannot be written as a JumpReLU (it has {sorted(names)}); "
            "the Gemma Scope format holds JumpReLU (and ReLU) SAEs only"
        )


def build_jumprelu(tensors: dict[str, Tensor], source: Path, transcoder: bool = False) -> JumpReLUSAE:
    """A :class:`JumpReLUSAE` (raw threshold, in eval mode) holding ``tensors`` read from ``source``."""
    check_shapes(tensors, source)
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]  # a transcoder (e.g. Gemma Scope's MLP transcoders) may differ
    sae = JumpReLUSAE(d_in, d_sae, threshold_parameterization="raw", fused=False,
                      d_out=d_out if transcoder or d_out != d_in or "W_skip" in tensors else None,
                      skip_connection="W_skip" in tensors, subtract_decoder_bias=False)
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def check_shapes(tensors: dict[str, Tensor], source: Path) -> None:
    """A ConfigError naming ``source`` when the tensors' shapes do not fit one another."""
    if tensors["W_enc"].dim() != 2:
        raise ConfigError(f"{source}: W_enc must be 2-D [d_in, d_sae], got {list(tensors['W_enc'].shape)}")
    d_in, d_sae = tensors["W_enc"].shape
    # b_dec sets the output width: d_in for an SAE, the target site's for a transcoder.
    d_out = tensors["b_dec"].shape[0] if tensors["b_dec"].dim() == 1 else d_in
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,), "W_skip": (d_in, d_out)}
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ConfigError(f"{source}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)}")
