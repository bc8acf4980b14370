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

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from gs_lightning.errors import ConfigError
from gs_lightning.io import load_sae, load_sae_config, write_folder
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"


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


def export_gemma_scope(sae: SAE, root: str | Path, layer: int, average_l0: float) -> Path:
    """Write ``root/layer_{L}/width_{W}/average_l0_{N}/params.npz``; return the file's path."""
    folder = Path(root) / f"layer_{layer}" / f"width_{width_label(sae.d_sae)}" / f"average_l0_{round(average_l0)}"
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
    return _build_jumprelu(tensors, path)


def _build_jumprelu(tensors: dict[str, Tensor], source: Path) -> JumpReLUSAE:
    _check_shapes(tensors, source)
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]  # a transcoder (e.g. Gemma Scope's MLP transcoders) may differ
    sae = JumpReLUSAE(d_in, d_sae, threshold_parameterization="raw", fused=False,
                      d_out=None if d_out == d_in else d_out)
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def _check_shapes(tensors: dict[str, Tensor], source: Path) -> None:
    if tensors["W_enc"].dim() != 2:
        raise ConfigError(f"{source}: W_enc must be 2-D [d_in, d_sae], got {list(tensors['W_enc'].shape)}")
    d_in, d_sae = tensors["W_enc"].shape
    # b_dec sets the output width: d_in for an SAE, the target site's for a transcoder.
    d_out = tensors["b_dec"].shape[0] if tensors["b_dec"].dim() == 1 else d_in
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,)}
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ConfigError(f"{source}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)}")


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


def load_saelens(path: str | Path) -> SAE:
    """Load an SAELens ``jumprelu`` or ``standard`` SAE folder (float32, on CPU)."""
    path = Path(path)
    cfg = _read_saelens_cfg(path)
    try:
        tensors = {k: v.float() for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path / SAELENS_WEIGHTS}: not a readable safetensors file ({err})") from err
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if cfg["architecture"] == "jumprelu" else [])
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ConfigError(f"{path / SAELENS_WEIGHTS}: missing {missing} for a {cfg['architecture']} SAE")
    tensors = {k: tensors[k] for k in needed}
    _check_shapes(tensors, path / SAELENS_WEIGHTS)
    if tuple(tensors["W_enc"].shape) != (cfg["d_in"], cfg["d_sae"]):
        raise ConfigError(f"{path}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but W_enc is "
                          f"{list(tensors['W_enc'].shape)}")
    if cfg.get("apply_b_dec_to_input", True):
        # (x - b_dec) W_enc + b_enc == x W_enc + (b_enc - b_dec W_enc): fold into b_enc.
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    if cfg["architecture"] == "jumprelu":
        return _build_jumprelu(tensors, path)
    sae = ReLUSAE(cfg["d_in"], cfg["d_sae"])
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def _read_saelens_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAELENS_CFG
    if not cfg_path.is_file():
        raise ConfigError(f"not an SAELens SAE: {cfg_path} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from err
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise ConfigError(f"{cfg_path}: missing key {key!r}")
    if cfg["architecture"] not in ("jumprelu", "standard"):
        raise ConfigError(f"{cfg_path}: architecture {cfg['architecture']!r} is not supported "
                          "(gs_lightning imports 'jumprelu' and 'standard')")
    if cfg.get("normalize_activations", "none") != "none":
        raise ConfigError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} needs a "
                          "scaling factor that is not in the folder; fold it into the weights first")
    return cfg


def export(
    sae: str,
    format: Literal["gemma_scope", "saelens"],
    out: str,
    layer: int | None = None,
    average_l0: float | None = None,
) -> Path:
    """Export a saved SAE folder (from ``callbacks.SaveSAE``) to Gemma Scope or SAELens layout.

    Args:
        sae: The saved SAE folder.
        format: ``gemma_scope`` (params.npz release layout) or ``saelens`` (cfg.json folder).
        out: Release root (gemma_scope) or the SAELens folder to write (saelens).
        layer: Layer for the release path; default: parsed from the SAE's site.
        average_l0: L0 for the release path; default: the run's final val/l0 (or train/l0).
    """
    loaded = load_sae(sae)  # first: it names a missing or broken folder clearly
    meta = load_sae_config(sae).get("metadata", {})
    if format == "saelens":
        path = export_saelens(loaded, out, meta)
    else:
        layer = _site_layer(meta.get("site")) if layer is None else layer
        metrics = meta.get("final_metrics", {})
        average_l0 = average_l0 if average_l0 is not None else metrics.get("val/l0", metrics.get("train/l0"))
        if layer is None or average_l0 is None:
            raise ConfigError(f"{sae}: give --layer and --average_l0 (the SAE's metadata does not record them)")
        path = export_gemma_scope(loaded, out, layer, average_l0)
    print(f"wrote {path}")
    return path


def export_main(args: list[str]) -> None:
    """Entry point of ``python -m gs_lightning export``."""
    from jsonargparse import CLI

    CLI(export, args=args, as_positional=False, prog="python -m gs_lightning export")
