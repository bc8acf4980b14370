"""The ``export`` command: saved SAEs written in the layouts other tools read, through the
format registry (:mod:`gs_lightning.formats`): Gemma Scope, Gemma Scope 2, SAELens and,
for a cross-layer transcoder, circuit-tracer's folder.

Exports take an SAE whose input scale is already folded in (what :func:`gs_lightning.load_sae`
returns), so the written weights read raw activations. Nothing here unpickles. The writers
and readers each format module defines are importable from here too, as they always were.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from gs_lightning import formats
from gs_lightning.errors import ConfigError
from gs_lightning.formats import ReleaseFormat
from gs_lightning.formats.circuit_tracer import export_circuit_tracer
from gs_lightning.formats.files import write_folder
from gs_lightning.formats.gemma_scope import (
    export_gemma_scope,
    gemma_scope_folder,
    load_gemma_scope,
)
from gs_lightning.formats.gemma_scope_2 import (
    GEMMA_SCOPE_2_KINDS,
    GEMMA_SCOPE_2_NAMES,
    GEMMA_SCOPE_2_WEIGHTS,
    HF_HOOK_POINTS,
    export_gemma_scope_2,
    gemma_scope_2_folder,
    load_gemma_scope_2,
)
from gs_lightning.formats.io import load_sae, sae_paths
from gs_lightning.formats.jumprelu import GEMMA_SCOPE_KEYS, jumprelu_tensors
from gs_lightning.formats.naming import site_layer, width_label
from gs_lightning.formats.native import load_sae_config
from gs_lightning.formats.saelens import (
    SAELENS_CFG,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    export_saelens,
    load_saelens,
)
from gs_lightning.saes import SAE

__all__ = [
    "GEMMA_SCOPE_2_KINDS", "GEMMA_SCOPE_2_NAMES", "GEMMA_SCOPE_2_WEIGHTS", "GEMMA_SCOPE_KEYS", "HF_HOOK_POINTS",
    "SAELENS_CFG", "SAELENS_SPARSITY", "SAELENS_WEIGHTS", "export", "export_circuit_tracer", "export_gemma_scope",
    "export_gemma_scope_2", "export_main", "export_parser", "export_saelens", "gemma_scope_2_folder",
    "gemma_scope_folder", "jumprelu_tensors", "load_gemma_scope", "load_gemma_scope_2", "load_sae",
    "load_sae_config", "load_saelens", "sae_paths", "width_label", "write_folder",
]
PROG = "python -m gs_lightning export"


def export(
    sae: str | list[str],
    format: str,
    out: str,
    layer: int | None = None,
    average_l0: float | None = None,
) -> list[Path]:
    """Export saved SAE folders (from ``callbacks.SaveSAE``) to Gemma Scope, Gemma Scope 2 or
    SAELens layout, or saved cross-layer transcoders to circuit-tracer's.

    Args:
        sae: The saved SAE folder: one path, a list ``"[a, b]"``, or a quoted glob ``"runs/*/sae"``.
        format: A registered format's name (``python -m gs_lightning export --help`` lists them).
        out: Release root (gemma_scope, gemma_scope_2); the folder to write (saelens, circuit_tracer; one
            SAE) or the folder that receives one such folder per SAE, named after it (several).
        layer: Layer for the release path (one SAE only); default: parsed from the SAE's site.
        average_l0: L0 for the release path (one SAE only); default: the run's final val/l0
            (or train/l0).
    """
    fmt = _export_format(format)
    paths = sae_paths(sae, "sae")
    if len(paths) > 1 and (layer is not None or average_l0 is not None):
        raise ConfigError(f"--layer and --average_l0 name one SAE's release path; --sae gave {len(paths)}")
    loaded = [(path, load_sae(path), load_sae_config(path).get("metadata", {})) for path in paths]  # names a bad one
    for path, model, _ in loaded:  # before anything is written
        _refuse(path, model, fmt)
    if isinstance(fmt, ReleaseFormat):
        options = [_release_place(path, meta, layer, average_l0) for path, _, meta in loaded]
        targets = [Path(out) / fmt.release_folder(model, opts["layer"], opts["average_l0"], meta.get("site"))
                   for opts, (_, model, meta) in zip(options, loaded)]
    else:
        options = [{} for _ in paths]
        targets = [Path(out)] if len(paths) == 1 else [Path(out) / _export_name(path) for path in paths]
    _refuse_clashes(paths, targets)  # before anything is written
    written = []
    for (_, model, meta), target, opts in zip(loaded, targets, options):
        written.append(fmt.write(model, target, metadata=meta, **opts))
        print(f"wrote {written[-1]}")
    return written


def _export_format(name: str) -> formats.Format:
    """The exported format called ``name``, or a ConfigError naming those there are."""
    if name not in formats.export_names():
        raise ConfigError(f"unknown format {name!r}; export writes {', '.join(formats.export_names())}")
    return formats.get(name)


def _refuse(path: str, sae: SAE, fmt: formats.Format) -> None:
    """The format's refusal of ``sae``, naming the SAE and the formats that do hold it."""
    try:
        fmt.check(sae)
    except ConfigError as err:
        holders = formats.holding(sae)
        hint = f"use --format {_either(holders)}" if holders else "keep gs_lightning's own folder (load_sae reads it)"
        raise ConfigError(f"{path}: {err}; {hint}") from err


def _either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _release_place(path: str, meta: dict[str, Any], layer: int | None, average_l0: float | None) -> dict[str, Any]:
    """``layer`` and ``average_l0`` of the SAE's release folder, from the options or its metadata."""
    layer = site_layer(meta.get("site")) if layer is None else layer
    metrics = meta.get("final_metrics", {})
    average_l0 = average_l0 if average_l0 is not None else metrics.get("val/l0", metrics.get("train/l0"))
    if layer is None or average_l0 is None:
        raise ConfigError(f"{path}: give --layer and --average_l0 (the SAE's metadata does not record them)")
    return {"layer": layer, "average_l0": average_l0}


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


def export_parser() -> ArgumentParser:
    """The parser of ``python -m gs_lightning export``: :func:`export`'s arguments, ``--format``
    choosing among the formats registered when it is built (so ``--help`` lists them)."""
    choices = formats.export_names()
    described = "; ".join(f"``{name}`` ({formats.get(name).description})" for name in choices)
    params = list(inspect.signature(export).parameters)
    after = set(params[params.index("format"):])  # --format keeps its place among the arguments
    parser = ArgumentParser(prog=PROG, description=inspect.getdoc(export).split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    parser.add_function_arguments(export, as_positional=False, as_group=False, skip=after)
    parser.add_argument("--format", type=Literal[tuple(choices)], required=True, help=described + ".")
    parser.add_function_arguments(export, as_positional=False, as_group=False, skip=set(params) - after | {"format"})
    return parser


def export_main(args: list[str]) -> list[Path]:
    """Entry point of ``python -m gs_lightning export``; returns the written paths."""
    parser = export_parser()
    options = parser.parse_args(args).as_dict()
    options.pop("config", None)
    return export(**options)
