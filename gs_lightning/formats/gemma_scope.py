"""Gemma Scope's release layout: ``layer_{L}/width_{W}/average_l0_{N}/params.npz``.

The npz holds float32 ``W_enc [d, d_sae]``, ``W_dec [d_sae, d]``, ``b_enc``, ``b_dec`` and
``threshold``. Only JumpReLU can be expressed; a ReLU SAE is a JumpReLU with threshold 0.
It is read without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gs_lightning.errors import ConfigError
from gs_lightning.formats.base import ReleaseFormat
from gs_lightning.formats.files import write_file
from gs_lightning.formats.jumprelu import GEMMA_SCOPE_KEYS, build_jumprelu, check_jumprelu, jumprelu_tensors
from gs_lightning.formats.naming import width_label
from gs_lightning.saes import SAE, JumpReLUSAE

PARAMS = "params.npz"


def gemma_scope_folder(layer: int, d_sae: int, average_l0: float) -> str:
    """``layer_{L}/width_{W}/average_l0_{N}``: where Gemma Scope puts one SAE in a release."""
    return f"layer_{layer}/width_{width_label(d_sae)}/average_l0_{round(average_l0)}"


def load_gemma_scope(path: str | Path) -> JumpReLUSAE:
    """Load a Gemma Scope ``params.npz`` as a :class:`JumpReLUSAE` (raw threshold)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such file") from err
    except ValueError as err:  # object arrays need pickle, which is refused
        raise ConfigError(f"{path}: refused, it holds pickled/object arrays ({err})") from err
    except (OSError, EOFError) as err:
        raise ConfigError(f"{path}: not a readable .npz file ({err})") from err
    missing = [k for k in GEMMA_SCOPE_KEYS if k not in arrays]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing} (found {sorted(arrays)})")
    tensors = {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in GEMMA_SCOPE_KEYS}
    return build_jumprelu(tensors, path)


def export_gemma_scope(
    sae: SAE, root: str | Path, layer: int, average_l0: float, folder_name: str | None = None
) -> Path:
    """Write ``root/layer_{L}/width_{W}/average_l0_{N}/params.npz`` (or ``root/folder_name/params.npz``);
    return the file's path."""
    folder = Path(root) / (folder_name or gemma_scope_folder(layer, sae.d_sae, average_l0))
    return FORMAT.write(sae, folder)


class GemmaScope(ReleaseFormat):
    """Gemma Scope's ``params.npz`` (or the folder holding one)."""

    name = "gemma_scope"
    description = "params.npz release layout"

    def claims(self, path: Path) -> bool:
        return path.name == PARAMS or (path / PARAMS).is_file()

    def read(self, path: Path) -> SAE:
        return load_gemma_scope(path if path.name == PARAMS else path / PARAMS)

    def check(self, sae: SAE) -> None:
        if sae.W_skip is not None:
            raise ConfigError("a skip-transcoder has no place in Gemma Scope's params.npz (Gemma 2's release has "
                              "no skip path; gemma_scope_2's layout has one)")
        check_jumprelu(sae, self.name)

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """Write ``path/params.npz``; return its path (the npz carries no metadata)."""
        self.check(sae)
        arrays = {k: v.numpy() for k, v in jumprelu_tensors(sae).items()}
        return write_file(Path(path) / PARAMS, lambda handle: np.savez(handle, **arrays))

    def release_folder(self, sae: SAE, layer: int, average_l0: float, site: str | None) -> str:
        return gemma_scope_folder(layer, sae.d_sae, average_l0)


FORMAT = GemmaScope()
