"""Export to and import from the formats the ecosystem reads: Gemma Scope and SAELens.

* Gemma Scope release layout: ``layer_{L}/width_{W}/average_l0_{N}/params.npz`` with
  float32 ``W_enc [d, d_sae]``, ``W_dec [d_sae, d]``, ``b_enc``, ``b_dec``, ``threshold``.
  Only JumpReLU can be expressed; a ReLU SAE is a JumpReLU with threshold 0.
* SAELens folder: ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``metadata`` with TransformerLens
  hook names) + ``sae_weights.safetensors``, and optionally ``sparsity.safetensors``
  (log10 feature density).

Exports take an SAE whose input scale is already folded in (what :func:`gs_lightning.load_sae`
returns), so the written weights read raw activations. Nothing here unpickles.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gs_lightning.errors import ConfigError
from gs_lightning.io import (  # noqa: F401  (the readers are re-exported here, next to the writers)
    GEMMA_SCOPE_KEYS,
    SAELENS_CFG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    load_gemma_scope,
    load_sae,
    load_sae_config,
    load_saelens,
    sae_paths,
    write_folder,
)
from gs_lightning.saes import SAE, ReLUSAE


def jumprelu_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAE as JumpReLU tensors (float32), or a ConfigError if it is not one."""
    tensors = {k: v.detach().float().cpu() for k, v in sae.canonical_state_dict().items()}
    if isinstance(sae, ReLUSAE):
        tensors["threshold"] = torch.zeros(sae.d_sae)  # relu(pre) == pre * H(pre - 0)
    if set(tensors) != set(GEMMA_SCOPE_KEYS):
        raise ConfigError(
            f"{type(sae).__name__} cannot be written as a JumpReLU (it has {sorted(tensors)}); "
            "the Gemma Scope format holds JumpReLU (and ReLU) SAEs only"
        )
    return tensors


def width_label(d_sae: int) -> str:
    """Gemma Scope's width folder name, in floored thousands: 16384 -> '16k', 65536 -> '65k',
    1048576 -> '1m' (widths under 1,000 keep their number)."""
    if d_sae >= 1_000_000:
        return f"{d_sae // 1_000_000}m"
    return f"{d_sae // 1000}k" if d_sae >= 1000 else str(d_sae)


def gemma_scope_folder(layer: int, d_sae: int, average_l0: float) -> str:
    """``layer_{L}/width_{W}/average_l0_{N}``: where Gemma Scope puts one SAE in a release."""
    return f"layer_{layer}/width_{width_label(d_sae)}/average_l0_{round(average_l0)}"


def export_gemma_scope(
    sae: SAE, root: str | Path, layer: int, average_l0: float, folder_name: str | None = None
) -> Path:
    """Write ``root/layer_{L}/width_{W}/average_l0_{N}/params.npz`` (or ``root/folder_name/params.npz``);
    return the file's path."""
    folder = Path(root) / (folder_name or gemma_scope_folder(layer, sae.d_sae, average_l0))
    arrays = {k: v.numpy() for k, v in jumprelu_tensors(sae).items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.npz"
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_saelens(
    sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None, feature_density: Tensor | None = None
) -> Path:
    """Write an SAELens folder; ``metadata`` uses gs_lightning's keys (model, site, ...)."""
    if sae.is_transcoder:
        raise ConfigError(
            f"a transcoder ({sae.d_in} -> {sae.d_out}) has no SAELens SAE layout here; "
            "export it in the Gemma Scope layout (params.npz), which holds transcoders too"
        )
    architecture = "standard" if isinstance(sae, ReLUSAE) else "jumprelu"
    tensors = jumprelu_tensors(sae)
    if architecture == "standard":
        tensors.pop("threshold")
    meta = metadata or {}
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # Gemma Scope's encoder does not subtract b_dec
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": _saelens_metadata(meta),
    }
    files: dict[str, Any] = {SAELENS_CFG: cfg, SAELENS_WEIGHTS: tensors}
    if feature_density is not None:
        files[SAELENS_SPARSITY] = {"sparsity": feature_density.float().clamp(min=1e-10).log10()}
    return write_folder(path, files)


def _saelens_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    site = meta.get("site")
    layer = _site_layer(site)
    return {
        "model_name": meta.get("model"),
        "hook_name": site,  # our sites are TransformerLens hook names already
        "hook_layer": layer,
        "context_size": meta.get("context_size"),
        "prepend_bos": True,
        "exclude_special_tokens": True,  # BOS/EOS/pad were excluded in training
        "dataset_path": meta.get("text"),
        "trained_with": "gs_lightning",
    }


def _site_layer(site: str | None) -> int | None:
    parts = (site or "").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def export(
    sae: str | list[str],
    format: Literal["gemma_scope", "saelens"],
    out: str,
    layer: int | None = None,
    average_l0: float | None = None,
) -> list[Path]:
    """Export saved SAE folders (from ``callbacks.SaveSAE``) to Gemma Scope or SAELens layout.

    Args:
        sae: The saved SAE folder: one path, a list ``"[a, b]"``, or a quoted glob ``"runs/*/sae"``.
        format: ``gemma_scope`` (params.npz release layout) or ``saelens`` (cfg.json folder).
        out: Release root (gemma_scope); the SAELens folder to write (saelens, one SAE) or
            the folder that receives one SAELens folder per SAE, named after it (several).
        layer: Layer for the release path (one SAE only); default: parsed from the SAE's site.
        average_l0: L0 for the release path (one SAE only); default: the run's final val/l0
            (or train/l0).
    """
    paths = sae_paths(sae, "sae")
    if len(paths) > 1 and (layer is not None or average_l0 is not None):
        raise ConfigError(f"--layer and --average_l0 name one SAE's release path; --sae gave {len(paths)}")
    loaded = [(path, load_sae(path), load_sae_config(path).get("metadata", {})) for path in paths]  # names a bad one
    if format == "saelens":
        targets = [Path(out)] if len(paths) == 1 else [Path(out) / _export_name(path) for path in paths]
    else:
        places = [_release_place(path, model, meta, layer, average_l0) for path, model, meta in loaded]
        targets = [Path(out) / gemma_scope_folder(*place) for place in places]
    _refuse_clashes(paths, targets)  # before anything is written
    written = []
    for i, ((path, model, meta), target) in enumerate(zip(loaded, targets)):
        if format == "saelens":
            written.append(export_saelens(model, target, meta))
        else:
            written.append(export_gemma_scope(model, out, places[i][0], places[i][2]))
        print(f"wrote {written[-1]}")
    return written


def _release_place(path: str, sae: SAE, meta: dict[str, Any], layer: int | None,
                   average_l0: float | None) -> tuple[int, int, float]:
    """(layer, d_sae, average L0) of the SAE's Gemma Scope folder, from the options or its metadata."""
    layer = _site_layer(meta.get("site")) if layer is None else layer
    metrics = meta.get("final_metrics", {})
    average_l0 = average_l0 if average_l0 is not None else metrics.get("val/l0", metrics.get("train/l0"))
    if layer is None or average_l0 is None:
        raise ConfigError(f"{path}: give --layer and --average_l0 (the SAE's metadata does not record them)")
    return layer, sae.d_sae, average_l0


def _export_name(path: str) -> str:
    """A folder name for one of several exported SAEs: its folder, or its parent's for ``.../sae``."""
    parts = Path(path).resolve().parts
    return parts[-2] if parts[-1] == "sae" and len(parts) > 1 else parts[-1]


def _refuse_clashes(paths: list[str], targets: list[Path]) -> None:
    seen: dict[Path, str] = {}
    for path, target in zip(paths, targets):
        if target in seen:
            raise ConfigError(f"{seen[target]} and {path} would both be written to {target}; export them separately")
        seen[target] = path


def export_main(args: list[str]) -> list[Path]:
    """Entry point of ``python -m gs_lightning export``; returns the written paths."""
    from jsonargparse import CLI

    return CLI(export, args=args, as_positional=False, prog="python -m gs_lightning export")
