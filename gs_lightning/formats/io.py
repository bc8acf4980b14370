"""Saving and loading SAEs: :func:`save_sae` writes gs_lightning's own folder, :func:`load_sae`
reads any registered format (:mod:`gs_lightning.formats`).

gs_lightning's own format is ``sae.safetensors`` + ``config.json`` in one folder
(:mod:`gs_lightning.formats.native`). :func:`load_sae` also reads a Gemma Scope
``params.npz``, a Gemma Scope 2 folder (``params.safetensors`` + ``config.json``), an
SAELens folder and circuit-tracer's CLT folder. Nothing here unpickles.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from gs_lightning.errors import ConfigError
from gs_lightning.formats import format_for
from gs_lightning.formats.files import write_folder
from gs_lightning.formats.gemma_scope import load_gemma_scope
from gs_lightning.formats.gemma_scope_2 import (
    GEMMA_SCOPE_2_NAMES,
    GEMMA_SCOPE_2_WEIGHTS,
    load_gemma_scope_2,
)
from gs_lightning.formats.jumprelu import GEMMA_SCOPE_KEYS
from gs_lightning.formats.native import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    load_sae_config,
    plain_scale,
    save_sae,
)
from gs_lightning.formats.saelens import (
    SAELENS_ARCHITECTURES,
    SAELENS_CFG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    load_saelens,
)
from gs_lightning.saes import SAE

# Importable from here as they always were; each now lives with its format.
__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "GEMMA_SCOPE_2_NAMES", "GEMMA_SCOPE_2_WEIGHTS", "GEMMA_SCOPE_KEYS",
    "SAELENS_ARCHITECTURES", "SAELENS_CFG", "SAELENS_SPARSITY", "SAELENS_WEIGHTS", "WEIGHTS_FILE",
    "load_gemma_scope", "load_gemma_scope_2", "load_sae", "load_sae_config", "load_saelens", "plain_scale",
    "sae_paths", "save_sae", "write_folder",
]


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from any registered format, without pickle.

    ``path`` is a folder saved by :func:`save_sae` (safetensors + JSON), a Gemma Scope
    ``params.npz`` (or the folder holding one), a Gemma Scope 2 ``params.safetensors`` (or
    its folder), an SAELens folder (``cfg.json``) or circuit-tracer's cross-layer transcoder
    folder (``W_enc_0.safetensors``, ...); :func:`gs_lightning.formats.format_for` tells which.
    """
    path = Path(path)
    return format_for(path).read(path).to(device)


def sae_paths(saes: str | list[str], key: str = "saes") -> list[str]:
    """Saved-SAE paths as a command line gives them: one path, a list of paths, or glob
    patterns (``runs/*/sae``, quoted on the shell), patterns expanded in sorted order; a
    pattern that matches nothing, or no path at all, is a ConfigError naming ``key``."""
    paths: list[str] = []
    for item in [saes] if isinstance(saes, str) else list(saes):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"{key}: the pattern {item!r} matches no path")
            paths += matches
        else:
            paths.append(item)
    if not paths:
        raise ConfigError(f"{key}: give at least one SAE folder")
    return paths
