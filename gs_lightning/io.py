"""gs_lightning's own SAE format: ``sae.safetensors`` + ``config.json`` in one folder.

``config.json`` holds the variant's ``class_path`` and ``init_args`` (enough to rebuild
it), whether the input scale is folded into the weights, and free-form metadata (model,
site, training step, final metrics). Folders are written atomically: into a temporary
sibling, then renamed, so a crash never leaves a half-written SAE under the final name.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gs_lightning.errors import ConfigError
from gs_lightning.saes import SAE

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def save_sae(sae: SAE, path: str | Path, input_scale: float = 1.0, metadata: dict[str, Any] | None = None,
             target_scale: float | None = None) -> Path:
    """Save ``sae`` so that it takes raw activations (``input_scale`` folded in) and, for a
    transcoder, reconstructs raw target activations (``target_scale`` folded in).

    ``sae`` itself is left untouched; a folded copy is written.
    """
    path = Path(path)
    folded = copy.deepcopy(sae).cpu().float()
    folded.fold_input_scale(float(input_scale), None if target_scale is None else float(target_scale))
    config = {
        "format_version": FORMAT_VERSION,
        "class_path": f"{type(sae).__module__}.{type(sae).__qualname__}",
        "init_args": folded.init_args(),
        "input_scale_folded": float(input_scale),
        **({} if target_scale is None else {"target_scale_folded": float(target_scale)}),
        "metadata": metadata or {},
    }
    return write_folder(path, {WEIGHTS_FILE: folded.canonical_state_dict(), CONFIG_FILE: config})


def write_folder(path: str | Path, files: dict[str, Any]) -> Path:
    """Write a folder atomically: ``*.json`` entries are dicts, the others tensor dicts
    saved as safetensors; all go into a temporary sibling that is then renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, content in files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=2, default=_jsonable) + "\n")
            else:
                save_file({k: v.detach().contiguous() for k, v in content.items()}, str(tmp / name))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (no pickle: safetensors + JSON)."""
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
    cls = _import_sae_class(class_path, config_path)
    sae = cls(**init_args)
    tensors = load_file(str(weights_path), device="cpu")
    try:
        sae.load_canonical_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise ConfigError(f"{weights_path}: weights do not match {class_path}({init_args}): {err}") from err
    return sae.to(device).eval()


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
