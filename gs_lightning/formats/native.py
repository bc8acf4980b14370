"""gs_lightning's own format: ``sae.safetensors`` + ``config.json`` in one folder.

``config.json`` holds the variant's ``class_path`` and ``init_args`` (enough to rebuild
it), the input scale folded into the weights, and free-form metadata (model, site,
training step, final metrics). It holds any SAE, and nothing here unpickles.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from gs_lightning.errors import ConfigError
from gs_lightning.formats.base import Format
from gs_lightning.formats.files import write_folder
from gs_lightning.saes import SAE

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def plain_scale(scale: float | Tensor | list[float]) -> float | list[float]:
    """A scale as JSON holds it: a float, or a list with one per stacked site (a CLT's layers)."""
    values = torch.as_tensor(scale, dtype=torch.float64).flatten().tolist()
    return values[0] if len(values) == 1 and not isinstance(scale, list) else values


def save_sae(sae: SAE, path: str | Path, input_scale: float | list[float] = 1.0,
             metadata: dict[str, Any] | None = None, target_scale: float | list[float] | None = None) -> Path:
    """Save ``sae`` so that it takes raw activations (``input_scale`` folded in) and, for a
    transcoder, reconstructs raw target activations (``target_scale`` folded in); a list
    holds one scale per stacked site.

    ``sae`` itself is left untouched; a folded copy is written.
    """
    folded = copy.deepcopy(sae).cpu().float()
    input_scale = plain_scale(input_scale)
    target_scale = None if target_scale is None else plain_scale(target_scale)
    folded.fold_input_scale(input_scale, target_scale)
    config = {
        "format_version": FORMAT_VERSION,
        "class_path": f"{type(sae).__module__}.{type(sae).__qualname__}",
        "init_args": folded.init_args(),
        "input_scale_folded": input_scale,
        **({} if target_scale is None else {"target_scale_folded": target_scale}),
        "metadata": metadata or {},
    }
    return write_folder(path, {WEIGHTS_FILE: folded.canonical_state_dict(), CONFIG_FILE: config})


def load_native(path: str | Path) -> SAE:
    """Load a folder written by :func:`save_sae` (float32, on CPU, in eval mode)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ConfigError(f"not a saved SAE: {p} is missing")
    try:
        config = json.loads(config_path.read_text())
        class_path, init_args = config["class_path"], config["init_args"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{config_path}: not a gs_lightning SAE config ({err})") from err
    sae = _import_sae_class(class_path, config_path)(**init_args)
    tensors = load_file(str(weights_path), device="cpu")
    try:
        sae.load_canonical_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise ConfigError(f"{weights_path}: weights do not match {class_path}({init_args}): {err}") from err
    return sae.eval()


def load_sae_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved SAE."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def _import_sae_class(class_path: str, source: Path) -> type[SAE]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{source}: cannot import class_path {class_path!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, SAE)):
        raise ConfigError(f"{source}: class_path {class_path!r} is not an SAE subclass")
    return cls


class Native(Format):
    """gs_lightning's own folder; any folder with a ``config.json`` that no format before it claims."""

    name = "native"
    description = "gs_lightning's own folder: config.json + sae.safetensors"
    exported = False

    def claims(self, path: Path) -> bool:
        return (path / CONFIG_FILE).is_file()

    def read(self, path: Path) -> SAE:
        return load_native(path)

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """:func:`save_sae`; options ``input_scale``, ``target_scale`` and ``metadata``."""
        keys = ("input_scale", "target_scale", "metadata")
        return save_sae(sae, path, **{k: options[k] for k in keys if k in options})


FORMAT = Native()
