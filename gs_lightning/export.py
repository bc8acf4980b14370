"""Export to and import from the formats the ecosystem reads: Gemma Scope and SAELens
(and, through :mod:`gs_lightning.release.circuit_tracer`, circuit-tracer's CLT folder).

* Gemma Scope release layout: ``layer_{L}/width_{W}/average_l0_{N}/params.npz`` with
  float32 ``W_enc [d, d_sae]``, ``W_dec [d_sae, d]``, ``b_enc``, ``b_dec``, ``threshold``.
  Only JumpReLU can be expressed; a ReLU SAE is a JumpReLU with threshold 0.
* Gemma Scope 2 release layout (as SAELens' ``gemma_3`` loader reads it):
  ``{kind}/layer_{L}_width_{W}_l0_{N}[_affine]/params.safetensors`` with float32 ``w_enc``,
  ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and, for a skip-transcoder ("affine"),
  ``affine_skip_connection [d_in, d_out]``, next to a ``config.json`` (``architecture:
  jump_relu``, ``model_name``, ``hf_hook_point_in``/``_out``, ``affine_connection``). Gemma
  Scope 2 names its L0s small/medium/big; we write the rounded number.
* SAELens folder: ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``metadata`` with TransformerLens
  hook names) + ``sae_weights.safetensors``, and optionally ``sparsity.safetensors``
  (log10 feature density). JumpReLU (and ReLU) SAEs, transcoders (``jumprelu_transcoder``,
  ``transcoder``, with ``d_out``) and skip-transcoders (``jumprelu_skip_transcoder``,
  ``skip_transcoder``, ``W_skip [d_out, d_in]``: SAELens computes ``x @ W_skip.T``).

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
    GEMMA_SCOPE_2_NAMES,
    GEMMA_SCOPE_2_WEIGHTS,
    GEMMA_SCOPE_KEYS,
    SAELENS_CFG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    load_gemma_scope,
    load_gemma_scope_2,
    load_sae,
    load_sae_config,
    load_saelens,
    sae_paths,
    write_folder,
)
from gs_lightning.release.circuit_tracer import export_circuit_tracer
from gs_lightning.saes import SAE, CrossLayerTranscoder, ReLUSAE


def jumprelu_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAE as JumpReLU tensors (float32; ``W_skip [d_in, d_out]`` too for a
    skip-transcoder), or a ConfigError if it is not one."""
    tensors = {k: v.detach().float().cpu() for k, v in sae.canonical_state_dict().items()}
    if isinstance(sae, ReLUSAE):
        tensors["threshold"] = torch.zeros(sae.d_sae)  # relu(pre) == pre * H(pre - 0)
    if set(tensors) - {"W_skip"} != set(GEMMA_SCOPE_KEYS):
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
    if sae.W_skip is not None:
        raise ConfigError("a skip-transcoder has no place in Gemma Scope's params.npz (Gemma 2's release has no "
                          "skip path); export it as gemma_scope_2 or saelens")
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


# Gemma Scope 2's folder prefix for each kind of site (a transcoder's is "transcoder").
GEMMA_SCOPE_2_KINDS = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "attn.hook_z": "attn_out"}
# The Hugging Face module outputs/inputs Gemma Scope 2 names for our TransformerLens sites (Gemma 3).
HF_HOOK_POINTS = {"hook_resid_post": "model.layers.{L}.output",
                  "hook_mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
                  "hook_mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
                  "attn.hook_z": "model.layers.{L}.self_attn.o_proj.input"}


def gemma_scope_2_folder(sae: SAE, layer: int, average_l0: float, site: str | None = None) -> str:
    """``{kind}/layer_{L}_width_{W}_l0_{N}[_affine]``: where Gemma Scope 2 puts one dictionary
    (``kind`` is ``transcoder`` for a transcoder, else from the site: ``resid_post``,
    ``mlp_out``, ``attn_out``)."""
    hook = (site or "").split(".", 2)[-1]
    kind = "transcoder" if sae.is_transcoder else GEMMA_SCOPE_2_KINDS.get(hook)
    if kind is None:
        raise ConfigError(f"site {site!r} has no Gemma Scope 2 folder kind (resid_post, mlp_out, attn_out); "
                          "give folder_name")
    affine = "_affine" if sae.W_skip is not None else ""
    return f"{kind}/layer_{layer}_width_{width_label(sae.d_sae)}_l0_{round(average_l0)}{affine}"


def export_gemma_scope_2(
    sae: SAE, root: str | Path, layer: int, average_l0: float, metadata: dict[str, Any] | None = None,
    folder_name: str | None = None,
) -> Path:
    """Write ``root/{kind}/layer_{L}_width_{W}_l0_{N}[_affine]/params.safetensors`` and its
    ``config.json`` (or into ``root/folder_name``); return the weights file's path.
    ``metadata`` uses gs_lightning's keys (model, site, target_site)."""
    meta = metadata or {}
    folder = Path(root) / (folder_name or gemma_scope_2_folder(sae, layer, average_l0, meta.get("site")))
    tensors = {GEMMA_SCOPE_2_NAMES[k]: v for k, v in jumprelu_tensors(sae).items()}
    config = {
        "architecture": "jump_relu",
        "model_name": meta.get("model") or "",  # SAELens' loader reads it as a string
        "hf_hook_point_in": _hf_hook_point(meta.get("site"), layer),
        **({"hf_hook_point_out": _hf_hook_point(meta.get("target_site"), layer)} if sae.is_transcoder else {}),
        **({"affine_connection": sae.W_skip is not None} if sae.is_transcoder else {}),
        "width": sae.d_sae,
        "l0": average_l0,
        "trained_with": "gs_lightning",
    }
    write_folder(folder, {GEMMA_SCOPE_2_WEIGHTS: tensors, "config.json": config})
    return folder / GEMMA_SCOPE_2_WEIGHTS


def _hf_hook_point(site: str | None, layer: int) -> str | None:
    """Gemma Scope 2's name for a site: a Hugging Face module path with ``.output``/``.input``."""
    if site is None:
        return None
    if ":" in site:  # already a module path: "<path>:output"
        return site.replace(":", ".")
    hook = site.split(".", 2)[-1]
    return HF_HOOK_POINTS[hook].format(L=layer) if hook in HF_HOOK_POINTS else site


def export_saelens(
    sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None, feature_density: Tensor | None = None
) -> Path:
    """Write an SAELens folder; ``metadata`` uses gs_lightning's keys (model, site, ...).

    A transcoder is written as SAELens' ``jumprelu_transcoder`` (or ``transcoder`` for a
    ReLU one), a skip-transcoder as ``jumprelu_skip_transcoder`` (``skip_transcoder``).
    """
    relu = isinstance(sae, ReLUSAE)
    tensors = jumprelu_tensors(sae)
    if relu:
        tensors.pop("threshold")
    if sae.is_transcoder:
        architecture = ("" if relu else "jumprelu_") + ("skip_" if sae.W_skip is not None else "") + "transcoder"
        if sae.W_skip is not None:
            tensors["W_skip"] = tensors["W_skip"].t().contiguous()  # SAELens: [d_out, d_in]
    else:
        architecture = "standard" if relu else "jumprelu"
    meta = metadata or {}
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out} if sae.is_transcoder else {}),
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
        **({"hook_name_out": meta["target_site"]} if meta.get("target_site") else {}),
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
    format: Literal["gemma_scope", "gemma_scope_2", "saelens", "circuit_tracer"],
    out: str,
    layer: int | None = None,
    average_l0: float | None = None,
) -> list[Path]:
    """Export saved SAE folders (from ``callbacks.SaveSAE``) to Gemma Scope, Gemma Scope 2 or
    SAELens layout, or saved cross-layer transcoders to circuit-tracer's.

    Args:
        sae: The saved SAE folder: one path, a list ``"[a, b]"``, or a quoted glob ``"runs/*/sae"``.
        format: ``gemma_scope`` (params.npz release layout), ``gemma_scope_2`` (params.safetensors
            release layout; the one that holds skip-transcoders), ``saelens`` (cfg.json folder) or
            ``circuit_tracer`` (a CrossLayerTranscoder as W_enc_{i}/W_dec_{i}.safetensors + config.yaml,
            the folder circuit-tracer's load_clt reads).
        out: Release root (gemma_scope, gemma_scope_2); the folder to write (saelens, circuit_tracer; one
            SAE) or the folder that receives one such folder per SAE, named after it (several).
        layer: Layer for the release path (one SAE only); default: parsed from the SAE's site.
        average_l0: L0 for the release path (one SAE only); default: the run's final val/l0
            (or train/l0).
    """
    paths = sae_paths(sae, "sae")
    if len(paths) > 1 and (layer is not None or average_l0 is not None):
        raise ConfigError(f"--layer and --average_l0 name one SAE's release path; --sae gave {len(paths)}")
    loaded = [(path, load_sae(path), load_sae_config(path).get("metadata", {})) for path in paths]  # names a bad one
    for path, model, _ in loaded:  # before anything is written
        _refuse_kind(path, model, format)
    if format in ("saelens", "circuit_tracer"):
        targets = [Path(out)] if len(paths) == 1 else [Path(out) / _export_name(path) for path in paths]
    else:
        places = [_release_place(path, model, meta, layer, average_l0) for path, model, meta in loaded]
        targets = [Path(out) / (gemma_scope_folder(*place) if format == "gemma_scope" else
                                gemma_scope_2_folder(model, place[0], place[2], meta.get("site")))
                   for place, (_, model, meta) in zip(places, loaded)]
    _refuse_clashes(paths, targets)  # before anything is written
    written = []
    for i, ((path, model, meta), target) in enumerate(zip(loaded, targets)):
        if format == "saelens":
            written.append(export_saelens(model, target, meta))
        elif format == "circuit_tracer":
            written.append(export_circuit_tracer(model, target, meta))
        elif format == "gemma_scope_2":
            written.append(export_gemma_scope_2(model, out, places[i][0], places[i][2], meta))
        else:
            written.append(export_gemma_scope(model, out, places[i][0], places[i][2]))
        print(f"wrote {written[-1]}")
    return written


def _refuse_kind(path: str, sae: SAE, format: str) -> None:
    """circuit_tracer holds cross-layer transcoders only, and the other formats one site's dictionary."""
    clt = isinstance(sae, CrossLayerTranscoder)
    if format == "circuit_tracer" and not clt:
        raise ConfigError(f"{path}: a {type(sae).__name__} cannot be written as circuit_tracer, which holds "
                          "cross-layer transcoders only; use gemma_scope, gemma_scope_2 or saelens")
    if format != "circuit_tracer" and sae.stacked_sites is not None:
        hint = "use --format circuit_tracer" if clt else "keep gs_lightning's own folder (load_sae reads it)"
        raise ConfigError(f"{path}: a {type(sae).__name__} over {sae.stacked_sites} stacked sites cannot be "
                          f"written as {format}, which holds one site's dictionary; {hint}")


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
